"""File helpers shared by the build, the benchmarks and the FID downloads (standard library only)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

# Default cache files, here (standard library only) so the CLI's help can show them without importing numpy / torch.
CACHE_DIR = Path(os.environ.get("RTLYNX_CACHE", Path.home() / ".cache" / "rtlynx"))
EMOJI64_PATH = CACHE_DIR / "emoji64.npz"
INCEPTION_PATH = Path.home() / ".cache" / "rtlynx" / "inception_fp16.pt"


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
