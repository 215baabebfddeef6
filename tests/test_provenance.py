"""Decoder provenance: a run records what it trained on; a decoder that saw a test puzzle is refused."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from train_helpers import build_tiny_dataset, tiny_config

from etrm.data.build import BuildOptions, build_dataset
from etrm.data.provenance import TRAINING_DATA_FILE
from etrm.errors import EtrmError
from etrm.runs.checkpoint import load_weights
from etrm.train.loop import train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_tiny_dataset(tmp_path_factory.mktemp("prov-data"))


def build_with_extra_training_task(data, root, task_id: str, task: dict):
    """A build whose training side holds the tiny set's training puzzles plus `task`."""
    src = root / f"src-{task_id}"
    shutil.copytree(data.parent / "src_train", src)
    (src / f"{task_id}.json").write_text(json.dumps(task))
    other_test = root / "other_test"
    if not other_test.exists():
        other_test.mkdir()
        pair = {"input": [[5, 5, 5]], "output": [[6, 6, 6]]}
        (other_test / "z000.json").write_text(json.dumps({"train": [pair], "test": [pair]}))
    out = root / f"data-{task_id}"
    build_dataset(BuildOptions([str(src)], [str(other_test)], out, num_aug=2))
    return out


def pretrain(dataset, out, *extra):
    """A decoder pretrained with the TRM recipe (puzzle-id table) for two steps."""
    return train(tiny_config("trm", dataset, "train.max_steps=2", *extra), out, preset="trm", progress=False)


def test_a_decoder_that_saw_a_test_puzzle_is_refused_with_its_id(data, tmp_path):
    test_task = json.loads((data.parent / "src_test" / "b001.json").read_text())
    leaky = build_with_extra_training_task(data, tmp_path, "b001", test_task)
    decoder = pretrain(leaky, tmp_path / "leaky-decoder")
    cfg = tiny_config("SF2", data, "train.max_steps=1", f"train.init_from={decoder}")
    with pytest.raises(
        EtrmError, match=r"trained on 1 puzzle\(s\) of this run's test split: b001 \(trained on"
    ):
        train(cfg, tmp_path / "sf2", preset="SF2", progress=False)
    assert not (tmp_path / "sf2").exists()


def test_a_rotated_recoloured_test_pair_under_another_id_is_refused(data, tmp_path):
    test_task = json.loads((data.parent / "src_test" / "b000.json").read_text())
    swap = np.array([0, 2, 1, 3, 4, 5, 6, 7, 8, 9])  # colours 1 and 2 swapped, 0 fixed

    def disguise(grid):
        return swap[np.rot90(np.array(grid))].tolist()

    pair = test_task["test"][0]
    moved = {"input": disguise(pair["input"]), "output": disguise(pair["output"])}
    decoy = {"train": [moved, moved], "test": [moved]}
    decoder = pretrain(build_with_extra_training_task(data, tmp_path, "renamed", decoy), tmp_path / "dec")
    cfg = tiny_config("SF2", data, "train.max_steps=1", f"train.init_from={decoder}/step-2")
    with pytest.raises(EtrmError, match=r"b000 \(a grid pair, up to rotation/reflection/colours"):
        train(cfg, tmp_path / "sf2", preset="SF2", progress=False)


def test_a_clean_decoder_is_accepted_and_recorded(data, tmp_path, capsys):
    decoder = pretrain(data, tmp_path / "trm-decoder", "logging.run_name=trm-decoder")
    assert json.loads((decoder / "run_info.json").read_text())["decoder_provenance"] == "none"
    cfg = tiny_config("SF2", data, "train.max_steps=1", "train.lr=1e-12", f"train.init_from={decoder}")
    run = train(cfg, tmp_path / "sf2", preset="SF2", progress=False)
    assert "decoder initialised from etrm run trm-decoder" in capsys.readouterr().err

    info = json.loads((run / "run_info.json").read_text())
    assert info["decoder_provenance"] == "etrm:trm-decoder" and info["fewshot"] is True
    record = json.loads((run / TRAINING_DATA_FILE).read_text())
    assert record["decoder_provenance"] == "etrm:trm-decoder" and record["foreign"] is False
    assert [d["puzzle_ids"] for d in record["datasets"]] == [["a000", "a001", "a002", "a003"]]
    assert [s["spec"] for s in record["datasets"][0]["sources"]] == [str(data.parent / "src_train")]
    assert len(record["datasets"][0]["pair_keys"]) == 16  # 4 puzzles × 4 distinct pairs

    # Decoder weights are the pretrained run's EMA decoder (lr 1e-12: one step leaves them as loaded).
    pretrained = load_weights(decoder / "step-2" / "ema.safetensors")
    started = load_weights(run / "step-1" / "model.safetensors")
    decoder_keys = [k for k in pretrained if k.startswith("decoder.")]
    assert len(decoder_keys) == 10  # H_init, L_init, 4 in the one layer, embeddings, lm_head, q_head (2)
    for key in decoder_keys:
        torch.testing.assert_close(started[key], pretrained[key], rtol=0, atol=1e-9, msg=key)


def test_a_decoder_of_another_size_is_refused_naming_a_key(data, tmp_path):
    decoder = pretrain(data, tmp_path / "dec", "arch.hidden_size=8")
    cfg = tiny_config("SF2", data, "train.max_steps=1", f"train.init_from={decoder}")
    with pytest.raises(EtrmError, match=r"its decoder does not fit this run's arch \(decoder\."):
        train(cfg, tmp_path / "sf2", preset="SF2", progress=False)


@pytest.mark.parametrize("out", [None, "runs/SF2"])
def test_sf2_without_a_decoder_choice_stops_and_writes_nothing(data, tmp_path, out):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    cli = subprocess.run(
        [sys.executable, "-m", "etrm", "train", "--preset", "SF2", "--size", "cpu-smoke"]
        + ["--set", f"data.path={data}"]
        + (["--out", out] if out else []),  # the default is runs/<run name>
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )
    assert cli.returncode == 2
    assert cli.stderr.count("\n") == 1 and "Traceback" not in cli.stderr
    assert "train.init_from" in cli.stderr and "train.init_from=none" in cli.stderr
    assert list(cwd.iterdir()) == []  # not even the runs/ folder


def test_sf2_from_scratch_on_purpose_records_provenance_none(data, tmp_path):
    run = train(tiny_config("SF2", data, "train.max_steps=1"), tmp_path / "run", preset="SF2", progress=False)
    info = json.loads((run / "run_info.json").read_text())
    assert info["decoder_provenance"] == "none" and info["fewshot"] is True


def test_dry_run_prints_the_budget_of_the_config_on_its_dataset(data):
    cli = subprocess.run(
        [sys.executable, "-m", "etrm", "train", "--preset", "SF2", "--size", "cpu-smoke", "--dry-run"]
        + ["--set", f"data.path={data}", "--set", "train.epochs=3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["logging"]["run_name"] == "SF2_hybrid_std_explore0.7"
    err = " ".join(cli.stderr.split())
    # 4 training puzzles × 4 pairs = 16 episodes an epoch; batch 4 → 4 steps; 3 epochs → 12 steps.
    assert "training groups: 4, episodes per epoch: 16" in err
    assert "steps per epoch: 4, epochs: 3, total optimizer steps: 12" in err
    assert "samples (ACT steps × rows): 48" in err
    assert "evaluations at epochs: 0, 1, 2, 3" in err
    assert "one epoch here = 4.00 of its epochs" in err  # the public ETRM: one episode per group


def test_resuming_onto_a_test_split_the_run_trained_on_is_refused(data, tmp_path):
    test_task = json.loads((data.parent / "src_test" / "b001.json").read_text())
    leaky = build_with_extra_training_task(data, tmp_path, "b001", test_task)
    run = train(tiny_config("SF2", leaky, "train.max_steps=1"), tmp_path / "run", progress=False)
    moved = tiny_config("SF2", data, "train.max_steps=2")
    with pytest.raises(EtrmError, match=r"--resume .*run: the run was trained on 1 puzzle\(s\) .*: b001 "):
        train(moved, run, resume=True, progress=False)
    assert sorted(p.name for p in run.glob("step-*")) == ["step-1"]
