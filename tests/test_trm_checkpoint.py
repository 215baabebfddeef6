"""Reading reference TRM checkpoints: key mapping, arch inference, decoder init, and clear errors for bad files."""

import json
from pathlib import Path

import pytest
import torch
from reference_files import TRM_CHECKPOINT, TRM_CHECKPOINT_KEYS, TRM_CONFIG  # tests/reference_files.py
from torch import nn

from etrm.config import ArchConfig
from etrm.errors import EtrmError
from etrm.models import build_model
from etrm.models.trm_checkpoint import (
    infer_trm_arch,
    init_decoder_from_trm,
    load_trm_model,
    read_trm_checkpoint,
    trm_arch_from_json,
)


def fixture_arch(**overrides) -> ArchConfig:
    arch = trm_arch_from_json(TRM_CONFIG)
    for key, value in overrides.items():
        setattr(arch, key, value)
    return arch


def test_arc_size_key_list_loads_exactly_and_infers_the_arch(tmp_path):
    """Every key and shape of the reference's ARC-size key manifest has a place in our model, and no more."""
    state = {}
    for line in TRM_CHECKPOINT_KEYS.read_text().splitlines():
        if line.startswith("#") or line.startswith("key\t"):
            continue
        key, shape, dtype, _ = line.split("\t")
        size = [int(n) for n in shape.split("x")]
        state[key] = torch.randn(size).to(getattr(torch, dtype))
    torch.save(state, tmp_path / "step_1000")
    torch.save({k: v[:1] for k, v in state.items()}, tmp_path / "step_20")  # an older, different step
    model, arch, sources, report, ckpt = load_trm_model(tmp_path)
    assert ckpt.path.name == "step_1000"
    assert report.missing == [] and report.unexpected == [] and report.dropped == []
    assert (arch.hidden_size, arch.L_layers, arch.expansion, arch.num_heads) == (512, 2, 4.0, 8)
    assert (arch.num_puzzle_identifiers, arch.puzzle_emb_ndim, arch.vocab_size) == (10, 512, 12)
    assert sources["hidden_size"] == "checkpoint" and sources["num_heads"] == "default"
    assert sum(p.numel() for p in model.decoder.parameters()) == 6_829_058
    prefix = "_orig_mod.model.inner."
    own = model.state_dict()
    assert torch.equal(own["decoder.H_init"], state[prefix + "H_init"].float())  # bfloat16 in the file
    assert torch.equal(own["encoder.weights"], state[prefix + "puzzle_emb.weights"])
    assert torch.equal(
        own["decoder.L_level.layers.1.mlp.down_proj.weight"],
        state[prefix + "L_level.layers.1.mlp.down_proj.weight"],
    )


def test_checkpoint_saved_without_compile_reads_the_same(tmp_path):
    state = torch.load(TRM_CHECKPOINT, weights_only=True)
    torch.save({k.removeprefix("_orig_mod."): v for k, v in state.items()}, tmp_path / "plain.pt")
    a, b = read_trm_checkpoint(TRM_CHECKPOINT), read_trm_checkpoint(tmp_path / "plain.pt")
    assert a.tensors.keys() == b.tensors.keys() and all(
        torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors
    )


def test_config_disagreeing_with_the_checkpoint_is_an_error():
    ckpt = read_trm_checkpoint(TRM_CHECKPOINT)
    with pytest.raises(EtrmError, match="hidden_size=64 but the config says 128"):
        infer_trm_arch(ckpt, fixture_arch(hidden_size=128))
    with pytest.raises(EtrmError, match="SwiGLU inner size is 256"):
        infer_trm_arch(ckpt, fixture_arch(expansion=8.0))
    with pytest.raises(EtrmError, match="num_puzzle_identifiers=5 but the config says 7"):
        infer_trm_arch(ckpt, fixture_arch(num_puzzle_identifiers=7))


def test_loading_into_a_model_of_another_size_names_the_key():
    model = build_model(
        ArchConfig(hidden_size=32, num_heads=2, encoder_type="puzzle_embedding", num_puzzle_identifiers=5)
    )
    with pytest.raises(
        EtrmError,
        match=r"trm_A_checkpoint.pt: H_init has shape \[64\] in the checkpoint but \[32\] in the model",
    ):
        init_decoder_from_trm(model, TRM_CHECKPOINT)


class StandInEncoder(nn.Module):
    """An encoder with its own parameters, to see what decoder init does with encoder keys."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 64)


def test_init_decoder_from_trm_drops_the_puzzle_table_and_leaves_the_encoder():
    model = build_model(fixture_arch())
    model.encoder = StandInEncoder()
    encoder_before = model.encoder.proj.weight.clone()
    report = init_decoder_from_trm(model, TRM_CHECKPOINT)
    assert report.dropped == ["puzzle_emb.weights"]
    assert report.missing == ["encoder.proj.weight", "encoder.proj.bias"]
    assert report.unexpected == []
    state = torch.load(TRM_CHECKPOINT, weights_only=True)
    for key, value in model.decoder.state_dict().items():
        assert torch.equal(value, state["_orig_mod.model.inner." + key]), key
    assert torch.equal(model.encoder.proj.weight, encoder_before)


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda d: write(d / "trunc.pt", TRM_CHECKPOINT.read_bytes()[:100_000]),
            "not a readable PyTorch checkpoint",
        ),
        (lambda d: write(d / "garbage.pt", b"\x00\x01garbage" * 100), "not a readable PyTorch checkpoint"),
        (lambda d: write(d / "notes.txt", b"hello, not a checkpoint\n"), "not a readable PyTorch checkpoint"),
        (lambda d: d / "absent.pt", "no such checkpoint file"),
        (lambda d: d, "without TRM checkpoints"),
    ],
)
def test_unreadable_files_give_clear_errors(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(EtrmError, match=message) as err:
        read_trm_checkpoint(path)
    assert str(path) in str(err.value)


def test_files_that_are_not_trm_state_dicts_give_clear_errors(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(EtrmError, match="not a state_dict"):
        read_trm_checkpoint(tmp_path / "list.pt")
    torch.save({"model.weight": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(EtrmError, match="not a TRM checkpoint"):
        read_trm_checkpoint(tmp_path / "other.pt")
    torch.save({"opt": nn.Linear(2, 2)}, tmp_path / "pickled_module.pt")  # needs full unpickling: refused
    with pytest.raises(EtrmError, match="not saved as plain tensors"):
        read_trm_checkpoint(tmp_path / "pickled_module.pt")


def test_bad_config_files_give_clear_errors(tmp_path):
    (tmp_path / "a.json").write_text('{"arch": {"hidden_size": 64, "pos_encodings": "learned"}}')
    with pytest.raises(EtrmError, match="pos_encodings='rope'"):
        trm_arch_from_json(tmp_path / "a.json")
    (tmp_path / "b.json").write_text('{"arch": {"hidden_sise": 64}}')
    with pytest.raises(EtrmError, match="unknown arch keys hidden_sise"):
        trm_arch_from_json(tmp_path / "b.json")
    (tmp_path / "c.json").write_text("{not json")
    with pytest.raises(EtrmError, match="not valid JSON"):
        trm_arch_from_json(tmp_path / "c.json")


def test_trm_all_config_yaml_gives_the_same_arch_as_json(tmp_path):
    """TRM writes its whole run config as all_config.yaml; the dataset-derived keys are not in it."""
    import yaml

    reference = json.loads(TRM_CONFIG.read_text())["arch"]
    from_dataset = {"batch_size", "seq_len", "vocab_size", "num_puzzle_identifiers"}
    arch = {k: v for k, v in reference.items() if k not in from_dataset}
    arch.update(
        name="recursive_reasoning.trm@TinyRecursiveReasoningModel_ACTV1", loss={"name": "losses@ACTLossHead"}
    )
    run_config = {
        "arch": arch,
        "global_batch_size": 768,
        "lr": 1e-4,
        "data_paths": ["data/arc1concept-aug-1000"],
    }
    path = tmp_path / "all_config.yaml"
    path.write_text(yaml.safe_dump(run_config))
    got, expected = trm_arch_from_json(path), trm_arch_from_json(TRM_CONFIG)
    for key in ArchConfig.__dataclass_fields__:
        if key != "num_puzzle_identifiers":
            assert getattr(got, key) == getattr(expected, key), key
    model, _, _, report, _ = load_trm_model(TRM_CHECKPOINT, got)  # the table size comes from the checkpoint
    assert model.arch.num_puzzle_identifiers == reference["num_puzzle_identifiers"]
    (tmp_path / "bad.yml").write_text("arch: [unclosed")
    with pytest.raises(EtrmError, match="not valid YAML"):
        trm_arch_from_json(tmp_path / "bad.yml")
