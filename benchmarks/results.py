"""What every benchmark script shares: a description of the machine and its raw rows in a CSV.

Each benchmark appends its rows to `benchmarks/results/NAME.csv` (one file per script, a row per
measurement with its date and machine); `benchmarks/RESULTS.md` holds the current table of goals
on top and the history of what was measured and why below it, written by hand.
"""

from __future__ import annotations

import csv
import io
import os
import platform
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import torch

from etrm.io import atomic_write_bytes

RESULTS = Path(__file__).with_name("RESULTS.md")
RESULTS_DIR = Path(__file__).with_name("results")


def machine(device: torch.device | str | None = None) -> str:
    """The GPU's name, or the CPU model with cores, threads and load (timings on a shared CPU need it)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"load avg {load:.1f}"
    )


def utc_stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def append_rows(name: str, columns: Sequence[str], rows: Sequence[dict]) -> Path:
    """Append rows (dicts keyed by column) to `benchmarks/results/NAME.csv`; returns the file.

    A column the file does not have yet widens it (earlier rows get an empty cell there).
    """
    path = RESULTS_DIR / f"{name}.csv"
    old_rows: list[dict] = []
    header = list(columns)
    if path.exists():
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            old_rows = list(reader)
            header = [*reader.fieldnames, *(c for c in columns if c not in reader.fieldnames)]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=header, lineterminator="\n")
    writer.writeheader()
    writer.writerows([*old_rows, *({c: row.get(c, "") for c in columns} for row in rows)])
    path.parent.mkdir(exist_ok=True)
    atomic_write_bytes(path, out.getvalue().encode())
    return path


def append_to_section(heading: str, lines: Sequence[str], intro: Sequence[str] = ()) -> None:
    """Add `lines` at the end of `heading`'s section of RESULTS.md; a missing section starts with `intro`."""
    text = RESULTS.read_text().splitlines() if RESULTS.exists() else ["# Benchmark results"]
    if heading not in text:
        while text and text[-1] == "":
            text.pop()
        text += ["", heading, "", *intro]
    start = text.index(heading)
    end = next((i for i in range(start + 1, len(text)) if text[i].startswith("## ")), len(text))
    section, rest = text[:end], text[end:]
    while section[-1] == "":
        section.pop()
    text = [*section, *lines, *([""] + rest if rest else [])]
    atomic_write_bytes(RESULTS, ("\n".join(text) + "\n").encode())
