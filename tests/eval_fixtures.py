"""Hand-made predictions shared by the eval tests."""

import numpy as np

from etrm.eval.predictions import PredictionsBuilder


def g(*rows):
    return np.array(rows, dtype=np.uint8)


A, B, C, D, E, W = g([1]), g([2, 2]), g([3], [3]), g([4, 4, 4]), g([5, 6]), g([0, 0], [0, 0])


def hand_made(meta=None):
    """Three puzzles, four queries, three augmentations (p3 has two); target ranks 0, 1, 1, 1.

    p1/q0 target A: A, A, B          → A first (identity exact)
    p2/q0 target B: B, C, W one each → ordered by q: C, B, W (identity exact)
    p2/q1 target D: none, W, D       → W and D tie on votes and q: W came first, D second
    p3/q0 target E: W, E             → W has the higher q, E second
    """
    b = PredictionsBuilder(
        ["p1", "p2", "p3"],
        [[A], [B, D], [E]],
        [3, 3, 2],
        meta={"split": "test", "fewshot": True, "step": 7},
    )
    b.add(0, 0, 0, A, 0.0)
    b.add(0, 0, 1, A, 0.0)
    b.add(0, 0, 2, B, 5.0)
    # p2/q0: C and B one vote each, C has the higher q → B second; W third
    b.add(1, 0, 0, B, 0.0)
    b.add(1, 0, 1, C, 3.0)
    b.add(1, 0, 2, W, -3.0)
    b.add(1, 1, 0, None, 1.0)
    b.add(1, 1, 1, W, 1.0)
    b.add(1, 1, 2, D, 1.0)
    b.add(2, 0, 0, W, 2.0)
    b.add(2, 0, 1, E, -2.0)
    return b.build()
