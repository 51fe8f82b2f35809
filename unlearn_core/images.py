"""Loading, checking and converting images. Every bad file gets a clear `ImageError`."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from unlearn_core.errors import ImageError

MAX_FILE_BYTES = 20 * 1024 * 1024
MAX_PIXELS = 40_000_000  # refuse decompression bombs well before PIL's own limit
MIN_SIDE = 8


def open_image(source: str | os.PathLike | bytes | Image.Image | np.ndarray, name: str = "image") -> Image.Image:
    """Open and verify an image from a path, bytes, PIL image or array; return it as RGB.

    Handles alpha (composited on white), palette, CMYK, 16-bit and greyscale images; refuses
    empty, truncated, non-image, tiny and oversized files with an `ImageError`.
    """
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, np.ndarray):
        image = _from_array(source, name)
    else:
        data = _read_bytes(source, name)
        image = _decode(data, name)
    return _to_rgb(image, name)


def _read_bytes(source, name: str) -> bytes:
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise ImageError(f"{name}: no such file: {path.name}")  # the name only: the folder is the server's
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ImageError(f"{name}: file is {size / 1e6:.1f} MB; the limit is {MAX_FILE_BYTES / 1e6:.0f} MB")
        try:
            data = path.read_bytes()
        except OSError as error:  # unreadable (permissions, I/O error): Python's own text names the full path
            raise ImageError(f"{name}: cannot read {path.name} ({error.strerror or type(error).__name__})") from None
    if not data:
        raise ImageError(f"{name}: the file is empty (0 bytes)")
    if len(data) > MAX_FILE_BYTES:
        raise ImageError(f"{name}: file is {len(data) / 1e6:.1f} MB; the limit is {MAX_FILE_BYTES / 1e6:.0f} MB")
    return data


def check_header(source: str | os.PathLike | bytes, name: str = "image") -> tuple[int, int]:
    """The image's (width, height) from its header alone, or an `ImageError`: every door that takes
    an image (a handler's file, the canvas's blobs, `open_image`) asks this before anything decodes
    the pixels, so a small file that declares a huge picture (a decompression bomb) is refused in
    milliseconds instead of filling the memory. Pillow's `Image.open` is lazy: it reads the header."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise ImageError(f"{name}: the file is empty (0 bytes)")
        if len(data) > MAX_FILE_BYTES:
            raise ImageError(f"{name}: file is {len(data) / 1e6:.1f} MB; the limit is {MAX_FILE_BYTES / 1e6:.0f} MB")
        handle = io.BytesIO(data)
    else:
        path = Path(source)
        if not path.is_file():
            raise ImageError(f"{name}: no such file: {path.name}")
        size = path.stat().st_size
        if size == 0:
            raise ImageError(f"{name}: the file is empty (0 bytes)")
        if size > MAX_FILE_BYTES:
            raise ImageError(f"{name}: file is {size / 1e6:.1f} MB; the limit is {MAX_FILE_BYTES / 1e6:.0f} MB")
        handle = path
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the pixel count is checked below, with our own limit
            with Image.open(handle) as probe:
                width, height = probe.size
    except Image.DecompressionBombError:  # over twice PIL's limit: Image.open refuses before it returns the size
        raise ImageError(f"{name}: image is too large (limit {MAX_PIXELS // 1_000_000} megapixels)") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image file PIL can read (PNG, JPEG, WebP, BMP, ...)") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageError(f"{name}: the image file is broken or truncated ({error})") from None
    if width * height > MAX_PIXELS:
        raise ImageError(f"{name}: {width}×{height} pixels is too large (limit {MAX_PIXELS // 1_000_000} megapixels)")
    return width, height


def _decode(data: bytes, name: str) -> Image.Image:
    check_header(data, name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            Image.open(io.BytesIO(data)).verify()
            image = Image.open(io.BytesIO(data))
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageError(f"{name}: image is too large to open safely ({error})") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image file PIL can read (PNG, JPEG, WebP, BMP, ...)") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageError(f"{name}: the image file is broken or truncated ({error})") from None
    return image


def _from_array(array: np.ndarray, name: str) -> Image.Image:
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise ImageError(f"{name}: expected an H×W×3 or H×W×4 array, got shape {array.shape}")
    if array.dtype != np.uint8:
        if not np.isfinite(array).all():
            raise ImageError(f"{name}: the array contains NaN or infinite values")
        array = np.clip(array * (255.0 if array.max() <= 1.0 else 1.0), 0, 255).round().astype(np.uint8)
    return Image.fromarray(array)


def _to_rgb(image: Image.Image, name: str) -> Image.Image:
    width, height = image.size
    if width < MIN_SIDE or height < MIN_SIDE:
        raise ImageError(f"{name}: {width}×{height} pixels is too small (at least {MIN_SIDE}×{MIN_SIDE})")
    if width * height > MAX_PIXELS:
        raise ImageError(f"{name}: {width}×{height} pixels is too large (limit {MAX_PIXELS // 1_000_000} megapixels)")
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        array -= min(array.min(), 0.0)
        top = array.max() or 1.0
        image = Image.fromarray((array / top * 255).astype(np.uint8))
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


def fit_to_size(image: Image.Image, size: int | tuple[int, int]) -> Image.Image:
    """Centre-crop to the model's aspect and resize to its size (width, height)."""
    target = (size, size) if isinstance(size, int) else size
    return ImageOps.fit(image, target, method=Image.Resampling.LANCZOS)


def load_for_model(source, size, name: str = "image") -> Image.Image:
    """Open, verify and bring an image to the model's size."""
    return fit_to_size(open_image(source, name), size)


def is_blank(image: Image.Image, tolerance: float = 1.0) -> bool:
    """True for an image of one flat colour (an empty canvas): no channel varies across the image."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32).reshape(-1, 3)
    return float(pixels.std(axis=0).max()) < tolerance


def to_tensor(images: list[Image.Image] | Image.Image) -> torch.Tensor:
    """PIL images → float tensor (B, 3, H, W) in [-1, 1]."""
    if isinstance(images, Image.Image):
        images = [images]
    array = np.stack([np.asarray(img.convert("RGB"), dtype=np.float32) / 127.5 - 1.0 for img in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def to_pil(tensor: torch.Tensor) -> list[Image.Image]:
    """Float tensor (B, 3, H, W) in [-1, 1] → PIL images."""
    array = ((tensor.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).numpy()) for a in array]


def grid(images: list[Image.Image], columns: int) -> Image.Image:
    """Paste same-size images into a grid (row-major)."""
    if not images:
        raise ValueError("no images for the grid")
    width, height = images[0].size
    rows = (len(images) + columns - 1) // columns
    canvas = Image.new("RGB", (columns * width, rows * height), (255, 255, 255))
    for index, image in enumerate(images):
        canvas.paste(image.resize((width, height)), ((index % columns) * width, (index // columns) * height))
    return canvas
