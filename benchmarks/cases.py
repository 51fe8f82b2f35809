"""Flagged cases on the demo model, made the way an operator makes them: take the model's own
output for a prompt and seed, and paint a local correction over it.

A correction recolours regions of the drawn flag: every pixel near a source colour, in the
largest connected patches, is shifted by (new − source), so the waving and shading stay. Kinds:
stripe colour, emblem colour, band order (two recolourings that swap bands) and a removed
element (recoloured to the field around it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

COLOUR_RADIUS = 0.28  # RGB distance in [0, 1] units that counts as "this colour" in a generated image
MIN_PATCH = 12  # pixels: smaller patches of the colour (background specks) are left alone


@dataclass(frozen=True)
class Recolour:
    source: str  # hex colour as drawn
    new: str  # hex colour the operator paints


@dataclass(frozen=True)
class Case:
    name: str
    kind: str
    prompt: str
    seed: int
    edits: tuple[Recolour, ...] = ()
    surrogate_file: str | None = None  # a shipped, hand-made surrogate instead of edits


def _rgb(hex_colour: str) -> np.ndarray:
    value = hex_colour.lstrip("#")
    return np.array([int(value[i : i + 2], 16) for i in (0, 2, 4)], dtype=np.float64) / 255.0


def colour_region(pixels: np.ndarray, colour: str) -> np.ndarray:
    """Pixels near `colour`, keeping only connected patches of at least MIN_PATCH pixels."""
    near = np.linalg.norm(pixels - _rgb(colour), axis=-1) < COLOUR_RADIUS
    labels, count = ndimage.label(near)
    sizes = ndimage.sum(near, labels, range(1, count + 1))
    keep = [index + 1 for index, size in enumerate(sizes) if size >= MIN_PATCH]
    return np.isin(labels, keep)


def paint(target: Image.Image, edits: tuple[Recolour, ...]) -> Image.Image:
    """The surrogate: each region recoloured with its shading kept. Regions are found on the
    target before any edit, so a swap of two colours does not chain."""
    pixels = np.asarray(target.convert("RGB"), dtype=np.float64) / 255.0
    out = pixels.copy()
    for edit in edits:
        region = colour_region(pixels, edit.source)
        if not region.any():
            raise ValueError(f"no {edit.source} region found to repaint")
        out[region] += _rgb(edit.new) - _rgb(edit.source)
    return Image.fromarray((out.clip(0, 1) * 255).round().astype(np.uint8))


CASES: tuple[Case, ...] = (
    Case("chad-40-stripe", "stripe colour", "flag of chad", 40, surrogate_file="assets/examples/chad_seed40_surrogate.png"),
    Case("france-65-stripe", "stripe colour", "flag of france", 65, (Recolour("ef4135", "1f9a3c"),)),
    Case("ukraine-67-band", "stripe colour", "flag of ukraine", 67, (Recolour("ffd700", "f4f4f4"),)),
    Case("japan-61-disc-colour", "emblem colour", "flag of japan", 61, (Recolour("bc002d", "1f3fbf"),)),
    Case("bangladesh-65-disc-colour", "emblem colour", "flag of bangladesh", 65, (Recolour("f42a41", "ffd21f"),)),
    Case("russia-63-band-order", "band order", "flag of russia", 63, (Recolour("0039a6", "d52b1e"), Recolour("d52b1e", "0039a6"))),
    Case("switzerland-61-no-cross", "element removed", "flag of switzerland", 61, (Recolour("ffffff", "da291c"),)),
    Case("japan-69-no-disc", "element removed", "flag of japan", 69, (Recolour("bc002d", "ffffff"),)),
    Case("sweden-67-no-cross", "element removed", "flag of sweden", 67, (Recolour("fecc00", "006aa7"),)),
)
