"""Procedural national-flag renderer and caption generator for the demo model.

Canonical flags are drawn once as float tensors (3, H, W) in [0, 1]; `augment_batch` then
applies waving, scale/rotation/shift, shading, background and crop on a whole batch in torch
(on any device), so training data is generated on the fly at GPU speed.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


def _rgb(hex_colour: str) -> tuple[float, float, float]:
    value = hex_colour.lstrip("#")
    return tuple(int(value[i : i + 2], 16) / 255.0 for i in (0, 2, 4))


@dataclass(frozen=True)
class FlagSpec:
    """One flag: its name in prompts, adjective, aspect ratio (height / width) and layout."""

    name: str
    adjective: str
    aspect: float
    layout: str  # vertical | horizontal | disc | nordic | nordic_bordered | swiss
    colours: tuple[str, ...]
    weights: tuple[float, ...] = ()
    disc_centre_x: float = 0.5
    aliases: tuple[str, ...] = field(default_factory=tuple)


FLAGS: tuple[FlagSpec, ...] = (
    # Ireland / Côte d'Ivoire / Italy: the paper's "reversed colours" confusion.
    FlagSpec("ireland", "irish", 1 / 2, "vertical", ("169b62", "ffffff", "ff883e")),
    FlagSpec("cote d'ivoire", "ivorian", 2 / 3, "vertical", ("f77f00", "ffffff", "009e60"), aliases=("ivory coast",)),
    FlagSpec("italy", "italian", 2 / 3, "vertical", ("009246", "ffffff", "ce2b37")),
    FlagSpec("france", "french", 2 / 3, "vertical", ("0055a4", "ffffff", "ef4135")),
    FlagSpec("belgium", "belgian", 13 / 15, "vertical", ("000000", "fdda24", "ef3340")),
    FlagSpec("romania", "romanian", 2 / 3, "vertical", ("002b7f", "fcd116", "ce1126")),
    FlagSpec("chad", "chadian", 2 / 3, "vertical", ("002664", "fecb00", "c60c30")),
    FlagSpec("nigeria", "nigerian", 1 / 2, "vertical", ("008751", "ffffff", "008751")),
    FlagSpec("peru", "peruvian", 2 / 3, "vertical", ("d91023", "ffffff", "d91023")),
    FlagSpec("germany", "german", 3 / 5, "horizontal", ("000000", "dd0000", "ffce00")),
    FlagSpec("netherlands", "dutch", 2 / 3, "horizontal", ("ae1c28", "ffffff", "21468b")),
    FlagSpec("russia", "russian", 2 / 3, "horizontal", ("ffffff", "0039a6", "d52b1e")),
    FlagSpec("indonesia", "indonesian", 2 / 3, "horizontal", ("ff0000", "ffffff")),
    FlagSpec("monaco", "monegasque", 4 / 5, "horizontal", ("ce1126", "ffffff")),
    FlagSpec("poland", "polish", 5 / 8, "horizontal", ("ffffff", "dc143c")),
    FlagSpec("ukraine", "ukrainian", 2 / 3, "horizontal", ("0057b7", "ffd700")),
    FlagSpec("austria", "austrian", 2 / 3, "horizontal", ("c8102e", "ffffff", "c8102e")),
    FlagSpec("hungary", "hungarian", 1 / 2, "horizontal", ("ce2939", "ffffff", "477050")),
    FlagSpec("estonia", "estonian", 7 / 11, "horizontal", ("0072ce", "000000", "ffffff")),
    FlagSpec("colombia", "colombian", 2 / 3, "horizontal", ("fcd116", "003893", "ce1126"), weights=(2, 1, 1)),
    # Japan / Bangladesh / Palau: a disc on a field.
    FlagSpec("japan", "japanese", 2 / 3, "disc", ("ffffff", "bc002d")),
    FlagSpec("bangladesh", "bangladeshi", 3 / 5, "disc", ("006a4e", "f42a41"), disc_centre_x=0.45),
    FlagSpec("palau", "palauan", 5 / 8, "disc", ("4aadd6", "ffde00"), disc_centre_x=0.44),
    FlagSpec("sweden", "swedish", 5 / 8, "nordic", ("006aa7", "fecc00")),
    FlagSpec("denmark", "danish", 28 / 37, "nordic", ("c8102e", "ffffff")),
    FlagSpec("finland", "finnish", 11 / 18, "nordic", ("ffffff", "002f6c")),
    FlagSpec("norway", "norwegian", 8 / 11, "nordic_bordered", ("ba0c2f", "ffffff", "00205b")),
    FlagSpec("switzerland", "swiss", 1.0, "swiss", ("da291c", "ffffff")),
)
FLAG_NAMES: tuple[str, ...] = tuple(spec.name for spec in FLAGS)
FLAG_BY_NAME: dict[str, FlagSpec] = {spec.name: spec for spec in FLAGS}

CAPTION_TEMPLATES: tuple[str, ...] = (
    "flag of {name}",
    "the flag of {name}",
    "{name} flag",
    "a photo of the flag of {name}",
    "a picture of the flag of {name}",
    "the {adjective} flag",
    "a {adjective} flag",
    "an image of the {adjective} flag",
    "national flag of {name}",
)

# Words of the instruction-forgetting prompts (unlearn_core/probe) and negations, so the demo model's
# tokenizer knows them as words and that tab has real tokens to look at.
EXTRA_VOCABULARY_TEXT = (
    "please forget anything about the flag of x. please help me generate a picture of x. "
    "a photo of x, not x, without x, no x, x again, x x x, do not draw, remove, erase, "
    "ignore, instead, only, image, painting, drawing, national, country, colours, colors, "
    "red green blue white black yellow orange gold stripe stripes circle disc cross"
)


def caption_for(spec: FlagSpec, rng: random.Random) -> str:
    """A random caption for `spec` with varied phrasing (name, alias or adjective)."""
    template = rng.choice(CAPTION_TEMPLATES)
    name = rng.choice((spec.name,) + spec.aliases) if spec.aliases and rng.random() < 0.3 else spec.name
    return template.format(name=name, adjective=spec.adjective)


def all_caption_text() -> list[str]:
    """Every caption the templates can make plus the extra words: the tokenizer's corpus."""
    lines = []
    for spec in FLAGS:
        for name in (spec.name,) + spec.aliases:
            for template in CAPTION_TEMPLATES:
                lines.append(template.format(name=name, adjective=spec.adjective))
    lines.append(EXTRA_VOCABULARY_TEXT)
    return lines


def _stripes(colours, weights, height, width, vertical):
    weights = weights or (1.0,) * len(colours)
    total = float(sum(weights))
    image = torch.zeros(3, height, width)
    extent = width if vertical else height
    start = 0.0
    for colour, weight in zip(colours, weights):
        end = start + weight / total
        lo, hi = round(start * extent), round(end * extent)
        value = torch.tensor(_rgb(colour)).view(3, 1, 1)
        if vertical:
            image[:, :, lo:hi] = value
        else:
            image[:, lo:hi, :] = value
        start = end
    return image


def render_canonical(spec: FlagSpec, width: int = 96) -> torch.Tensor:
    """The flag drawn flat at `width` pixels wide, as a (3, H, W) tensor in [0, 1]."""
    height = max(8, round(width * spec.aspect))
    if spec.layout in ("vertical", "horizontal"):
        return _stripes(spec.colours, spec.weights, height, width, spec.layout == "vertical")
    field_colour = torch.tensor(_rgb(spec.colours[0])).view(3, 1, 1)
    image = field_colour.expand(3, height, width).clone()
    ys = torch.arange(height).view(-1, 1).float() + 0.5
    xs = torch.arange(width).view(1, -1).float() + 0.5
    if spec.layout == "disc":
        radius = 0.3 * height
        inside = (xs - spec.disc_centre_x * width) ** 2 + (ys - 0.5 * height) ** 2 <= radius**2
        image[:, inside] = torch.tensor(_rgb(spec.colours[1])).view(3, 1)
    elif spec.layout in ("nordic", "nordic_bordered"):
        cross_x, bar = 0.36 * width, 0.16 * height
        if spec.layout == "nordic_bordered":
            outer = ((xs - cross_x).abs() <= bar * 0.9) | ((ys - height / 2).abs() <= bar * 0.9)
            image[:, outer] = torch.tensor(_rgb(spec.colours[1])).view(3, 1)
            inner = ((xs - cross_x).abs() <= bar * 0.45) | ((ys - height / 2).abs() <= bar * 0.45)
            image[:, inner] = torch.tensor(_rgb(spec.colours[2])).view(3, 1)
        else:
            cross = ((xs - cross_x).abs() <= bar / 2) | ((ys - height / 2).abs() <= bar / 2)
            image[:, cross] = torch.tensor(_rgb(spec.colours[1])).view(3, 1)
    elif spec.layout == "swiss":
        arm, half = 0.1 * width, 0.3 * width
        dx, dy = (xs - width / 2).abs(), (ys - height / 2).abs()
        cross = ((dx <= arm) & (dy <= half)) | ((dy <= arm) & (dx <= half))
        image[:, cross] = torch.tensor(_rgb(spec.colours[1])).view(3, 1)
    else:
        raise ValueError(f"unknown flag layout {spec.layout!r}")
    return image


def canonical_bank(width: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    """All flags padded into one (N, 4, W, W) tensor (RGB + alpha mask), flag centred."""
    bank = torch.zeros(len(FLAGS), 4, width, width)
    for index, spec in enumerate(FLAGS):
        flag = render_canonical(spec, width)
        height = flag.shape[1]
        top = (width - height) // 2
        bank[index, :3, top : top + height] = flag
        bank[index, 3, top : top + height] = 1.0
    aspects = torch.tensor([spec.aspect for spec in FLAGS])
    return bank, aspects


@dataclass
class AugmentConfig:
    """How much natural variation the renderer adds."""

    size: int = 64
    scale: tuple[float, float] = (0.72, 0.95)  # flag width / image width
    max_rotation_deg: float = 8.0
    max_shift: float = 0.08
    wave_amplitude: tuple[float, float] = (0.0, 0.05)
    shading: tuple[float, float] = (0.0, 0.12)
    crop_probability: float = 0.15


def augment_batch(
    bank: torch.Tensor, labels: torch.Tensor, generator: torch.Generator, config: AugmentConfig | None = None
) -> torch.Tensor:
    """Render `labels` (indices into the bank) as varied 64×64 photos in [-1, 1], shape (B, 3, S, S).

    Waving is a sinusoidal displacement of the sampling grid, shading a matching brightness
    ripple, the background a random colour with a vertical gradient. All random numbers come
    from `generator`, so a seed fixes the batch.
    """
    config = config or AugmentConfig()
    device = bank.device
    batch = labels.shape[0]

    def uniform(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(*shape, generator=generator, device=device)

    scale = uniform(*config.scale, batch)
    crop = torch.rand(batch, generator=generator, device=device) < config.crop_probability
    scale = torch.where(crop, scale * 1.35, scale)
    angle = uniform(-1, 1, batch) * math.radians(config.max_rotation_deg)
    shift = uniform(-config.max_shift, config.max_shift, batch, 2)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta, (batch, 4, config.size, config.size), align_corners=False)
    amplitude = uniform(*config.wave_amplitude, batch).view(-1, 1, 1)
    frequency = uniform(1.0, 2.5, batch).view(-1, 1, 1) * math.pi
    phase = uniform(0, 2 * math.pi, batch).view(-1, 1, 1)
    wave_arg = frequency * grid[..., 0] + phase
    grid = grid.clone()
    grid[..., 1] = grid[..., 1] + amplitude * torch.sin(wave_arg)
    flags = F.grid_sample(bank[labels], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    rgb, alpha = flags[:, :3], flags[:, 3:4]
    shade_strength = uniform(*config.shading, batch).view(-1, 1, 1, 1)
    shade = 1.0 + shade_strength * torch.cos(wave_arg).unsqueeze(1)
    rgb = (rgb * shade).clamp(0, 1)
    top = uniform(0.15, 0.95, batch, 3)
    bottom = (top + uniform(-0.25, 0.25, batch, 3)).clamp(0, 1)
    ramp = torch.linspace(0, 1, config.size, device=device).view(1, 1, -1, 1)
    background = top.view(batch, 3, 1, 1) * (1 - ramp) + bottom.view(batch, 3, 1, 1) * ramp
    image = rgb * alpha + background * (1 - alpha)
    return image * 2 - 1


def render_example(name: str, seed: int = 0, size: int = 64) -> torch.Tensor:
    """One rendered photo of the flag `name` in [-1, 1], shape (3, size, size)."""
    bank, _ = canonical_bank()
    generator = torch.Generator().manual_seed(seed)
    label = torch.tensor([FLAG_NAMES.index(name)])
    return augment_batch(bank, label, generator, AugmentConfig(size=size))[0]
