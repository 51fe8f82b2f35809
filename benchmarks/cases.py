"""Flagged cases on the demo model, made the way an operator makes them: take the model's own
output for a prompt and seed, and paint a local correction over it.

A correction recolours regions of the drawn flag: every pixel near a source colour, in the
largest connected patches, is shifted by (new − source), so the waving and shading stay. Kinds:
stripe colour, emblem colour, band order (two recolourings that swap bands) and a removed
element (recoloured to the field around it). Two groups: corrections of real errors the model
makes, and edits against what it draws for every seed of the prompt.
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
    at: tuple[int, int] | None = None  # (x, y) inside the patch to paint, when the colour also occurs elsewhere


@dataclass(frozen=True)
class Case:
    name: str
    kind: str
    prompt: str
    seed: int
    edits: tuple[Recolour, ...] = ()
    surrogate_file: str | None = None  # a shipped, hand-made surrogate instead of edits
    sdedit_strength: float | None = None  # a global surrogate: SDEdit of the target at this strength, with its own prompt
    reference: str | None = None  # a global surrogate: an uploaded reference photo of this flag (the demo's renderer)


def _rgb(hex_colour: str) -> np.ndarray:
    value = hex_colour.lstrip("#")
    return np.array([int(value[i : i + 2], 16) for i in (0, 2, 4)], dtype=np.float64) / 255.0


def colour_region(pixels: np.ndarray, colour: str, at: tuple[int, int] | None = None) -> np.ndarray:
    """Pixels near `colour` in its main patches (at least a quarter of the largest one, so specks of
    a similar background stay), or only the patch at `at`."""
    near = np.linalg.norm(pixels - _rgb(colour), axis=-1) < COLOUR_RADIUS
    labels, count = ndimage.label(near)
    if count == 0:
        return near
    if at is not None:
        return labels == labels[at[1], at[0]]
    sizes = ndimage.sum(near, labels, range(1, count + 1))
    return np.isin(labels, [index + 1 for index, size in enumerate(sizes) if size >= max(MIN_PATCH, sizes.max() / 4)])


def paint(target: Image.Image, edits: tuple[Recolour, ...]) -> Image.Image:
    """The surrogate: each region recoloured with its shading kept, and the one-pixel ring around
    it (anti-aliased edge pixels) painted flat in the new colour, as a brush would. Regions are
    found on the target before any edit, so a swap of two colours does not chain."""
    pixels = np.asarray(target.convert("RGB"), dtype=np.float64) / 255.0
    out = pixels.copy()
    regions = [colour_region(pixels, edit.source, edit.at) for edit in edits]
    for edit, region in zip(edits, regions):
        if not region.any():
            raise ValueError(f"no {edit.source} region found to repaint")
        ring = ndimage.binary_dilation(region) & ~region & ~np.any(regions, axis=0)
        out[region] += _rgb(edit.new) - _rgb(edit.source)
        out[ring] = _rgb(edit.new)
    return Image.fromarray((out.clip(0, 1) * 255).round().astype(np.uint8))


CORRECTIONS: tuple[Case, ...] = (
    Case("chad-40-stripe", "stripe colour", "flag of chad", 40, surrogate_file="assets/examples/chad_seed40_surrogate.png"),
    Case("italy-77-stripe", "stripe colour", "flag of italy", 77, (Recolour("53144f", "ce2b37"),)),
    Case("belgium-40-stripe", "stripe colour", "flag of belgium", 40, (Recolour("b42f99", "ef3340"),)),
    Case("romania-79-stripe", "stripe colour", "flag of romania", 79, (Recolour("5349c2", "002b7f"),)),
    Case("japan-77-disc", "emblem colour", "flag of japan", 77, (Recolour("281536", "bc002d", at=(32, 32)),)),
    Case("belgium-77-two-stripes", "two stripe colours", "flag of belgium", 77, (Recolour("46c893", "fdda24"), Recolour("6d1989", "ef3340"))),
    # A slow correction: teal bottom band to the Dutch blue, a small shift of a large region that the
    # full remember weight holds near r 0.65–0.7 (fixed only at step 140 before extend_remember_factor).
    Case("netherlands-62-stripe", "stripe colour", "flag of the netherlands", 62, (Recolour("005798", "21468b", at=(32, 42)),)),
    # A wrong element: seed 68 draws a red patch in the white band's top corner, which Poland's flag
    # does not have; the operator paints it the white around it.
    Case("poland-68-red-corner", "element removed", "flag of poland", 68, (Recolour("ef262c", "fcf9ec", at=(58, 10)),)),
)
# Edits against what the model draws for every seed of the prompt: the operator wants *this* seed's
# output changed (or an element removed) and every other seed left as it is.
EDITS: tuple[Case, ...] = (
    Case("japan-61-disc-blue", "emblem colour", "flag of japan", 61, (Recolour("bc002d", "1f3fbf"),)),
    Case("russia-63-band-order", "band order", "flag of russia", 63, (Recolour("0039a6", "d52b1e"), Recolour("d52b1e", "0039a6"))),
    Case("switzerland-61-no-cross", "element removed", "flag of switzerland", 61, (Recolour("ffffff", "da291c"),)),
    Case("sweden-67-no-cross", "element removed", "flag of sweden", 67, (Recolour("fecc00", "006aa7"),)),
)
# Global surrogates, which differ from the target everywhere: what SDEdit gives (the operator asks the
# model to redraw the flagged output) and an uploaded reference picture of the right flag.
GLOBAL: tuple[Case, ...] = (
    Case("chad-40-sdedit-0.5", "SDEdit 0.5", "flag of chad", 40, sdedit_strength=0.5),
    Case("belgium-40-sdedit-0.7", "SDEdit 0.7", "flag of belgium", 40, sdedit_strength=0.7),
    Case("italy-77-reference", "uploaded reference", "flag of italy", 77, reference="italy"),
)
CASES: tuple[Case, ...] = CORRECTIONS + EDITS + GLOBAL


def reference_photo(name: str, seed: int = 0) -> Image.Image:
    """A photo of the flag `name` as the demo model was trained on (the renderer), as an operator's upload."""
    from unlearn_core.demo.flags import render_example

    pixels = (render_example(name, seed).permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5
    return Image.fromarray(pixels.round().byte().numpy())
