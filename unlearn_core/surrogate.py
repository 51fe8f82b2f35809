"""Surrogates x_s: corrected versions of the target (DESIGN §1.3, paper Table V baselines)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

from unlearn_core.images import ImageError, is_blank, load_for_model
from unlearn_core.models import DiffusionModel

SURROGATE_METHODS = ("sdedit", "flip", "noise", "image")


def sdedit(model: DiffusionModel, target: Image.Image, strength: float = 0.6, prompt: str = "", seed: int = 0, steps: int = 25, guidance: float = 5.0) -> Image.Image:
    """Img2img from the target at `strength` (0 = unchanged, 1 = from pure noise)."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1]; got {strength!r}")
    return model.sdedit(target.resize(model.image_size), prompt, strength, seed, steps, guidance)


def flip(target: Image.Image) -> Image.Image:
    """Horizontal flip (weak baseline)."""
    return ImageOps.mirror(target)


def add_noise(target: Image.Image, sigma: float = 0.2, seed: int = 0) -> Image.Image:
    """Add Gaussian noise of std `sigma` in [0, 1] pixel units (weak baseline)."""
    if not 0.0 <= sigma <= 2.0:
        raise ValueError(f"noise sigma must be in [0, 2]; got {sigma!r}")
    array = np.asarray(target, dtype=np.float32) / 255.0
    noisy = array + np.random.default_rng(seed).normal(0.0, sigma, array.shape)
    return Image.fromarray((np.clip(noisy, 0, 1) * 255).round().astype(np.uint8))


def user_image(source, model: DiffusionModel, name: str = "surrogate") -> Image.Image:
    """An uploaded or painted image, checked and brought to the model's size; blank canvases refused."""
    image = load_for_model(source, model.image_size, name)
    if is_blank(image):
        raise ImageError(f"{name}: the image is a single flat colour (an empty canvas?); paint the correction first")
    return image


def make_surrogate(model: DiffusionModel, method: str, target: Image.Image, *, prompt: str = "", strength: float = 0.6, sigma: float = 0.2, seed: int = 0, steps: int = 25, guidance: float = 5.0, image=None) -> Image.Image:
    """Dispatch on `method` ∈ SURROGATE_METHODS."""
    target = target.convert("RGB").resize(model.image_size)
    if method == "sdedit":
        return sdedit(model, target, strength, prompt, seed, steps, guidance)
    if method == "flip":
        return flip(target)
    if method == "noise":
        return add_noise(target, sigma, seed)
    if method == "image":
        if image is None:
            raise ImageError("give the surrogate image (upload or paint one)")
        return user_image(image, model)
    raise ValueError(f"unknown surrogate method {method!r}; expected one of {', '.join(SURROGATE_METHODS)}")
