"""benchmarks/bench_fewshot.py: a bad option is one line and exit 2, before any puzzle is synthesised."""

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_fewshot.py"


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["--encoders", "standard,foo"], "error: --encoders 'standard,foo': choose from standard,"),
        (["--held-out", "nope"], "error: --families: unknown family 'nope'; known: colour_map,"),
        (["--parallel", "0"], "error: --parallel 0: must be at least 1"),
        (["--adapt", "finetune", "--adapt-params", "head"], "error: --adapt-params must be one of"),
    ],
)
def test_a_bad_option_is_one_line_before_any_work(args, line, tmp_path):
    out = tmp_path / "kept"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--no-record", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(line)
    assert not out.exists()  # nothing synthesised
