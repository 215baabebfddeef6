import json

import numpy as np
import pytest
import torch

from etrm.data.build import BuildOptions, build_dataset
from etrm.data.dataset import ArcDataset
from etrm.data.encoding import IGNORE_LABEL_ID, decode_grid, encode_grid, labels_from_tokens
from etrm.data.episodes import EpisodeSampler, to_device
from etrm.errors import EtrmError


def task(seed, num_train, num_test):
    rng = np.random.default_rng(seed)

    def pair():
        grid = rng.integers(0, 10, rng.integers(1, 9, 2))
        return {"input": grid.tolist(), "output": np.tile(grid, (1, 2)).tolist()}

    return {"train": [pair() for _ in range(num_train)], "test": [pair() for _ in range(num_test)]}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("episodes")
    for side, count, offset in (("train", 7, 0), ("test", 5, 100)):
        (root / side).mkdir()
        for i in range(count):
            # group sizes vary; one training puzzle has 12 pairs so that demos exceed max_demos
            num_train = 11 if (side, i) == ("train", 3) else 2 + i % 3
            (root / side / f"{side}{i}.json").write_text(json.dumps(task(offset + i, num_train, 1 + i % 2)))
    build_dataset(BuildOptions([str(root / "train")], [str(root / "test")], root / "ds", num_aug=6))
    return ArcDataset.open(root / "ds")


def expected_episode(split, g, query, aug, demo_pairs, max_demos, translate=None):
    """Reference built from the public Split API: augment each grid, then encode it."""
    pairs = split.pairs(g)

    def tokens(grid):
        return encode_grid(split.augment_grid(grid, g, aug)).astype(np.int64)

    demo_in = np.zeros((max_demos, 900), np.int64)
    demo_out = np.zeros((max_demos, 900), np.int64)
    for slot, p in enumerate(demo_pairs[:max_demos]):
        demo_in[slot], demo_out[slot] = tokens(pairs[p][0]), tokens(pairs[p][1])
    return tokens(pairs[query][0]), labels_from_tokens(tokens(pairs[query][1])), demo_in, demo_out


def test_train_batches_are_leave_one_out_episodes(dataset):
    split = dataset.split("train")
    sampler = EpisodeSampler(split, batch_size=8, mode="train", max_demos=4, seed=1)
    assert sampler.num_episodes == sum(split.num_pairs(g) for g in range(len(split)))
    assert len(sampler) == -(-sampler.num_episodes // 8)
    seen = set()
    for batch in sampler:
        assert batch["inputs"].shape == (8, 900) and batch["demo_inputs"].shape == (8, 4, 900)
        for key in (
            "inputs",
            "labels",
            "demo_inputs",
            "demo_outputs",
            "puzzle_identifiers",
            "group_ids",
            "aug_ids",
            "query_ids",
        ):
            assert batch[key].dtype == torch.int64, key
        assert batch["demo_mask"].dtype == torch.bool and batch["valid"].all()
        for row in range(8):
            g, q, a = (int(batch[k][row]) for k in ("group_ids", "query_ids", "aug_ids"))
            seen.add((g, q))
            assert 0 <= a < split.num_augs(g)
            others = [p for p in range(split.num_pairs(g)) if p != q]
            inputs, labels, demo_in, demo_out = expected_episode(split, g, q, a, others, 4)
            np.testing.assert_array_equal(batch["inputs"][row].numpy(), inputs)
            np.testing.assert_array_equal(batch["labels"][row].numpy(), labels)
            np.testing.assert_array_equal(batch["demo_inputs"][row].numpy(), demo_in)
            np.testing.assert_array_equal(batch["demo_outputs"][row].numpy(), demo_out)
            assert batch["demo_mask"][row].tolist() == [i < min(len(others), 4) for i in range(4)]
            assert int(batch["puzzle_identifiers"][row]) == split.puzzle_identifier(g, a)
    # every (puzzle, pair) is a query once per epoch (the last batch is topped up from the start)
    assert seen == {(g, q) for g in range(len(split)) for q in range(split.num_pairs(g))}
    assert (labels == IGNORE_LABEL_ID).any()


def test_eval_enumerates_every_query_and_augmentation_once(dataset):
    split = dataset.split("test")
    sampler = EpisodeSampler(split, batch_size=7, mode="eval", max_demos=10, num_aug=4)
    rows = []
    for batch in sampler:
        for r in range(7):
            key = tuple(int(batch[k][r]) for k in ("group_ids", "query_ids", "aug_ids"))
            if batch["valid"][r]:
                rows.append(key)
                g, q, a = key
                demos = list(range(split.num_pairs(g) - split.num_queries(g)))
                inputs, labels, demo_in, _ = expected_episode(split, g, len(demos) + q, a, demos, 10)
                np.testing.assert_array_equal(batch["inputs"][r].numpy(), inputs)
                np.testing.assert_array_equal(batch["labels"][r].numpy(), labels)
                np.testing.assert_array_equal(batch["demo_inputs"][r].numpy(), demo_in)
                # de-augmenting the label gives back the original query output
                restored = split.invert_grid(decode_grid(batch["labels"][r].clamp(min=0).numpy()), g, a)
                np.testing.assert_array_equal(restored, split.queries(g)[q][1])
    expected = [(g, q, a) for g in range(len(split)) for q in range(split.num_queries(g)) for a in range(4)]
    assert rows == expected
    assert len(sampler) * 7 - len(expected) == sum(1 for b in sampler for v in b["valid"] if not v)


def test_ranks_split_each_global_batch(dataset):
    split = dataset.split("train")
    whole = list(EpisodeSampler(split, batch_size=6, mode="train", seed=3))
    shards = [
        list(EpisodeSampler(split, batch_size=2, mode="train", seed=3, rank=r, world_size=3))
        for r in range(3)
    ]
    assert len(whole) == len(shards[0])
    for step, batch in enumerate(whole):
        for key in ("inputs", "labels", "demo_inputs", "aug_ids"):
            torch.testing.assert_close(torch.cat([shards[r][step][key] for r in range(3)]), batch[key])
    eval_shards = [EpisodeSampler(dataset.split("test"), 3, "eval", rank=r, world_size=2) for r in range(2)]
    assert len(eval_shards[0]) == len(eval_shards[1])
    keys = [
        tuple(int(b[k][i]) for k in ("group_ids", "query_ids", "aug_ids"))
        for s in eval_shards
        for b in s
        for i in range(3)
        if b["valid"][i]
    ]
    assert len(keys) == len(set(keys)) == eval_shards[0].num_episodes


def test_state_dict_resumes_exactly(dataset):
    split = dataset.split("train")
    reference = EpisodeSampler(split, 4, "train", seed=5, num_aug=3)
    stream = [b for _ in range(2) for b in reference]  # two epochs
    interrupted = EpisodeSampler(split, 4, "train", seed=5, num_aug=3)
    iterator = iter(interrupted)
    for _ in range(3):
        next(iterator)
    state = interrupted.state_dict()
    resumed = EpisodeSampler(split, 4, "train", seed=5, num_aug=3)
    resumed.load_state_dict(state)
    rest = list(resumed) + list(resumed)
    assert len(rest) == len(stream) - 3
    for a, b in zip(stream[3:], rest, strict=True):
        torch.testing.assert_close(a["inputs"], b["inputs"])
        torch.testing.assert_close(a["aug_ids"], b["aug_ids"])
    assert int(torch.cat([b["aug_ids"] for b in stream]).max()) < 3
    assert not torch.equal(
        stream[0]["group_ids"], stream[len(reference)]["group_ids"]
    )  # a new order per epoch
    with pytest.raises(EtrmError, match="seed"):
        EpisodeSampler(split, 4, "train", seed=6, num_aug=3).load_state_dict(state)


def test_translation_keeps_pairs_on_canvas(dataset):
    split = dataset.split("train")
    sampler = EpisodeSampler(split, 16, "train", translate=True, seed=2)
    moved = 0
    for batch in sampler:
        for r in range(16):
            g, q, a = (int(batch[k][r]) for k in ("group_ids", "query_ids", "aug_ids"))
            grid_in, grid_out = (split.augment_grid(x, g, a) for x in split.pairs(g)[q])
            canvas_in = batch["inputs"][r].view(30, 30).numpy()
            rows, cols = np.nonzero(canvas_in >= 2)
            top, left = rows.min(), cols.min()
            moved += top > 0 or left > 0
            np.testing.assert_array_equal(
                canvas_in[top : top + grid_in.shape[0], left : left + grid_in.shape[1]] - 2, grid_in
            )
            assert (canvas_in >= 2).sum() == grid_in.size
            canvas_out = batch["labels"][r].view(30, 30).numpy()
            np.testing.assert_array_equal(
                canvas_out[top : top + grid_out.shape[0], left : left + grid_out.shape[1]] - 2, grid_out
            )
            h, w = grid_out.shape
            assert (canvas_out == 1).sum() == w * (top + h < 30) + h * (left + w < 30)
            assert (canvas_out == 1)[top + h, left : left + w].all() if top + h < 30 else True
    assert moved > 0
    # evaluation never translates
    batch = next(iter(EpisodeSampler(dataset.split("test"), 4, "eval", translate=True)))
    assert all(decode_grid(row.numpy()) is not None for row in batch["inputs"])


@pytest.mark.parametrize(("split", "mode", "translate"), [("train", "train", True), ("test", "eval", False)])
def test_compact_batches_widened_on_the_device_equal_int64_batches(dataset, split, mode, translate):
    kwargs = dict(batch_size=8, mode=mode, translate=translate, seed=3, max_demos=2)
    wide = list(EpisodeSampler(dataset.split(split), **kwargs))
    compact = list(EpisodeSampler(dataset.split(split), compact=True, **kwargs))
    assert len(wide) == len(compact) > 1
    assert compact[0]["inputs"].dtype == torch.uint8 and (compact[0]["labels"] == 0).any()
    for a, b in zip(wide, compact, strict=True):
        b = to_device(b, "cpu")
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].dtype == b[key].dtype, key
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    assert (to_device(compact[0], "cpu")["labels"] == IGNORE_LABEL_ID).any()


def test_bad_arguments(dataset):
    split = dataset.split("train")
    with pytest.raises(EtrmError, match="mode"):
        EpisodeSampler(split, 4, "test")
    with pytest.raises(EtrmError, match="rank 2"):
        EpisodeSampler(split, 4, "train", rank=2, world_size=2)


def test_buffers_are_reused_only_after_the_caller_drops_a_batch(dataset):
    sampler = EpisodeSampler(dataset.split("train"), 5, "train", seed=9, max_demos=3)
    kept = [(batch, {k: v.clone() for k, v in batch.items()}) for _ in range(3) for batch in sampler]
    for batch, copy in kept:
        for key, value in copy.items():
            assert torch.equal(batch[key], value), key
    del kept, batch
    iterator = iter(sampler)
    first = next(iterator)
    address = first["demo_inputs"].data_ptr()
    del first
    second = next(iterator)
    assert second["demo_inputs"].data_ptr() == address  # the dropped batch's memory, reused
    held = second["labels"][:2]  # a view keeps the whole buffer in use
    del second
    assert next(iterator)["labels"].data_ptr() != held.data_ptr()
