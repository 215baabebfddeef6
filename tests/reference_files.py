"""The reference TRM files the parity and checkpoint tests read, kept in tests/fixtures/ (see its README).

A missing file is an error when the test module is collected, never a skip: a clone without them
would otherwise pass without testing parity at all.
"""

from __future__ import annotations

from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures"


def fixture_file(relative: str) -> Path:
    path = FIXTURES / relative
    if not path.is_file():
        raise FileNotFoundError(
            f"test fixture {path} is missing; it is part of the repository (tests/fixtures/)"
        )
    return path


TRM_CHECKPOINT = fixture_file("trm_parity/trm_A_checkpoint.pt")
TRM_CONFIG = fixture_file("trm_parity/trm_A_config.json")
TRM_IO = fixture_file("trm_parity/trm_A_io.npz")
TRM_CHECKPOINT_KEYS = fixture_file("trm_checkpoint_keys.tsv")
