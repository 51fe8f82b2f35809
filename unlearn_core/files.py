"""Atomic file writes: through a temporary file in the same folder and a rename, so a reader (the
server polling a running job, a second process) never sees half a file and a crash never leaves one."""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path

from PIL import Image


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write through a temporary file and a rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
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
