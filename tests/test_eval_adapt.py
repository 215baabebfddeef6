"""Test-time adaptation (`etrm eval --adapt`): never reads query outputs, seeded, discarded after each
puzzle, reported beside the unadapted result, and it lowers the demo objective for every encoder."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from train_helpers import write_tasks

from etrm.cli import main
from etrm.config import ENCODER_TYPES, RunConfig
from etrm.data.build import BuildOptions, build_dataset
from etrm.data.dataset import ArcDataset
from etrm.errors import EtrmError
from etrm.eval import evaluate
from etrm.eval.adapt import AdaptOptions, DemoObjective, adapted, attach_low_rank, evaluate_adapted
from etrm.eval.predictions import Predictions
from etrm.models import build_model
from etrm.models.layers import CastedLinear
from etrm.runs.checkpoint import save_checkpoint

NUM_AUG = 2
SINGLE = "c000"  # the test puzzle with one demo


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    """Two 3-demo test puzzles (b000, b001) and one single-demo puzzle (c000); grids ≤ 4×4."""
    root = tmp_path_factory.mktemp("adapt-data")
    write_tasks(root / "train", "a", 4, seed=1)
    write_tasks(root / "test", "b", 2, seed=2)
    pair = {"input": [[1, 2], [3, 4]], "output": [[2, 3], [4, 5]]}
    (root / "test" / f"{SINGLE}.json").write_text(json.dumps({"train": [pair], "test": [pair]}))
    out = root / "data"
    build_dataset(BuildOptions([str(root / "train")], [str(root / "test")], out, num_aug=3))
    return out


def tiny_model(tiny_arch, encoder="standard", seed=0):
    torch.manual_seed(seed)
    extra = {"num_puzzle_identifiers": 16} if encoder == "puzzle_embedding" else {}
    return build_model(tiny_arch(encoder, seq_len=36, **extra))


def run_adapted(model, data, options, task_ids=None):
    kwargs = dict(num_aug=NUM_AUG, batch_size=8, max_demos=3, progress=False)
    base = evaluate(model, data, task_ids=task_ids, **kwargs)
    return base, evaluate_adapted(model, data, "test", options.validate(), unadapted=base, **kwargs)


def predicted_grids(result):
    """(task, query, aug) → (predicted grid as a list or a marker id, q_halt): comparable across grid tables."""
    p = result.predictions
    out = {}
    for row in range(len(p.query_task)):
        for aug in range(p.num_aug):
            gid = int(p.grid_ids[row, aug])
            grid = p.grids.grid(gid).tolist() if gid >= 0 else gid
            out[p.task_ids[p.query_task[row]], int(p.query_index[row]), aug] = (
                grid,
                float(p.q_halt[row, aug]),
            )
    return out


def test_garbage_query_outputs_give_the_identical_adapted_prediction(data_path, tmp_path, tiny_arch):
    garbled = tmp_path / "garbled"
    shutil.copytree(data_path, garbled)
    split = ArcDataset.open(data_path).split("test")
    tokens, shapes = np.load(garbled / "test" / "tokens.npy"), np.load(garbled / "test" / "shapes.npy")
    rng = np.random.default_rng(0)
    changed = 0
    for g in range(len(split.puzzle_ids)):
        for pair in range(int(split.pair_offsets[g] + split.num_demos[g]), int(split.pair_offsets[g + 1])):
            h, w = rng.integers(1, 5, size=2)
            tokens[2 * pair + 1] = 0
            tokens[2 * pair + 1].reshape(30, 30)[:h, :w] = rng.integers(2, 12, size=(h, w))
            shapes[2 * pair + 1] = (h, w)
            changed += 1
    np.save(garbled / "test" / "tokens.npy", tokens)
    np.save(garbled / "test" / "shapes.npy", shapes)
    assert changed == 3
    for mode in ("latent", "finetune"):
        options = AdaptOptions(mode, steps=3, batch=4, seed=7)
        _, clean = run_adapted(tiny_model(tiny_arch), data_path, options)
        _, dirty = run_adapted(tiny_model(tiny_arch), garbled, options)
        assert predicted_grids(clean) == predicted_grids(dirty)
        losses = {t: o.losses for t, o in clean.outcomes.items()}
        assert losses == {t: o.losses for t, o in dirty.outcomes.items()} and len(losses["b000"]) == 4
        # the targets did change, so the test would notice a prediction that read them
        assert clean.predictions.grids.grid(int(clean.predictions.target_ids[0])).tolist() != (
            dirty.predictions.grids.grid(int(dirty.predictions.target_ids[0])).tolist()
        )


def test_same_seed_same_result_another_seed_other_draws(data_path, tiny_arch):
    model = tiny_model(tiny_arch)
    runs = [
        run_adapted(model, data_path, AdaptOptions("latent", steps=3, batch=2, seed=s))[1] for s in (1, 1, 2)
    ]
    assert predicted_grids(runs[0]) == predicted_grids(runs[1])
    assert runs[0].outcomes["b000"].losses == runs[1].outcomes["b000"].losses
    assert runs[0].outcomes["b000"].losses != runs[2].outcomes["b000"].losses  # the seed picks the episodes


@pytest.mark.parametrize("mode, params", [("latent", None), ("finetune", "lora")])
def test_zero_steps_predict_exactly_as_unadapted_and_single_demo_is_skipped(
    data_path, tiny_arch, mode, params
):
    model = tiny_model(tiny_arch)
    base, result = run_adapted(model, data_path, AdaptOptions(mode, steps=0, params=params))
    assert predicted_grids(result) == predicted_grids(base)
    block = result.results_json()["adapt"]
    assert block["skipped_single_demo"] == [SINGLE] and block["puzzles"][SINGLE]["seconds"] == 0.0
    assert block["puzzles"]["b000"]["skipped"] is False
    assert block["solved_to_unsolved"] == block["unsolved_to_solved"] == []
    assert block["unadapted_metrics"] == base.metrics and block["mode"] == mode


@pytest.mark.parametrize(
    "mode, params", [("latent", None), ("finetune", "all"), ("finetune", "encoder"), ("finetune", "lora")]
)
def test_adaptation_is_discarded_after_each_puzzle(data_path, tiny_arch, mode, params):
    model = tiny_model(tiny_arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    encoder = model.encoder
    _, result = run_adapted(model, data_path, AdaptOptions(mode, steps=2, lr=0.1, params=params))
    losses = result.outcomes["b000"].losses
    assert len(losses) == 3 and losses[0] != losses[-1]  # it did adapt
    after = model.state_dict()
    assert model.encoder is encoder and sorted(after) == sorted(before)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks for m in model.modules())  # no low-rank delta left attached


@pytest.mark.parametrize("encoder", ENCODER_TYPES)
@pytest.mark.parametrize("mode, params", [("latent", None), ("finetune", "lora")])
def test_adaptation_lowers_the_demo_objective(data_path, tiny_arch, encoder, mode, params):
    model = tiny_model(tiny_arch, encoder)
    split = ArcDataset.open(data_path).split("test")
    g = split.group_index("b000")
    full = 3 * NUM_AUG  # every leave-one-out episode in each step: the objective itself, not a sample
    objective = DemoObjective(split, g, NUM_AUG, 3, full, seed=0, device=torch.device("cpu"))
    lr = 0.05 if mode == "latent" else 0.01
    options = AdaptOptions(mode, steps=10, lr=lr, batch=full, params=params).validate()
    with torch.enable_grad(), adapted(model.eval(), objective, options) as losses:
        pass
    assert len(losses) == 11 and all(np.isfinite(losses))
    assert losses[-1] < losses[0] - 1e-3, losses


def test_low_rank_deltas_add_x_a_b_to_every_linear_and_leave_it_after(data_path, tiny_arch):
    torch.manual_seed(0)
    linear = CastedLinear(6, 5, bias=True)
    with torch.no_grad():
        linear.bias.normal_()
    x = torch.randn(3, 6)
    plain = x @ linear.weight.T + linear.bias
    (delta,), detach = attach_low_rank(linear, 2, [7, 1])
    assert delta.down.shape == (2, 6) and delta.up.shape == (5, 2)
    assert torch.equal(delta.up, torch.zeros(5, 2)) and delta.down.abs().sum() > 0
    assert torch.equal(linear(x), linear.forward.__func__(linear, x))  # B = 0: the layer as it was
    with torch.no_grad():
        delta.up.normal_()
    torch.testing.assert_close(linear(x), plain + (x @ delta.down.T) @ delta.up.T)
    detach()
    torch.testing.assert_close(linear(x), plain)
    # the start of A is the seed's alone
    (again,), detach_again = attach_low_rank(linear, 2, [7, 1])
    (other,), detach_other = attach_low_rank(linear, 2, [7, 2])
    assert torch.equal(again.down, delta.down) and not torch.equal(other.down, delta.down)
    detach_again(), detach_other()
    # on a model: one delta per linear layer of the encoder and the decoder, all in the forward pass
    model = tiny_model(tiny_arch)
    linears = [m for m in model.modules() if isinstance(m, CastedLinear)]
    assert any(m in linears for m in model.encoder.modules()) and model.decoder.lm_head in linears
    deltas, detach = attach_low_rank(model, 3, [0, 0])
    assert len(deltas) == len(linears) and all(d.down.shape[0] == 3 for d in deltas)
    used = []
    for d in deltas:
        d.register_forward_hook(lambda m, *_: used.append(m))
    split = ArcDataset.open(data_path).split("test")
    batch = DemoObjective(split, 0, NUM_AUG, 3, 2, seed=0, device=torch.device("cpu")).draw()
    with torch.no_grad():
        model.eval()(model.initial_carry(batch), batch)
    detach()
    assert {id(d) for d in used} == {id(d) for d in deltas}


def test_finetune_of_a_parameterless_encoder_is_an_error(data_path, tiny_arch):
    model = tiny_model(tiny_arch, "puzzle_embedding")
    with pytest.raises(EtrmError, match="--adapt-params encoder.*use --adapt latent"):
        run_adapted(model, data_path, AdaptOptions("finetune", steps=1, params="encoder"))


@pytest.fixture
def run_dir(data_path, tmp_path, tiny_arch):
    cfg = RunConfig(arch=tiny_arch(seq_len=36))
    cfg.data.path, cfg.data.max_demos = str(data_path), 3
    save_checkpoint(tmp_path / "run", 5, tiny_model(tiny_arch).state_dict(), None, cfg, {"step": 5}, keep=1)
    return tmp_path / "run"


def test_cli_adapt_none_is_bit_identical_and_adapted_goes_beside_it(run_dir, capsys):
    common = [str(run_dir), "--num-aug", str(NUM_AUG), "--batch-size", "5"]
    plain, none = run_dir / "plain", run_dir / "none"
    main(["eval", *common, "--out", str(plain)])
    main(["eval", *common, "--out", str(none), "--adapt", "none"])
    assert (plain / "results.json").read_text() == (none / "results.json").read_text()
    a, b = Predictions.load(plain / "predictions.npz"), Predictions.load(none / "predictions.npz")
    for name in ("grid_ids", "q_halt", "target_ids", "query_task", "query_index"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    capsys.readouterr()

    main(["eval", *common, "--adapt", "finetune", "--adapt-steps", "2", "--adapt-params", "decoder"])
    text = capsys.readouterr().out
    assert "adapt finetune" in text and "skipped (single demo) 1" in text
    results = json.loads((run_dir / "eval" / "step-5-adapt-finetune-decoder" / "results.json").read_text())
    plain_results = json.loads((plain / "results.json").read_text())
    block = results["adapt"]
    assert block["unadapted_metrics"] == plain_results["metrics"]
    assert (block["mode"], block["steps"], block["params"], block["lr"]) == ("finetune", 2, "decoder", 1e-4)
    assert sorted(block["puzzles"]) == sorted(plain_results["puzzles"]) == ["b000", "b001", SINGLE]
    assert block["mean_adapt_seconds"] > 0 and block["skipped_single_demo"] == [SINGLE]
    assert not (run_dir / "eval" / "step-5").exists()  # --out took the plain ones elsewhere

    # Another parameter set writes beside it, not over it.
    main(["eval", *common, "--adapt", "finetune", "--adapt-steps", "1", "--adapt-params", "lora"])
    capsys.readouterr()
    lora = json.loads((run_dir / "eval" / "step-5-adapt-finetune-lora" / "results.json").read_text())
    again = json.loads((run_dir / "eval" / "step-5-adapt-finetune-decoder" / "results.json").read_text())
    assert (lora["adapt"]["params"], again["adapt"]["params"]) == ("lora", "decoder")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--adapt", "bogus"], "--adapt must be one of none, latent, finetune"),
        (["--adapt", "latent", "--adapt-steps", "-1"], "--adapt-steps"),
        (["--adapt", "latent", "--adapt-params", "encoder"], "--adapt-params goes with --adapt finetune"),
        (["--adapt", "finetune", "--adapt-params", "head"], "--adapt-params must be one of"),
        (["--adapt", "finetune", "--adapt-params", "lora", "--adapt-rank", "0"], "--adapt-rank must be ≥ 1"),
        (
            ["--adapt", "finetune", "--adapt-rank", "2"],
            "--adapt-rank goes with --adapt finetune --adapt-params lora",
        ),
        (["--adapt", "latent", "--adapt-rank", "2"], "--adapt-rank goes with"),
        (["--adapt", "latent", "--adapt-lr", "0"], "--adapt-lr must be > 0"),
        (["--adapt", "latent", "--adapt-batch", "0"], "--adapt-batch"),
        (["--adapt", "latent", "--from-predictions", "x.npz"], "cannot go with --from-predictions"),
    ],
)
def test_bad_options_are_one_line_errors(capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", *args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def without_timings(results: dict) -> dict:
    """results.json less the adaptation's wall-clock seconds (the one thing that differs run to run)."""
    block = dict(results["adapt"])
    del block["mean_adapt_seconds"]
    block["puzzles"] = {
        t: {k: v for k, v in p.items() if k != "seconds"} for t, p in block["puzzles"].items()
    }
    return {**results, "adapt": block}


def test_adapted_eval_on_two_processes_writes_the_same_files_as_one(run_dir):
    """Real torch.distributed (gloo): the puzzles are dealt out over 2 ranks, rank 0 gathers, votes and
    writes. Rank 1 adapts b001 as its first puzzle where one process adapts it second, so a low-rank
    start or an episode draw taken from a stream shared between puzzles would show here."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ETRM_KERNELS": "torch", "WANDB_MODE": "disabled"}
    common = [str(run_dir), "--num-aug", str(NUM_AUG), "--batch-size", "5", "--seed", "3"]
    common += ["--adapt", "finetune", "--adapt-params", "lora", "--adapt-rank", "2", "--adapt-steps", "2"]
    common += ["--adapt-lr", "0.05", "--adapt-batch", "4"]
    for name, extra in (("one", []), ("two", ["--nproc", "2"])):
        proc = subprocess.run(
            [sys.executable, "-m", "etrm", "eval", *common, "--out", str(run_dir / name), *extra],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = run_dir / "one", run_dir / "two"
    assert (one / "predictions.npz").read_bytes() == (two / "predictions.npz").read_bytes()
    results = json.loads((one / "results.json").read_text())
    assert without_timings(results) == without_timings(json.loads((two / "results.json").read_text()))
    block = results["adapt"]
    assert (block["mode"], block["params"], block["rank"], block["seed"]) == ("finetune", "lora", 2, 3)
    assert sorted(block["puzzles"]) == ["b000", "b001", SINGLE] and block["skipped_single_demo"] == [SINGLE]
    for task in ("b000", "b001"):
        losses = block["puzzles"][task]["losses"]
        assert len(losses) == 3 and losses[0] != losses[-1]  # each puzzle adapted, on whichever rank
    assert Predictions.load(two / "predictions.npz").meta["adapt"] == "finetune"
