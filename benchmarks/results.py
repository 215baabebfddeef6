"""What every benchmark script shares: a description of the machine and appending to RESULTS.md."""

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


def append_table_rows(
    heading: str, columns: Sequence[str], rows: Sequence[dict], intro: Sequence[str] = ()
) -> None:
    """Append rows (dicts keyed by column) to the Markdown table of `heading`'s section."""
    header = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines = ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
    append_to_section(heading, lines, intro=[*intro, *([""] if intro else []), *header])


def append_csv_rows(path: Path, columns: Sequence[str], rows: Sequence[dict]) -> None:
    """Append raw rows to a CSV (header written when the file is new), the summary tables' source."""
    existing = path.read_text() if path.exists() else ""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    if not existing:
        writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(path, (existing + buffer.getvalue()).encode())
