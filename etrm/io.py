"""Atomic writes: a reader never sees a half-written file or folder.

A command's output folder (dataset, eval, report) is written under an OS lock beside it (a
second writer is refused, and temporary folders that a killed writer left are removed), and
a command replaces only an empty folder or its own earlier output, recognised by the manifest
it leaves there.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from etrm.errors import EtrmError

_held_locks: set[Path] = set()  # output folders this process is writing (the lock is re-entrant)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def try_lock(path: Path) -> int | None:
    """An exclusive, non-blocking OS lock (flock) on `path`, created if missing: the open descriptor
    (closing it, or the process ending, drops the lock), or None while another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


@contextlib.contextmanager
def output_lock(final: str | os.PathLike) -> Iterator[None]:
    """Hold the OS lock on writing `final` (a second writer is refused with one line), and remove the
    temporary folders of earlier writers: whoever wrote them no longer holds the lock, so they are dead."""
    final = Path(final).absolute()
    if final in _held_locks:
        yield
        return
    final.parent.mkdir(parents=True, exist_ok=True)
    lock_file = final.with_name(f".{final.name}.etrm-lock")
    while True:
        fd = try_lock(lock_file)
        if fd is None:
            raise EtrmError(f"{final}: another etrm process is writing it right now; wait for it to finish")
        with contextlib.suppress(FileNotFoundError):
            if os.stat(lock_file).st_ino == os.fstat(fd).st_ino:
                break  # else the previous holder removed the file between our open and lock: retry
        os.close(fd)
    _held_locks.add(final)
    try:
        stale = re.compile(rf"\.{re.escape(final.name)}\.(tmp-[a-z0-9_]+|old-\d+)")
        for entry in final.parent.iterdir():
            if stale.fullmatch(entry.name):
                shutil.rmtree(entry, ignore_errors=True)
        yield
    finally:
        _held_locks.discard(final)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock_file)
        os.close(fd)


def _files_under(folder: Path) -> set[str]:
    """Relative paths of everything but sub-folders below `folder` (links are not followed)."""
    found = set()
    for root, dirs, files in os.walk(folder):
        base = Path(root).relative_to(folder)
        found |= {(base / name).as_posix() for name in files}
        found |= {(base / name).as_posix() for name in dirs if os.path.islink(os.path.join(root, name))}
    return found


@dataclass(frozen=True)
class Output:
    """A kind of command output, recognised by the JSON manifest it writes: `listed(manifest)` gives
    the other files it wrote (None: the manifest is not one of this kind's)."""

    kind: str
    manifest: str
    listed: Callable[[Any], Iterable[str] | None]

    def files(self, folder: Path) -> set[str] | None:
        """Every file such a command wrote in `folder`, or None when `folder` is not such an output."""
        try:
            listed = self.listed(json.loads((folder / self.manifest).read_text()))
            return None if listed is None else {str(f) for f in listed} | {self.manifest}
        except (OSError, ValueError, RecursionError, KeyError, TypeError, AttributeError):
            return None


def check_replaceable(path: str | os.PathLike, output: Output, option: str = "--out") -> None:
    """A command replaces only an empty folder or its own earlier output (with nothing added to it);
    for anything else it stops with one line naming the folder."""
    path = Path(path)
    where = f"{option} {path}"
    if Path.cwd().resolve().is_relative_to(path.resolve()):
        raise EtrmError(
            f"{where}: is the current folder or holds it; choose a new folder for the {output.kind}"
        )
    if not os.path.lexists(path):
        return
    if path.is_symlink() or not path.is_dir():
        raise EtrmError(f"{where}: exists and is not a folder; choose a new folder for the {output.kind}")
    present = _files_under(path)
    if not present:
        return
    owned = output.files(path)
    if owned is None:
        raise EtrmError(
            f"{where}: exists and is not an etrm {output.kind} folder; choose a new folder (nothing was deleted)"
        )
    foreign = sorted(present - owned)
    if foreign:
        listed = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise EtrmError(
            f"{where}: holds files the {output.kind} did not write ({listed}); choose a new folder"
        )


@contextlib.contextmanager
def atomic_dir(
    final: str | os.PathLike, overwrite: bool = False, output: Output | None = None
) -> Iterator[Path]:
    """Yield a temporary sibling folder; rename it to `final` only if the block succeeds.

    With `output` (a command's output folder), `final` is written under `output_lock` and an existing
    `final` is replaced only when `check_replaceable` allows it."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(final) if output is not None else contextlib.nullcontext():
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it owner-only; the result is an ordinary folder
        try:
            yield tmp
            if os.path.lexists(final):
                if not overwrite:
                    raise FileExistsError(f"{final} already exists")
                if output is not None:
                    check_replaceable(final, output)
                old = final.with_name(f".{final.name}.old-{os.getpid()}")
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes it owner-only; the result is an ordinary file
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 1) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=indent, sort_keys=False) + "\n").encode())
