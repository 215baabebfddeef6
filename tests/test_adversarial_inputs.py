"""Adversarial inputs (issue 15, data/eval/report/config half): every user error is one line on stderr and
exit 2, never a traceback, and no command deletes what it did not write."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from diagnose_run_folders import make_run
from eval_fixtures import hand_made

from etrm.cli import main
from etrm.config import RunConfig, apply_overrides
from etrm.data.build import BuildOptions, build_dataset, pair_key
from etrm.data.dataset import ArcDataset
from etrm.errors import EtrmError
from etrm.io import atomic_dir, output_lock
from etrm.report.build import build_report

REPO = Path(__file__).resolve().parents[1]


def task(seed: int, pairs: int = 3) -> dict:
    """A random ARC task whose rule is a vertical flip."""
    rng = np.random.default_rng(seed)

    def pair():
        h, w = rng.integers(2, 6, 2)
        grid = rng.integers(0, 10, (h, w))
        return {"input": grid.tolist(), "output": np.flipud(grid).tolist()}

    return {"train": [pair() for _ in range(pairs - 1)], "test": [pair()]}


def write_tasks(folder: Path, tasks: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for task_id, content in tasks.items():
        (folder / f"{task_id}.json").write_text(json.dumps(content))
    return folder


@pytest.fixture
def sources(tmp_path):
    train = write_tasks(tmp_path / "train", {f"tr{i}": task(i) for i in range(4)})
    test = write_tasks(tmp_path / "test", {f"te{i}": task(50 + i) for i in range(3)})
    return train, test


def build(train, test, out, **kwargs) -> dict:
    return build_dataset(BuildOptions([str(train)], [str(test)], Path(out), **{"num_aug": 4, **kwargs}))


def build_args(train, test, out, *extra) -> list:
    return [
        "data",
        "build",
        "--train-source",
        train,
        "--test-source",
        test,
        "--out",
        out,
        "--num-aug",
        4,
        *extra,
    ]


def etrm(capsys, *args) -> tuple[int, str, str]:
    """`etrm ARGS` in this process: (exit status, stdout, stderr). A traceback would raise here instead."""
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_refused(capsys, culprit: str, *args) -> str:
    """Exit 2 with exactly one line on stderr that names `culprit`."""
    code, _, err = etrm(capsys, *args)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and culprit in lines[0] and "Traceback" not in err, (code, err)
    return lines[0]


def hidden_entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ----------------------------------------------------------------------------- the table of bad inputs


def eval_out_run(tmp_path, sources, monkeypatch):
    run = make_run(tmp_path, "A", test_em=[0.1])
    return (
        ["eval", "--from-predictions", predictions_file(tmp_path), "--out", run],
        str(run),
        run / "metrics.jsonl",
    )


def eval_out_parent(tmp_path, sources, monkeypatch):
    run = make_run(tmp_path, "A", test_em=[0.1])
    (run / "sub").mkdir()
    monkeypatch.chdir(run / "sub")
    return (
        ["eval", "--from-predictions", predictions_file(tmp_path), "--out", ".."],
        "--out ..",
        run / "config.json",
    )


def eval_out_here(tmp_path, sources, monkeypatch):
    run = make_run(tmp_path, "A", test_em=[0.1])
    monkeypatch.chdir(run)
    return (
        ["eval", "--from-predictions", predictions_file(tmp_path), "--out", "."],
        "--out .",
        run / "config.json",
    )


def build_over_other_folder(tmp_path, sources, monkeypatch):
    other = tmp_path / "notes"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    return build_args(*sources, other, "--overwrite"), str(other), other / "notes.txt"


def build_over_a_file(tmp_path, sources, monkeypatch):
    file = tmp_path / "thesis.tex"
    file.write_text("keep me")
    return build_args(*sources, file, "--overwrite"), str(file), file


def build_over_its_source(tmp_path, sources, monkeypatch):
    train, test = sources
    return (
        build_args(train, test, train, "--overwrite"),
        f"--out {train}: holds the source",
        train / "tr0.json",
    )


def build_over_a_folder_holding_its_source(tmp_path, sources, monkeypatch):
    train, test = sources
    return build_args(train, test, tmp_path, "--overwrite"), f"holds the source {train}", train / "tr0.json"


def build_over_the_current_folder(tmp_path, sources, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return build_args(*sources, ".", "--overwrite"), "--out .: is the current folder", None


def synth_over_other_folder(tmp_path, sources, monkeypatch):
    other = tmp_path / "notes"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    args = ["data", "synth", "--out", other, "--overwrite", "--train-puzzles", 1, "--test-puzzles", 1]
    return args, str(other), other / "notes.txt"


def report_over_foreign_files(tmp_path, sources, monkeypatch):
    run = make_run(tmp_path, "A", test_em=[0.1])
    out = tmp_path / "docs"
    out.mkdir()
    (out / "report.md").write_text("# my notes\n")
    (out / "notes.txt").write_text("keep me")
    return ["report", run, "--out", out], str(out), out / "notes.txt"


def build_negative_max_puzzles(tmp_path, sources, monkeypatch):
    return build_args(*sources, tmp_path / "ds", "--max-puzzles", -1), "--max-puzzles -1", None


def build_negative_seed(tmp_path, sources, monkeypatch):
    return build_args(*sources, tmp_path / "ds", "--seed", -1), "--seed -1", None


def synth_negative_seed(tmp_path, sources, monkeypatch):
    return ["data", "synth", "--out", tmp_path / "syn", "--seed", -1], "--seed -1", None


def deeply_nested_task(tmp_path, sources, monkeypatch):
    train, test = sources
    (train / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    return build_args(train, test, tmp_path / "ds"), "deep.json", None


def dangling_symlink(tmp_path, sources, monkeypatch):
    train, test = sources
    (train / "ghost.json").symlink_to(tmp_path / "nowhere.json")
    return build_args(train, test, tmp_path / "ds"), "ghost.json", None


def kaggle_solutions_list(tmp_path, sources, monkeypatch):
    kaggle = tmp_path / "kaggle"
    kaggle.mkdir()
    challenge = task(7)
    challenge["test"] = [{"input": challenge["test"][0]["input"]}]
    (kaggle / "x_challenges.json").write_text(json.dumps({"k1": challenge}))
    (kaggle / "x_solutions.json").write_text(json.dumps([[[1]]]))
    return build_args(kaggle / "x_challenges.json", sources[1], tmp_path / "ds"), "x_solutions.json", None


def verify_out_of_range_tokens(tmp_path, sources, monkeypatch):
    return ["data", "verify", corrupt_tokens(tmp_path, sources)], "tokens.npy", None


def flipped_predictions(tmp_path, sources, monkeypatch):
    path = predictions_file(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[raw.find(b"PK\x01\x02") + 10] ^= 0x55  # the first member's compression method (central directory)
    path.write_bytes(bytes(raw))
    return ["eval", "--from-predictions", path], str(path), None


def predictions_with_unknown_grid_ids(tmp_path, sources, monkeypatch):
    arrays = hand_made()._arrays()
    arrays["grid_ids"][0, 0] = 999  # the grid table has 6 grids
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    return ["eval", "--from-predictions", path], str(path), None


def sweep_bad_override(tmp_path, sources, monkeypatch):
    return ["sweep", "semi-final", "--decoder", "none", "--set", "train.lr=0"], "train.lr", None


CASES = [
    eval_out_run,
    eval_out_parent,
    eval_out_here,
    build_over_other_folder,
    build_over_a_file,
    build_over_its_source,
    build_over_a_folder_holding_its_source,
    build_over_the_current_folder,
    synth_over_other_folder,
    report_over_foreign_files,
    build_negative_max_puzzles,
    build_negative_seed,
    synth_negative_seed,
    deeply_nested_task,
    dangling_symlink,
    kaggle_solutions_list,
    verify_out_of_range_tokens,
    flipped_predictions,
    predictions_with_unknown_grid_ids,
    sweep_bad_override,
]


def predictions_file(tmp_path: Path) -> Path:
    path = tmp_path / "predictions.npz"
    hand_made().save(path)
    return path


def corrupt_tokens(tmp_path: Path, sources) -> Path:
    """A built dataset whose train/tokens.npy holds a token above 11 (manifest checksum updated to match)."""
    out = tmp_path / "ds"
    build(*sources, out)
    tokens = np.load(out / "train" / "tokens.npy")
    tokens[0, 0] = 200
    np.save(out / "train" / "tokens.npy", tokens)
    return out


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_bad_input_is_one_line_exit_2_and_nothing_is_lost(case, capsys, tmp_path, sources, monkeypatch):
    args, culprit, kept = case(tmp_path, sources, monkeypatch)
    before = kept.read_bytes() if kept is not None else None
    assert_refused(capsys, culprit, *args)
    if kept is not None:
        assert kept.read_bytes() == before


# ----------------------------------------------------------------------------- config: one validate()

BAD_VALUES = [
    ("train.max_steps", "-5"),
    ("arch.halt_exploration_prob", "2"),
    ("arch.L_layers", "0"),
    ("arch.H_cycles", "0"),
    ("arch.L_cycles", "0"),
    ("arch.num_heads", "0"),
    ("arch.num_heads", "3"),
    ("arch.context_len", "0"),
    ("arch.context_len", "17"),
    ("data.max_demos", "0"),
    ("arch.vocab_size", "5"),
    ("arch.expansion", "0"),
    ("arch.seq_len", "120"),
    ("train.beta1", "5"),
    ("train.beta2", "1"),
    ("train.weight_decay", "-5"),
    ("train.lr", "1e39"),
    ("train.lr", "1e38"),
    ("train.lr", "2"),
    ("train.puzzle_emb_lr", "1e30"),
    ("train.lr", "0"),
    ("train.lr", "nan"),
    ("train.eval_num_aug", "-1"),
    ("train.global_batch_size", "0"),
    ("train.seed", "-1"),
    ("arch.encoder_num_layers", "0"),
    ("arch.encoder_hidden_size", "30"),
    ("arch.kl_weight", "-1"),
    ("arch.rms_norm_eps", "0"),
    ("arch.forward_dtype", "float16"),
    ("train.grad_clip", "-1"),
    ("train.max_minutes", "inf"),
    ("data.max_train_groups", "-1"),
    ("logging.log_interval", "0"),
]


@pytest.mark.parametrize(("key", "value"), BAD_VALUES)
def test_config_validate_names_the_key_and_its_range(key, value):
    with pytest.raises(EtrmError, match=rf"^{key} must be .*, got "):
        apply_overrides(RunConfig(), [f"{key}={value}"])


@pytest.mark.parametrize(
    ("key", "value"), [("train.max_steps", "-5"), ("arch.num_heads", "0"), ("train.lr", "1e39")]
)
def test_train_refuses_a_bad_value_before_anything_runs(key, value, capsys, tmp_path):
    run = tmp_path / "run"
    line = assert_refused(
        capsys, key, "train", "--preset", "cpu-smoke", "--set", f"{key}={value}", "--out", run
    )
    assert "must be" in line and not run.exists()


def test_cell_lookup_with_the_puzzle_table_is_a_config_error():
    with pytest.raises(EtrmError, match="arch.cell_lookup must be false with encoder_type puzzle_embedding"):
        apply_overrides(RunConfig(), ["arch.encoder_type=puzzle_embedding", "arch.cell_lookup=true"])


# ----------------------------------------------------------------------------- outputs: own or empty only


def test_eval_replaces_its_own_output_but_not_files_added_to_it(capsys, tmp_path):
    npz, out = predictions_file(tmp_path), tmp_path / "eval"
    for _ in range(2):  # writing twice replaces the first output
        code, _, err = etrm(capsys, "eval", "--from-predictions", npz, "--out", out)
        assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == [
        "predictions.npz",
        "results.json",
        "submission.csv",
        "submission.json",
    ]
    (out / "notes.txt").write_text("mine")
    line = assert_refused(capsys, str(out), "eval", "--from-predictions", npz, "--out", out)
    assert "notes.txt" in line and (out / "notes.txt").read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert etrm(capsys, "eval", "--from-predictions", npz, "--out", empty)[0] == 0
    assert (empty / "results.json").is_file()


def test_build_overwrite_replaces_a_dataset_but_not_files_added_to_it(capsys, sources, tmp_path):
    out = tmp_path / "ds"
    build(*sources, out)
    build(*sources, out, overwrite=True, seed=3)
    assert ArcDataset.open(out).manifest["seed"] == 3
    (out / "train" / "notes.txt").write_text("mine")
    line = assert_refused(capsys, str(out), *build_args(*sources, out, "--overwrite"))
    assert "train/notes.txt" in line and (out / "train" / "notes.txt").is_file()


def test_report_replaces_its_own_folder_only(tmp_path):
    run = make_run(tmp_path, "A", test_em=[0.1])
    out = tmp_path / "report"
    build_report([run], out)
    build_report([run], out)  # its own output: replaced
    (out / "draft.md").write_text("mine")
    with pytest.raises(EtrmError, match="draft.md"):
        build_report([run], out)
    assert (out / "draft.md").read_text() == "mine"


def test_report_labels_runs_that_share_a_name_by_their_folders(tmp_path):
    runs = [make_run(tmp_path, folder, test_em=[em]) for folder, em in (("lr3", 0.2), ("lr4", 0.3))]
    for run in runs:  # one preset, two overrides: both runs are called SF1
        (run / "run_info.json").write_text(json.dumps({"name": "SF1", "preset": "SF1", "num_params": 10}))
    report = build_report(runs, tmp_path / "report")
    names = [r["name"] for r in json.loads((tmp_path / "report" / "summary.json").read_text())["runs"]]
    assert sorted(names) == ["lr3", "lr4"] and report.selection.winner == "lr4"


# ----------------------------------------------------------------------------- killed and concurrent builds

CHILD = """
import os, sys, time
from pathlib import Path
import etrm.data.build as b
mode, ready, train, test, out = sys.argv[1:]
if mode == "kill":  # die (as with SIGKILL) half-way through writing the files
    calls = []
    real = b.atomic_write_bytes
    def dying(path, data):
        calls.append(path)
        if len(calls) == 5:
            os._exit(9)
        real(path, data)
    b.atomic_write_bytes = dying
else:  # hold the build (and its lock) until killed
    real_load = b.load_source
    def slow(spec):
        Path(ready).write_text("ready")
        time.sleep(120)
        return real_load(spec)
    b.load_source = slow
b.build_dataset(b.BuildOptions([train], [test], Path(out), num_aug=4))
"""


def child(mode: str, sources, out: Path, ready: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, mode, str(ready), *map(str, sources), str(out)], env=env, cwd=REPO
    )


def test_a_killed_build_leaves_no_litter_after_the_next_build(sources, tmp_path):
    data = tmp_path / "data"
    proc = child("kill", sources, data / "ds", tmp_path / "ready")
    assert proc.wait(timeout=120) == 9
    assert any(name.startswith(".ds.tmp-") for name in hidden_entries(data))  # what the kill left
    build(*sources, data / "ds")
    assert sorted(p.name for p in data.iterdir()) == ["ds"]
    assert hidden_entries(data / "ds") == [] and ArcDataset.open(data / "ds").split("train")


def test_a_second_build_into_the_same_folder_is_refused(capsys, sources, tmp_path):
    out, ready = tmp_path / "ds", tmp_path / "ready"
    proc = child("hold", sources, out, ready)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        line = assert_refused(capsys, str(out.absolute()), *build_args(*sources, out))
        assert "another etrm process is writing it" in line
    finally:
        proc.kill()
        proc.wait()
    build(*sources, out)  # the kernel dropped the dead holder's lock
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "ready", "test", "train"]


def test_output_lock_removes_only_the_stale_temps_of_its_folder(tmp_path):
    names = [
        ".ds.tmp-k3x_9",
        ".ds.old-4242",
        ".ds-b.tmp-k3x_9",
        ".ds.tmp-x.tmp-y",
        "ds.tmp-abc",
        ".d.tmp-k3x",
    ]
    for name in names:
        (tmp_path / name).mkdir()
    with output_lock(tmp_path / "ds"):
        with output_lock(tmp_path / "ds"):  # re-entrant within one process
            assert (tmp_path / ".ds.etrm-lock").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[2:])


def test_atomic_dir_makes_missing_parents_with_and_without_an_output_kind(tmp_path):
    from etrm.eval.results import EVAL_OUTPUT

    for output in (None, EVAL_OUTPUT):
        final = tmp_path / str(output is None) / "deep" / "out"
        with atomic_dir(final, output=output) as tmp:
            (tmp / "results.json").write_text("{}")
        assert (final / "results.json").is_file() and hidden_entries(final.parent) == []


# ----------------------------------------------------------------------------- leakage guard and sources


def test_leakage_guard_catches_a_recolouring_that_moves_0_and_a_swapped_pair(sources, tmp_path):
    train, test = sources
    leaked = json.loads((test / "te1.json").read_text())["train"][0]
    inp, outp = np.array(leaked["input"]), np.array(leaked["output"])
    moves_zero = np.array([5, 0, 9, 1, 2, 3, 4, 6, 7, 8])  # 0 → 5, 1 → 0, 2 → 9, ...
    recoloured = {"input": np.rot90(moves_zero[inp]).tolist(), "output": np.rot90(moves_zero[outp]).tolist()}
    swapped = {"input": leaked["output"], "output": leaked["input"]}
    write_tasks(
        train, {"recoloured": {**task(90), "test": [recoloured]}, "swapped": {**task(91), "test": [swapped]}}
    )
    manifest = build(train, test, tmp_path / "ds")
    caught = {d["task"]: d["matches"] for d in manifest["dropped_for_leakage"]}
    assert caught == {"recoloured": ["te1"], "swapped": ["te1"]}


def test_pair_key_is_invariant_exactly_under_symmetries_recolourings_and_swaps():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 10, (3, 4)).astype(np.uint8), rng.integers(0, 10, (4, 2)).astype(np.uint8)
    perm = rng.permutation(10).astype(np.uint8)
    key = pair_key(a, b)
    assert pair_key(perm[a].T, perm[b].T) == key  # transpose + a permutation moving 0
    assert pair_key(b, a) == key and pair_key(a.astype(np.int64), b.astype(np.int64)) == key
    other = b.copy()
    other[0, 0] = (other[0, 0] + 1) % 10
    assert pair_key(a, other) != key and pair_key(a, a) != key


def test_symlinked_sub_folders_are_followed_and_link_loops_end(sources, tmp_path):
    train, test = sources
    elsewhere = write_tasks(tmp_path / "elsewhere" / "more", {"linked": task(70)})
    (train / "more").symlink_to(elsewhere, target_is_directory=True)
    (train / "loop").symlink_to(train, target_is_directory=True)
    manifest = build(train, test, tmp_path / "ds")
    assert ArcDataset.open(tmp_path / "ds").split("train").puzzle_ids == [
        "linked",
        "tr0",
        "tr1",
        "tr2",
        "tr3",
    ]
    assert manifest["counts"]["train"]["puzzles"] == 5


def test_out_of_range_tokens_stop_the_dataset_open_that_training_does(sources, tmp_path):
    dataset = ArcDataset.open(corrupt_tokens(tmp_path, sources))
    with pytest.raises(EtrmError, match=r"train/tokens.npy: not 900 tokens per grid in 0-11"):
        dataset.split("train")
