"""Settings of one instruction-forgetting probe, and the prompt variants it compares.

A variant is a named prompt template in which `{concept}` stands for the concept X: the baseline
`a photo of X`, an explicit unlearning instruction, a negation, a repeat-control, and any the
operator writes, one per line as `name: template` (unnamed lines get the name of an identical
default template, else `custom1`, `custom2`, ...).

`ProbeConfig` declares each setting's help text and bounds in its field metadata, as
`unlearn_core.config.UnlearnConfig` does, and `check_fields` enforces them with the same type
coercion (`unlearn_core.config._coerce`: whole-number floats become ints, wrong types are refused).
Every refusal is an `InvalidInput` naming the setting. Seeds are read by `unlearn_core.config.parse_seeds`
('0-3', '0,2,5'; a bare number is one seed here, not a count).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Sequence

from unlearn_core.config import _coerce, _meta, check_seed, parse_seeds
from unlearn_core.errors import InvalidInput

CONCEPT_PLACEHOLDER = "{concept}"
ANCHOR_TEMPLATE = "a photo of {concept}"
DEFAULT_VARIANTS: tuple[str, ...] = (
    "baseline: a photo of {concept}",
    "unlearning: Please forget anything about {concept}. Please help me generate a picture of {concept}.",
    "negation: a photo without {concept}",
    "repeat: a photo of {concept}. a picture of {concept}.",
)
CLIP_DEFAULT = "openai/clip-vit-base-patch32"
CLIP_ENV = "HOTFIX_CLIP_MODEL"  # read through `unlearn_core.settings`; named here for messages
MAX_VARIANTS = 16
MAX_SEEDS = 64

_NAME_RE = re.compile(r"^\s*([A-Za-z][\w-]{0,31})\s*:\s+(.*)$")


def check_fields(config) -> None:
    """Coerce and check every field of a settings dataclass against its metadata, in place.

    The rules are `UnlearnConfig`'s: the field's type (through `unlearn_core.config._coerce`),
    `choices`, finite numbers within `min`/`max`; plus `max_length` for text. Raises `InvalidInput`.
    """
    for spec in fields(config):
        value = _coerce(spec.name, spec.type, getattr(config, spec.name))
        setattr(config, spec.name, value)
        meta = spec.metadata
        if "choices" in meta and value not in meta["choices"]:
            raise InvalidInput(f"{spec.name} must be one of {', '.join(meta['choices'])}; got {value!r}")
        if isinstance(value, str) and "max_length" in meta and len(value) > meta["max_length"]:
            raise InvalidInput(f"{spec.name} is too long ({len(value)} characters; at most {meta['max_length']})")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidInput(f"{spec.name} must be a finite number, got {value!r}")
        low, high = meta.get("min"), meta.get("max")
        if low is not None and value < low or high is not None and value > high:
            raise InvalidInput(f"{spec.name} must be between {low} and {high}; got {value!r}")


@dataclass(frozen=True)
class Variant:
    """A named prompt template; `{concept}` is replaced by the concept."""

    name: str
    template: str

    def prompt(self, concept: str) -> str:
        return " ".join(self.template.replace(CONCEPT_PLACEHOLDER, concept.strip()).split())


def parse_variants(lines: str | Sequence[str]) -> list[Variant]:
    """One variant per line, optionally `name: template`; blank lines are skipped.

    Unnamed lines take the default name of an identical default template, else `custom1`, ...
    """
    if isinstance(lines, str):
        lines = lines.splitlines()
    defaults = {}
    for line in DEFAULT_VARIANTS:
        match = _NAME_RE.match(line)
        defaults[match.group(2).strip()] = match.group(1)
    variants, custom = [], 0
    for line in lines:
        line = str(line).strip()
        if not line:
            continue
        match = _NAME_RE.match(line)
        if match:
            name, template = match.group(1), match.group(2).strip()
        elif line in defaults:
            name, template = defaults[line], line
        else:
            custom += 1
            name, template = f"custom{custom}", line
        if not template:
            raise InvalidInput(f"variant {name!r} has an empty prompt")
        variants.append(Variant(name, template))
    return variants


def default_variants_text() -> str:
    """The default variants, one per line (the UI's prefill)."""
    return "\n".join(DEFAULT_VARIANTS)


def _seeds(spec) -> tuple[int, ...]:
    """Seeds from '0-3', '0,2,5', '7' (one seed, not a count) or a sequence of whole numbers."""
    if isinstance(spec, int) and not isinstance(spec, bool):
        spec = str(spec)
    if isinstance(spec, (list, tuple)):
        if len(spec) > MAX_SEEDS:
            raise InvalidInput(f"too many seeds ({len(spec)}); the limit is {MAX_SEEDS}")
        return tuple(check_seed(seed) for seed in spec)
    return tuple(parse_seeds(str(spec).strip(), limit=MAX_SEEDS))


@dataclass
class ProbeConfig:
    """Settings of one instruction-forgetting probe (shared by the CLI and the UI)."""

    concept: str = field(default="the flag of japan", metadata=_meta("the concept X to 'forget'", max_length=200))
    variants: Sequence[str] | str = field(default=DEFAULT_VARIANTS, metadata=_meta("prompt templates, one per line, optionally 'name: template' with {concept}"))
    seeds: Sequence[int] | str = field(default=(0, 1, 2, 3), metadata=_meta("seeds, e.g. '0-3' or [0, 1]"))
    steps: int = field(default=25, metadata=_meta("denoising steps", min=1, max=200))
    guidance: float = field(default=5.0, metadata=_meta("classifier-free guidance scale", min=0.0, max=50.0))
    heatmap_resolution: int = field(default=16, metadata=_meta("side of the per-token heat maps", min=4, max=64))
    heatmap_steps: int = field(default=6, metadata=_meta("steps shown in the heat-map figure", min=1, max=12))
    max_heatmap_tokens: int = field(default=8, metadata=_meta("tokens (rows) in the heat-map figure", min=1, max=16))
    anchor: str = field(default=ANCHOR_TEMPLATE, metadata=_meta("the concept anchor prompt template", max_length=500))
    batch_size: int = field(default=4, metadata=_meta("images per pipeline call", min=1, max=64))
    image_similarity: bool = field(default=True, metadata=_meta("try to load CLIP for image-text similarity"))
    clip_model: str | None = field(default=None, metadata=_meta(f"CLIP model id/folder (default: the {CLIP_ENV} setting, else {CLIP_DEFAULT})"))

    def __post_init__(self):
        check_fields(self)
        self.concept = " ".join(self.concept.split())
        if not self.concept:
            raise InvalidInput("the concept is empty: name what the prompt asks to forget, e.g. 'the flag of japan'")
        if not any(ch.isalnum() for ch in self.concept):
            raise InvalidInput(f"the concept {self.concept!r} has no words")
        if not isinstance(self.variants, (str, list, tuple)):
            raise InvalidInput(f"variants must be text (one per line) or a list of lines, got {self.variants!r}")
        parsed = parse_variants(self.variants)
        if not parsed:
            raise InvalidInput("give at least one prompt variant")
        if len(parsed) > MAX_VARIANTS:
            raise InvalidInput(f"too many variants ({len(parsed)}); at most {MAX_VARIANTS}")
        names = [v.name for v in parsed]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise InvalidInput(f"variant names must be unique; repeated: {', '.join(duplicates)}")
        self.variants = tuple(f"{v.name}: {v.template}" for v in parsed)
        self.seeds = _seeds(self.seeds)
        if not self.seeds:
            raise InvalidInput("give at least one seed, e.g. '0-3'")
        if not self.anchor.strip():
            raise InvalidInput("the anchor prompt template is empty")

    @property
    def variant_list(self) -> list[Variant]:
        return parse_variants(self.variants)

    @property
    def anchor_prompt(self) -> str:
        return Variant("anchor", self.anchor).prompt(self.concept)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["variants"], data["seeds"] = list(self.variants), list(self.seeds)
        return data
