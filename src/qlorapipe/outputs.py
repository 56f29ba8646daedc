"""Writing outputs so that a failed or killed stage leaves nothing half-written behind.

Every output is written into a temporary sibling (``.NAME.tmp-XXXX``, same filesystem) and
renamed into place only when complete. An exception deletes the temporary; a SIGKILL cannot,
so each writer first removes the leftovers an earlier, killed run of it left beside its output.
Live metrics, read while they are written, are the one exception (``live_dir``): written in
place, each file whole, and removed if the stage fails (the previous ones come back).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qlorapipe.errors import UserError


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once: os.umask can only be read by setting it, and the process-wide toggle must not race with
# files another thread creates meanwhile (checkpoints are written on a thread of their own).
_UMASK = _read_umask()


def sweep_leftovers(path: Path) -> list[Path]:
    """Delete the temporaries a killed writer of ``path`` left beside it.

    Returns:
        The leftovers removed.
    """
    path = Path(path)
    removed = []
    for leftover in path.parent.glob(f".{path.name}.tmp-*"):
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
        removed.append(leftover)
    return removed


def _move_aside(path: Path) -> Path | None:
    """Move ``path`` (if there is one) into a new temporary sibling directory and return where it went: it stays
    whole until the caller deletes it or puts it back, and a killed run's next writer sweeps it."""
    if not (path.exists() or path.is_symlink()):
        return None
    aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent)) / path.name
    os.replace(path, aside)
    return aside


@contextlib.contextmanager
def _temporary_file(path: Path, suffix: str = "") -> Iterator[str]:
    """Yield a temporary sibling file's name (readable as the umask allows) that replaces ``path`` only if the
    block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_leftovers(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=suffix, dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes it private; outputs are ordinary files
        os.close(fd)
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``path`` only if the block succeeds.

    The temporary directory is a sibling of ``path`` (same filesystem, so the final
    rename is atomic). On any exception it is deleted and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_leftovers(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    tmp.chmod(0o777 & ~_UMASK)  # mkdtemp makes it private; outputs are ordinary directories
    aside = None
    try:
        yield tmp
        # Moved aside first, deleted after: the old output is whole until the new one is in place (deleting a
        # multi-GB model takes a while, and a deletion that fails halfway would leave part of it).
        aside = _move_aside(path)
        try:
            os.replace(tmp, path)
        except OSError:
            if aside is not None:  # the old output goes back where it was
                os.replace(aside, path)
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if aside is not None:
            shutil.rmtree(aside.parent, ignore_errors=True)


@contextlib.contextmanager
def live_dir(path: Path) -> Iterator[Path]:
    """Yield ``path`` as an empty directory that the block fills in place, while others read it.

    For the one kind of output that must be readable before it is complete: live metrics, which
    ``dvc exp show`` and DVC Studio read at their declared path while the stage runs (a temporary
    sibling would hide them). The previous ``path`` waits in a temporary sibling meanwhile: if
    the block fails, what it wrote is removed and the previous ``path`` comes back, so a failed
    stage leaves nothing half-written. SIGKILL leaves what the killed block had written (the
    writer's files, each whole) and that temporary; the next writer removes both.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_leftovers(path)
    previous = _move_aside(path)
    path.mkdir()
    try:
        yield path
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        if previous is not None:
            os.replace(previous, path)
        raise
    finally:
        if previous is not None:
            shutil.rmtree(previous.parent, ignore_errors=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file through a temporary sibling and a rename."""
    with _temporary_file(Path(path)) as tmp, open(tmp, "w") as handle:
        handle.write(text)


def save_figure_atomic(fig, path: Path) -> None:
    """Save a matplotlib figure as a PNG through a temporary sibling and a rename, then close it.

    Fixed metadata (no Software stamp): the same figure gives the same bytes, so DVC sees no change.
    """
    import matplotlib.pyplot as plt

    try:
        with _temporary_file(Path(path), suffix=".png") as tmp:
            fig.savefig(tmp, dpi=100, metadata={"Software": None})
    finally:
        plt.close(fig)


def _non_finite(data: Any, where: str = "") -> str | None:
    """The key path of the first NaN or infinite number in ``data``, or None."""
    if isinstance(data, float) and not math.isfinite(data):
        return where or "(the value)"
    if isinstance(data, dict):
        items = data.items()
    elif isinstance(data, (list, tuple)):
        items = enumerate(data)
    else:
        return None
    for key, value in items:
        found = _non_finite(value, f"{where}.{key}" if where else str(key))
        if found:
            return found
    return None


def write_json(path: Path, data: Any) -> None:
    """Write JSON deterministically (sorted keys, fixed indent) and atomically.

    Raises:
        UserError: a value is NaN or infinite (not JSON; DVC and other readers refuse it).
    """
    bad = _non_finite(data)
    if bad:
        raise UserError(f"{path}: {bad} is not a finite number, and NaN or Infinity is not JSON; "
                        "nothing was written (check the params that feed it)")
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())
