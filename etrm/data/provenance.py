"""What a decoder's weights have seen, and whether any of it belongs to a test split.

A run records, in `training_data.json` beside its checkpoints, every dataset its weights were
trained on: the one it trained on itself and those inherited through `train.init_from`, each
with its sources and checksums, its training puzzle ids and the canonical hash of every
training grid pair (`build.pair_key`: the same for every rotation, reflection and colour
permutation of a pair). Starting a decoder from such a run checks those puzzles and pairs
against the current test split, so a decoder that saw a test puzzle is never called few-shot.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from etrm.data.build import pair_key

TRAINING_DATA_FILE = "training_data.json"


def dataset_record(dataset, train_split) -> dict:
    """The record of training on `train_split` (the groups actually trained on) of `dataset`."""
    manifest = dataset.manifest
    pairs = [pair for g in range(len(train_split.puzzle_ids)) for pair in train_split.pairs(g)]
    return {
        "dataset": str(dataset.path),
        "fewshot": bool(manifest.get("fewshot", True)),
        "sources": manifest["sources"]["train"],
        "seed": manifest.get("seed"),
        "manifest_sha256": manifest_sha256(manifest),
        "puzzle_ids": list(train_split.puzzle_ids),
        "pair_keys": sorted({pair_key(*pair).hex() for pair in pairs}),
    }


def manifest_sha256(manifest: dict) -> str:
    """One checksum for a built dataset: of its files' checksums (which the manifest lists)."""
    return hashlib.sha256(json.dumps(manifest.get("files", {}), sort_keys=True).encode()).hexdigest()


def overlap_with_test_split(records: list[dict], test_split) -> list[str]:
    """Each test puzzle that shares its id or a grid pair with a recorded training set, described."""
    by_id: dict[str, str] = {}
    by_pair: dict[str, str] = {}
    for record in records:
        by_id.update(dict.fromkeys(record["puzzle_ids"], record["dataset"]))
        by_pair.update(dict.fromkeys(record["pair_keys"], record["dataset"]))
    found = []
    for g, task_id in enumerate(test_split.puzzle_ids):
        if task_id in by_id:
            found.append(f"{task_id} (trained on as a puzzle of {by_id[task_id]})")
            continue
        shared = next((by_pair[k] for p in test_split.pairs(g) if (k := pair_key(*p).hex()) in by_pair), None)
        if shared is not None:
            found.append(f"{task_id} (a grid pair, up to rotation/reflection/colours, in {shared})")
    return found


def read_training_data(run_dir: Path) -> dict | None:
    """A run folder's record (None for a run written before runs recorded their data)."""
    path = Path(run_dir) / TRAINING_DATA_FILE
    return json.loads(path.read_text()) if path.is_file() else None
