"""Atomic file writes: through a temporary file in the same folder and a rename, so a reader (the
server polling a running job, a second process) never sees half a file and a crash never leaves one."""

from __future__ import annotations

import errno
import io
import json
import os
import tempfile
from pathlib import Path

from PIL import Image

from unlearn_core.errors import DiskFull

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def disk_full(error: OSError, path: str | os.PathLike) -> DiskFull | None:
    """A plain `DiskFull` for an `OSError` that means no space is left (ENOSPC, or a spent quota),
    naming the file but not its folder; None for any other error."""
    if getattr(error, "errno", None) not in NO_SPACE:
        return None
    return DiskFull(f"the disk is full: could not write {Path(path).name}. Free some space on the server "
                    "(old runs under HOTFIX_RUNS_DIR, or lower HOTFIX_CACHE_MAX_GB) and try again")


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write through a temporary file and a rename: a crash never leaves half a file. A full disk
    raises `DiskFull` (an `OperatorError` with a plain message) and leaves no temporary file."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.replace(tmp, path)
    except OSError as error:
        full = disk_full(error, path)
        if full is None:
            raise
        raise full from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_json_atomic(path: str | os.PathLike, data) -> Path:
    return write_bytes_atomic(path, json.dumps(data, indent=2, default=str).encode())


def save_image_atomic(image: Image.Image, path: str | os.PathLike) -> Path:
    """A PNG, written atomically."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return write_bytes_atomic(path, buffer.getvalue())


def read_json(path: Path, default=None):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return default
