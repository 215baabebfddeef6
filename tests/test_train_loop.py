"""The training loop on a tiny dataset: every encoder family trains and logs, resume is exact, errors are clear."""

import json

import pytest
import torch
from reference_files import TRM_CHECKPOINT  # tests/reference_files.py
from train_helpers import build_tiny_dataset, tiny_config

from etrm.config import apply_overrides
from etrm.errors import EtrmError
from etrm.models.losses import ACTLossHead
from etrm.runs.checkpoint import load_for_inference, load_trainer_state, load_weights
from etrm.train.loop import train
from etrm.train.metrics import read_metrics

TRAIN_KEYS = [
    "train/lm_loss",
    "train/q_halt_loss",
    "train/q_continue_loss",
    "train/kl_loss",
    "train/accuracy",
    "train/exact_accuracy",
    "train/q_halt_accuracy",
    "train/steps",
    "train/steps_hist",
    "train/lr",
    "grad/encoder_norm",
    "grad/inner_norm",
    "grad/total_norm",
    "encoder/context_rms",
    "encoder/prefix_rms",
    "perf/samples_per_s",
    "perf/peak_mem_mb",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_tiny_dataset(tmp_path_factory.mktemp("train-data"))


@pytest.fixture(scope="module")
def trm_data(tmp_path_factory):
    return build_tiny_dataset(tmp_path_factory.mktemp("train-data-trm"), split="trm")


@pytest.mark.parametrize(
    "preset, extra",
    [
        (
            "SF1",
            ["train.eval_interval=1", "train.max_steps=4"],
        ),  # hybrid_standard, evaluated at the epoch end
        ("SF3", ["arch.kl_weight=0.1"]),  # hybrid_variational
        ("SF5", ["train.optimizer=adamw", "train.encoder_lr_scale=0.5"]),  # standard
        ("E2b", ["data.max_train_groups=2"]),  # lpn_var, overfit subset
        ("trm", []),  # puzzle_embedding baseline, sparse sign-SGD
    ],
)
def test_each_preset_family_trains_and_logs(preset, extra, data, trm_data, tmp_path):
    dataset = trm_data if preset == "trm" else data
    cfg = tiny_config(preset, dataset, "train.max_steps=2", *extra)
    run = train(cfg, tmp_path / "run", preset=preset, progress=False)

    rows = read_metrics(run)
    train_rows = [r for r in rows if "train/lm_loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, cfg.train.max_steps + 1))
    for r in train_rows:
        assert set(TRAIN_KEYS) <= set(r)
        assert r["grad/encoder_norm"] > 0 and r["grad/inner_norm"] > 0
        assert r["grad/total_norm"] == pytest.approx(
            (r["grad/encoder_norm"] ** 2 + r["grad/inner_norm"] ** 2) ** 0.5
        )
        assert len(r["train/steps_hist"]) == cfg.arch.halt_max_steps
        assert all(
            isinstance(v, float) and v == v for k, v in r.items() if k.startswith(("train/lm", "grad/"))
        )
    assert train_rows[0]["train/lr"] == pytest.approx(cfg.train.lr / cfg.train.lr_warmup_steps)
    if preset == "SF3":
        assert train_rows[0]["train/kl_loss"] > 0
    info = json.loads((run / "run_info.json").read_text())
    assert info["preset"] == preset and info["encoder_params"] + info["decoder_params"] == info["num_params"]
    assert info["fewshot"] is (preset != "trm")
    last = run / f"step-{cfg.train.max_steps}"
    assert (last / "model.safetensors").is_file() and (last / "ema.safetensors").is_file()
    if preset == "SF1":
        evals = [r for r in rows if "eval/pass@1" in r]
        # Before training, then every epoch: 16 episodes / batch 4 = 4 steps per epoch.
        assert [r["step"] for r in evals] == [0, 4]
        assert all(0.0 <= r["eval/train_em"] <= 1.0 and (run / r["eval/results"]).is_file() for r in evals)
        assert (run / "eval" / "step-0" / "results.json").is_file()
    if preset == "trm":  # the puzzle-id table moved only through sign-SGD: some rows non-zero now
        table = load_weights(last / "model.safetensors")["encoder.weights"]
        assert table.abs().sum() > 0
        assert (table.abs().sum(1) > 0).sum() < table.shape[0]


def test_resume_continues_exactly(data, tmp_path):
    # Variational sampling, exploration, a cached context in the carry and an epoch boundary mid-way.
    cfg = tiny_config("SF4", data, "arch.encoder_reencode=false", "arch.kl_weight=0.01", "train.max_steps=6")
    whole = train(cfg, tmp_path / "whole", progress=False)
    half = train(apply_overrides(cfg, ["train.max_steps=3"]), tmp_path / "split", progress=False)
    train(cfg, half, resume=True, progress=False)

    def losses(run):
        return [
            (r["step"], r["train/lm_loss"], r["train/q_halt_loss"], r["train/kl_loss"])
            for r in read_metrics(run)
        ]

    assert losses(whole) == losses(half)
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_weights(whole / "step-6" / name), load_weights(half / "step-6" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = load_trainer_state(whole / "step-6"), load_trainer_state(half / "step-6")
    assert sa["ranks"][0]["sampler"] == sb["ranks"][0]["sampler"]
    assert torch.equal(sa["ranks"][0]["carry"]["z_H"], sb["ranks"][0]["carry"]["z_H"])


def test_resume_refuses_changed_architecture_and_fresh_run_over_old(data, tmp_path):
    cfg = tiny_config("SF5", data, "train.max_steps=1")
    run = train(cfg, tmp_path / "run", progress=False)
    with pytest.raises(EtrmError, match=r"cannot resume .*arch.hidden_size \(16 → 32\)"):
        train(apply_overrides(cfg, ["arch.hidden_size=32"]), run, resume=True, progress=False)
    with pytest.raises(EtrmError, match="already holds a run; continue it with --resume"):
        train(cfg, run, progress=False)
    with pytest.raises(EtrmError, match="empty does not exist"):
        train(cfg, tmp_path / "empty", resume=True, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(EtrmError, match="empty holds no complete checkpoint"):
        train(cfg, tmp_path / "empty", resume=True, progress=False)


def test_compiled_training_step_matches_eager(data, tmp_path):
    """train.compile traces the whole ACT step (carry, encoder, loss); aot_eager needs no C++ compiler."""
    cfg = tiny_config("SF1", data, "train.max_steps=3", "train.ema=false")
    eager = train(cfg, tmp_path / "eager", progress=False)
    compiled = train(apply_overrides(cfg, ["train.compile=aot_eager"]), tmp_path / "compiled", progress=False)
    for a, b in zip(read_metrics(eager), read_metrics(compiled), strict=True):
        assert a["step"] == b["step"]
        assert b["train/lm_loss"] == pytest.approx(a["train/lm_loss"], rel=1e-5)
    wa, wb = (
        load_weights(eager / "step-3" / "model.safetensors"),
        load_weights(compiled / "step-3" / "model.safetensors"),
    )
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-4, atol=1e-6, msg=key)
    with pytest.raises(EtrmError, match="train.compile"):
        train(apply_overrides(cfg, ["train.compile=nosuch"]), tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()


def test_missing_dataset_is_a_clear_error(tmp_path):
    cfg = tiny_config("SF5", tmp_path / "nowhere")
    with pytest.raises(
        EtrmError, match=r"data.path=.*nowhere: no dataset there; build one with `etrm data build"
    ):
        train(cfg, tmp_path / "run", progress=False)


def test_time_limit_stops_with_a_checkpoint(data, tmp_path):
    cfg = tiny_config("SF5", data, "train.max_minutes=0.0001")
    run = train(cfg, tmp_path / "run", progress=False)
    assert [p.name for p in run.glob("step-*")] == ["step-1"]

    # What evaluation loads: the EMA weights by default, the live ones on request, in eval mode.
    for use_ema, file in [(True, "ema.safetensors"), (False, "model.safetensors")]:
        model, loaded_cfg, step = load_for_inference(run, use_ema=use_ema)
        assert step == 1 and loaded_cfg == cfg and not model.training
        saved = load_weights(run / "step-1" / file)
        assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    assert not torch.equal(
        load_weights(run / "step-1" / "ema.safetensors")["decoder.lm_head.weight"],
        load_weights(run / "step-1" / "model.safetensors")["decoder.lm_head.weight"],
    )


def _patch_loss(monkeypatch, scale_at_step):
    """Multiply the loss at chosen (1-based) calls of the loss head, to stage spikes and NaNs."""
    original = ACTLossHead.forward
    calls = {"n": 0}

    def forward(self, carry, batch):
        calls["n"] += 1
        carry, loss, metrics, outputs, halted = original(self, carry, batch)
        return carry, loss * scale_at_step.get(calls["n"], 1.0), metrics, outputs, halted

    monkeypatch.setattr(ACTLossHead, "forward", forward)


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(data, tmp_path, monkeypatch):
    cfg = tiny_config("SF5", data, "train.max_steps=2")
    run = train(cfg, tmp_path / "run", progress=False)
    _patch_loss(monkeypatch, {2: float("nan")})
    with pytest.raises(EtrmError, match=r"non-finite loss .* at step 4 .*last good checkpoint is .*step-2"):
        train(apply_overrides(cfg, ["train.max_steps=6"]), run, resume=True, progress=False)
    assert sorted(p.name for p in run.glob("step-*")) == ["step-2"]
    event = read_metrics(run)[-1]
    assert (event["event"], event["step"], event["loss"]) == ("nonfinite_loss", 4, "nan")


def test_loss_spike_halves_the_learning_rate(data, tmp_path, monkeypatch):
    _patch_loss(monkeypatch, {12: 1e4})
    cfg = tiny_config(
        "SF5",
        data,
        "train.epochs=4",
        "train.max_steps=13",
        "train.global_batch_size=2",
        "train.lr_warmup_steps=0",
        "train.lr_min_ratio=1",  # a constant LR, so that only the halving moves it
        "arch.halt_max_steps=1",
    )
    run = train(cfg, tmp_path / "run", progress=False)
    rows = read_metrics(run)
    events = [r for r in rows if "event" in r]
    assert [(e["event"], e["step"], e["lr_scale"]) for e in events] == [("lr_halved", 12, 0.5)]
    assert events[0]["loss"] > 10 * events[0]["recent_mean"]
    lrs = {r["step"]: r["train/lr"] for r in rows if "train/lr" in r}
    assert lrs[11] == pytest.approx(cfg.train.lr) and lrs[12] == lrs[13] == pytest.approx(cfg.train.lr / 2)


# The reference fixture's decoder (tests/fixtures/trm_parity/trm_A_config.json).
TRM_FIXTURE_SIZES = (
    "arch.hidden_size=64",
    "arch.num_heads=2",
    "arch.expansion=4",
    "arch.L_layers=2",
    "arch.L_cycles=1",
)


def test_pretrained_decoder_starts_from_the_trm_checkpoint(data, tmp_path):
    cfg = tiny_config(
        "SF5",
        data,
        *TRM_FIXTURE_SIZES,
        "train.max_steps=1",
        "train.ema=false",
        f"train.init_from={TRM_CHECKPOINT}",
    )
    run = train(cfg, tmp_path / "run", progress=False)
    reference = torch.load(TRM_CHECKPOINT, weights_only=True)
    trained = load_weights(run / "step-1" / "model.safetensors")
    prefix = "_orig_mod.model.inner."
    for key, value in reference.items():
        name = key.removeprefix(prefix)
        if name == "puzzle_emb.weights":
            assert not any("puzzle" in k for k in trained)
            continue
        # one AdamATan2 step moves a weight by at most about lr (here 5e-4 in warmup) plus weight decay
        assert (trained[f"decoder.{name}"] - value).abs().max() < 2e-3, name
    table = reference[prefix + "puzzle_emb.weights"]
    used = table[table.abs().sum(-1) > 0]
    row = read_metrics(run)[0]
    assert row["encoder/prefix_rms"] == pytest.approx(used.square().mean().sqrt().item(), rel=1e-6)


def test_a_trm_checkpoint_is_a_foreign_decoder(data, tmp_path, capsys):
    """Loaded exactly, with a warning that its training data is unknown; the run is not few-shot."""
    from etrm.distributed import init_distributed, shutdown
    from etrm.train.loop import Trainer

    cfg = tiny_config("SF2", data, *TRM_FIXTURE_SIZES, f"train.init_from={TRM_CHECKPOINT}")
    ctx = init_distributed()
    try:
        trainer = Trainer(cfg, tmp_path / "run", ctx, preset="SF2")
        trainer.logger.close()
    finally:
        shutdown(ctx)
    err = " ".join(capsys.readouterr().err.split())  # rich wraps long lines
    assert "its training data is unknown" in err and "trained on the evaluation puzzles' demos" in err
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert info["decoder_provenance"] == "foreign" and info["fewshot"] is False
    state = trainer.model.state_dict()
    reference = torch.load(TRM_CHECKPOINT, weights_only=True)
    for key, value in reference.items():
        name = key.removeprefix("_orig_mod.model.inner.")
        if name != "puzzle_emb.weights":
            assert torch.equal(state[f"decoder.{name}"], value), name


def test_a_decoder_descending_from_a_foreign_checkpoint_stays_not_few_shot(data, tmp_path, capsys):
    first = train(
        tiny_config(
            "SF5",
            data,
            *TRM_FIXTURE_SIZES,
            "train.max_steps=1",
            f"train.init_from={TRM_CHECKPOINT}",
            "logging.run_name=from-trm",
        ),
        tmp_path / "run-a",
        progress=False,
    )
    second = train(
        tiny_config("SF2", data, *TRM_FIXTURE_SIZES, "train.max_steps=1", f"train.init_from={first}"),
        tmp_path / "second",
        progress=False,
    )
    info = json.loads((second / "run_info.json").read_text())
    assert info["decoder_provenance"] == "etrm:from-trm" and info["fewshot"] is False
    assert "descends from a checkpoint of unknown training data" in " ".join(capsys.readouterr().err.split())


def test_cli_extends_a_finished_run(data, tmp_path, capsys):
    from etrm.cli import main

    run = tmp_path / "run"
    common = ["--set", f"data.path={data}", "--set", "arch.hidden_size=16", "--set", "arch.L_layers=1"]
    common += ["--set", "train.eval_interval=0", "--set", "arch.seq_len=36", "--set", "train.init_from=none"]
    main(
        [
            "train",
            "--preset",
            "SF5",
            "--size",
            "cpu-smoke",
            *common,
            "--set",
            "train.epochs=1",
            "--out",
            str(run),
        ]
    )
    assert "step-4" in capsys.readouterr().out  # one epoch = 16 episodes / batch 4
    main(["train", "--resume", str(run), "--set", "train.epochs=2", "--wandb", "disabled"])
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 9))  # each train row once, none repeated by the resume
    assert json.loads((run / "config.json").read_text())["train"]["epochs"] == 2
    assert json.loads((run / "run_info.json").read_text())["preset"] == "SF5"
    assert rows[-1]["epoch"] == 2.0


def test_eval_split_train_scores_the_groups_the_run_trained_on(data, tmp_path, capsys):
    """Train EM means the groups trained on: `etrm eval --split train` of a run on 2 of the 4 training
    puzzles scores those 2, says so, and matches the evaluation inside training and `etrm report`."""
    from etrm.cli import main
    from etrm.diagnose.runs import load_run
    from etrm.report.summary import summarize

    def cli(*args):
        try:
            main(list(args))
        except SystemExit as e:
            assert e.code == 0, capsys.readouterr().err
        return capsys.readouterr().out

    extra = ["data.max_train_groups=2", "train.eval_interval=1", "train.max_steps=4"]
    run = train(tiny_config("cpu-smoke", data, *extra), tmp_path / "run", progress=False)
    in_training = [r for r in read_metrics(run) if "eval/train_em" in r][-1]
    assert in_training["step"] == 4  # 2 groups × 4 pairs / batch 4 = 2 steps per epoch
    test_eval = (run / in_training["eval/results"]).read_text()

    text = " ".join(cli("eval", str(run), "--split", "train", "--no-vote").split())
    assert "scored the 2 training puzzles the run trained on (data.max_train_groups=2) of 4" in text
    results = json.loads((run / "eval" / "step-4-train" / "results.json").read_text())
    assert results["split"] == "train" and list(results["puzzles"]) == ["a000", "a001"]
    assert results["metrics"]["num_queries"] == 2
    assert results["metrics"]["train_em"] == in_training["eval/train_em"]
    assert summarize(load_run(run)).train_em == in_training["eval/train_em"]
    assert (run / in_training["eval/results"]).read_text() == test_eval  # the test evaluation stays

    everything = cli("eval", str(run), "--split", "train", "--no-vote", "--all-groups", "--json",
                     "--out", str(tmp_path / "all"))  # fmt: skip
    assert json.loads(everything)["num_puzzles"] == 4
    with pytest.raises(SystemExit) as error:
        main(["eval", str(run), "--all-groups"])
    assert error.value.code == 2 and "--all-groups goes with --split train" in capsys.readouterr().err
