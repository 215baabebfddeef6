"""Synthetic task families: valid grids, rules checked by hand, demos that determine the answer,
determinism, and hold-outs that share nothing with training."""

import hashlib
import json

import numpy as np
import pytest

from etrm.data import synth
from etrm.data.build import pair_key
from etrm.data.synth import FAMILIES, generate_puzzle, parse_grid_size, write_synthetic
from etrm.errors import EtrmError

G = np.array


def _rng(i: int) -> np.random.Generator:
    return np.random.default_rng([1234, i])


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_puzzle_is_valid_arc_and_its_demos_determine_the_answer(name):
    family = FAMILIES[name]
    lo, hi = 3, 12
    for i in range(25):
        puzzle = generate_puzzle(family, _rng(i), lo, hi)
        assert puzzle.family == name
        assert 3 <= len(puzzle.demos) <= 5 and 1 <= len(puzzle.queries) <= 2
        task = json.loads(json.dumps(puzzle.to_arc()))  # what lands on disk
        for pair in task["train"] + task["test"]:
            for grid in (pair["input"], pair["output"]):
                assert all(len(row) == len(grid[0]) for row in grid)  # rectangular
                assert lo <= len(grid) <= hi and lo <= len(grid[0]) <= hi
                assert all(isinstance(c, int) and 0 <= c <= 9 for row in grid for c in row)
        inputs = [x.tobytes() + bytes(x.shape) for x, _ in puzzle.demos + puzzle.queries]
        assert len(set(inputs)) == len(inputs)
        for x, y in puzzle.demos + puzzle.queries:
            assert x.shape != y.shape or (x != y).any()  # every pair shows the rule acting
            assert y.any()  # on an answer that is not all background
            np.testing.assert_array_equal(family.apply(x, puzzle.params), y)
        # From the demos alone: every parameter value consistent with them gives the query's output.
        for x, y in puzzle.queries:
            np.testing.assert_array_equal(family.solve(puzzle.demos, x, lo, hi), y)


def test_rules_match_hand_worked_examples():
    def rule(name, grid, **params):
        return FAMILIES[name].apply(G(grid), params).tolist()

    assert rule("colour_map", [[0, 1], [2, 1]], mapping={1: 5, 2: 1}) == [[0, 5], [1, 5]]
    assert rule("dihedral", [[1, 2, 3], [4, 5, 6]], dihedral=1) == [
        [3, 6],
        [2, 5],
        [1, 4],
    ]  # quarter turn ccw
    assert rule("dihedral", [[1, 2, 3], [4, 5, 6]], dihedral=4) == [[3, 2, 1], [6, 5, 4]]  # flip left-right
    assert rule("translate", [[1, 0, 0], [0, 2, 0], [0, 0, 3]], dy=1, dx=-1) == [
        [0, 0, 0],
        [0, 0, 0],
        [2, 0, 0],
    ]
    assert rule("gravity", [[1, 0], [0, 0], [2, 3]], direction="down") == [[0, 0], [1, 0], [2, 3]]
    assert rule("gravity", [[0, 1, 0, 2], [3, 0, 0, 0]], direction="left") == [[1, 2, 0, 0], [3, 0, 0, 0]]
    assert rule("gravity", [[0, 1, 0, 2], [3, 0, 0, 0]], direction="right") == [[0, 0, 1, 2], [0, 0, 0, 3]]
    assert rule("gravity", [[1, 0], [0, 0], [2, 3]], direction="up") == [[1, 3], [2, 0], [0, 0]]
    assert rule("scale", [[1, 2]], factor=2) == [[1, 1, 2, 2], [1, 1, 2, 2]]
    assert rule("border", [[0, 0, 0], [0, 4, 0], [5, 0, 0]], colour=7) == [[7, 7, 7], [7, 4, 7], [7, 7, 7]]
    # Two 2-cell objects of colour 1 and one 3-cell object of colour 2 (diagonals don't connect).
    assert rule("recolour_largest", [[1, 1, 0, 2], [0, 0, 0, 2], [1, 0, 0, 2], [0, 1, 0, 0]], colour=6) == [
        [1, 1, 0, 6],
        [0, 0, 0, 6],
        [1, 0, 0, 6],
        [0, 1, 0, 0],
    ]
    # The left room is closed; the right one leaks through its gap to the edge.
    walls = [[3, 3, 3, 0, 3, 3], [3, 0, 3, 0, 3, 0], [3, 3, 3, 0, 3, 3]]
    assert rule("fill_enclosed", walls, colour=8) == [
        [3, 3, 3, 0, 3, 3],
        [3, 8, 3, 0, 3, 0],
        [3, 3, 3, 0, 3, 3],
    ]
    assert rule("mirror_complete", [[1, 2, 0, 0], [3, 4, 4, 3]], axis="lr") == [[1, 2, 2, 1], [3, 4, 4, 3]]
    assert rule("mirror_complete", [[1, 2], [0, 0], [5, 6], [1, 2]], axis="ud") == [
        [1, 2],
        [5, 6],
        [5, 6],
        [1, 2],
    ]
    assert (
        rule("mirror_complete", [[1, 2, 2, 1], [0, 5, 5, 6], [6, 5, 5, 6], [1, 2, 2, 1]], axis="both")[1][0]
        == 6
    )
    assert rule("crop_object", [[0, 0, 0, 4], [0, 5, 0, 0], [0, 5, 5, 0]], colour=5) == [[5, 0], [5, 5]]


def test_undetermined_demos_are_recognised():
    demos = [(G([[1, 2]]), G([[3, 4]])), (G([[2, 1]]), G([[4, 3]]))]
    assert FAMILIES["colour_map"].solve(demos, G([[1, 5]]), 1, 5) is None  # colour 5 never shown
    assert FAMILIES["colour_map"].solve(demos, G([[2, 2]]), 1, 5).tolist() == [[4, 4]]
    conflicting = [(G([[1, 1]]), G([[3, 4]]))]
    assert FAMILIES["colour_map"].solve(conflicting, G([[1]]), 1, 5) is None
    # A grid symmetric under every transform tells the dihedral rules apart nowhere.
    uniform = [(G([[1, 1], [1, 1]]), G([[1, 1], [1, 1]]))]
    assert FAMILIES["dihedral"].solve(uniform, G([[1, 2], [3, 4]]), 1, 5) is None
    one_turn = [(G([[1, 2], [3, 4]]), G([[2, 4], [1, 3]]))]
    assert FAMILIES["dihedral"].solve(one_turn, G([[5, 6]]), 1, 5).tolist() == [[6], [5]]


def _files(root):
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file()
    }


def test_same_seed_same_files_and_another_seed_differs(tmp_path):
    kwargs = dict(families=["gravity", "crop_object", "colour_map"], train_per_family=6, test_per_family=3)
    write_synthetic(tmp_path / "a", seed=5, **kwargs)
    write_synthetic(tmp_path / "b", seed=5, **kwargs)
    write_synthetic(tmp_path / "c", seed=6, **kwargs)
    a, b, c = (_files(tmp_path / n) for n in "abc")
    assert a == b
    assert len(a) == 3 * (6 + 3) + 1
    assert sum(a[k] != c[k] for k in a) > len(a) // 2


def _load_split(root, split):
    tasks = {}
    for path in sorted((root / split).glob("*.json")):
        tasks[path.stem] = json.loads(path.read_text())
    return tasks


def _pairs(tasks):
    return [(G(p["input"]), G(p["output"])) for t in tasks.values() for p in t["train"] + t["test"]]


def _shared(train, test):
    """Test pairs found in training: exactly, or up to rotation/reflection/colour permutation."""
    exact = [{json.dumps([x.tolist(), y.tolist()]) for x, y in _pairs(side)} for side in (train, test)]
    augmented = [{pair_key(x, y) for x, y in _pairs(side)} for side in (train, test)]
    return (exact[0] & exact[1]) | (augmented[0] & augmented[1])


def test_instance_holdout_shares_no_grid_with_training(tmp_path):
    # Tiny grids with few colours make collisions likely; the generator must redraw them.
    manifest = write_synthetic(
        tmp_path / "s",
        families=["border", "scale"],
        train_per_family=80,
        test_per_family=40,
        grid_size=(3, 6),
    )
    train, test = _load_split(tmp_path / "s", "train"), _load_split(tmp_path / "s", "test")
    assert len(train) == 160 and len(test) == 80
    assert not _shared(train, test)
    assert manifest["families"] == {"train": ["border", "scale"], "test": ["border", "scale"]}
    for tid, info in manifest["tasks"].items():
        assert info["family"] == synth.family_of(tid)
        task = (train | test)[tid]
        family = FAMILIES[info["family"]]
        for pair in task["train"] + task["test"]:
            assert family.apply(G(pair["input"]), info["params"]).tolist() == pair["output"]


def test_family_holdout_trains_on_none_of_the_test_families(tmp_path):
    families = ["colour_map", "gravity", "translate", "border"]
    manifest = write_synthetic(
        tmp_path / "f", families=families, train_per_family=5, test_per_family=4, holdout="families"
    )
    assert manifest["families"] == {"train": ["colour_map", "gravity"], "test": ["translate", "border"]}
    train, test = _load_split(tmp_path / "f", "train"), _load_split(tmp_path / "f", "test")
    assert {synth.family_of(t) for t in train} == {"colour_map", "gravity"}
    assert {synth.family_of(t) for t in test} == {"translate", "border"}
    assert not _shared(train, test)
    chosen = write_synthetic(
        tmp_path / "g",
        families=families,
        train_per_family=2,
        test_per_family=2,
        holdout="families",
        test_families=["gravity"],
    )
    assert chosen["families"] == {"train": ["colour_map", "translate", "border"], "test": ["gravity"]}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(families=["nope"]), "unknown family 'nope'"),
        (dict(families=["scale"], grid_size=(5, 9)), "'scale' cannot make grids"),
        (dict(holdout="random"), "--holdout 'random'"),
        (dict(test_families=["gravity"]), "--test-families only applies"),
        (
            dict(holdout="families", families=["gravity", "border"], test_families=["scale"]),
            "scale not among",
        ),
        (dict(holdout="families", families=["gravity"]), "no family left to train on"),
        (dict(train_per_family=0), "at least 1"),
    ],
)
def test_bad_options_are_named_and_write_nothing(tmp_path, kwargs, message):
    with pytest.raises(EtrmError, match=message):
        write_synthetic(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_grid_size_parsing_and_existing_folder():
    assert parse_grid_size("3..12") == (3, 12) and parse_grid_size("7") == (7, 7)
    for bad in ("12..3", "0..4", "3..31", "a..b"):
        with pytest.raises(EtrmError, match="--grid-size"):
            parse_grid_size(bad)


def test_cli_writes_a_folder_and_refuses_to_overwrite(tmp_path, capsys):
    from etrm.cli import main

    out = tmp_path / "cli"
    args = [
        "data",
        "synth",
        "--out",
        str(out),
        "--families",
        "dihedral,fill_enclosed",
        "--train-puzzles",
        "3",
    ]
    main([*args, "--test-puzzles", "2", "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert [(r["family"], r["train"], r["test"]) for r in rows] == [
        ("dihedral", 3, 2),
        ("fill_enclosed", 3, 2),
    ]
    assert len(list((out / "train").glob("*.json"))) == 6 and len(list((out / "test").glob("*.json"))) == 4
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert "already exists" in capsys.readouterr().err
