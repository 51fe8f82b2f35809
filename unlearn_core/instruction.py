"""Why telling the model "forget X" does not work: the instruction-forgetting probe (DESIGN §4).

For a concept X, a few prompt variants (baseline `a photo of X`, an explicit unlearning
instruction, a negation, a repeat-control, user-written ones) are compared on the same seeds:

- text side: cosine similarity of each variant's text embedding (pooled and mean over word
  tokens) to the anchor `a photo of X`, and token ablation — the similarity drop when the concept
  tokens vs the instruction tokens are removed;
- cross-attention: attention mass on the concept vs the instruction tokens per denoising step,
  `M_t(S) = mean_q sum_{j in S} A_t[q, j]` (averaged over heads and layers), its AUC over
  normalised steps, and per-token heat maps per step (captured by `unlearn_core.attention`);
- image side: the images per variant (one generator per seed, so the same initial noise) and,
  when a CLIP model can be loaded, the CLIP image–text similarity of each image to the anchor.

`run_probe` writes `results.csv`, `summary.json`, PNG figures and the images; `register_cli`
adds the `probe` verb to `python -m unlearn_core`.

Token bookkeeping: a prompt is split into words (letters/digits with inner apostrophes, or one
punctuation mark); each word maps to the positions of its tokens in the sequence the text
encoder sees (start token at 0; start/end tokens and padding belong to no word). Concept tokens
are the tokens of the concept's content words (articles/prepositions of the concept phrase left
out) wherever the concept phrase occurs; instruction tokens are the remaining words that are not
articles, prepositions, framing words (photo, picture, ...) or punctuation.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import os
import re
import socket
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence
from urllib.parse import urlparse

import numpy as np
import torch

from unlearn_core.attention import AttentionTracer, capture_attention
from unlearn_core.config import DEMO_MODEL
from unlearn_core.config import parse_seeds as _parse_seeds

CONCEPT_PLACEHOLDER = "{concept}"
ANCHOR_TEMPLATE = "a photo of {concept}"
DEFAULT_VARIANTS: tuple[str, ...] = (
    "baseline: a photo of {concept}",
    "unlearning: Please forget anything about {concept}. Please help me generate a picture of {concept}.",
    "negation: a photo without {concept}",
    "repeat: a photo of {concept}. a picture of {concept}.",
)
CSV_COLUMNS = ("variant", "prompt", "seed", "text_cosine", "drop_without_concept", "drop_without_instruction", "concept_auc", "instruction_auc", "image_similarity")
CLIP_DEFAULT = "openai/clip-vit-base-patch32"
CLIP_ENV = "HOTFIX_CLIP_MODEL"

STOPWORDS = frozenset("a an the of and or to in on at for with by from is are be this that these those".split())
FRAMING_WORDS = STOPWORDS | frozenset("photo photograph picture image drawing painting illustration render".split())
WORD_RE = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]")
_NAME_RE = re.compile(r"^\s*([A-Za-z][\w-]{0,31})\s*:\s+(.*)$")

Progress = Callable[[int, int], None]


# -- seeds and variants ------------------------------------------------------------------------
def parse_seeds(spec: str | int | Sequence[int]) -> list[int]:
    """'0-3' → [0, 1, 2, 3]; '0,2,5' → [0, 2, 5]; '7' → [7]. Raises ValueError with a hint."""
    if isinstance(spec, int) and not isinstance(spec, bool):
        spec = str(spec)
    if isinstance(spec, (list, tuple)):
        return _parse_seeds([int(s) for s in spec])
    return _parse_seeds(str(spec).strip())


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
            raise ValueError(f"variant {name!r} has an empty prompt")
        variants.append(Variant(name, template))
    return variants


def default_variants_text() -> str:
    """The default variants, one per line (the UI's prefill)."""
    return "\n".join(DEFAULT_VARIANTS)


@dataclass
class ProbeConfig:
    """Settings of one instruction-forgetting probe (shared by the CLI and the UI)."""

    concept: str = field(default="the flag of japan", metadata={"help": "the concept X to 'forget'"})
    variants: Sequence[str] | str = field(default=DEFAULT_VARIANTS, metadata={"help": "prompt templates, one per line, optionally 'name: template' with {concept}"})
    seeds: Sequence[int] | str = field(default=(0, 1, 2, 3), metadata={"help": "seeds, e.g. '0-3' or [0, 1]"})
    steps: int = field(default=25, metadata={"help": "denoising steps (1-200)"})
    guidance: float = field(default=5.0, metadata={"help": "classifier-free guidance scale (0-50)"})
    heatmap_resolution: int = field(default=16, metadata={"help": "side of the per-token heat maps (4-64)"})
    heatmap_steps: int = field(default=6, metadata={"help": "steps shown in the heat-map figure (1-12)"})
    max_heatmap_tokens: int = field(default=8, metadata={"help": "tokens (rows) in the heat-map figure"})
    anchor: str = field(default=ANCHOR_TEMPLATE, metadata={"help": "the concept anchor prompt template"})
    batch_size: int = field(default=4, metadata={"help": "images per pipeline call"})
    image_similarity: bool = field(default=True, metadata={"help": "try to load CLIP for image-text similarity"})
    clip_model: str | None = field(default=None, metadata={"help": f"CLIP model id/folder (default: ${CLIP_ENV} or {CLIP_DEFAULT})"})

    def __post_init__(self):
        if not isinstance(self.concept, str) or not self.concept.strip():
            raise ValueError("the concept is empty: name what the prompt asks to forget, e.g. 'the flag of japan'")
        self.concept = " ".join(self.concept.split())
        if len(self.concept) > 200:
            raise ValueError("the concept is too long (at most 200 characters)")
        if not any(ch.isalnum() for ch in self.concept):
            raise ValueError(f"the concept {self.concept!r} has no words")
        parsed = parse_variants(self.variants)
        if not parsed:
            raise ValueError("give at least one prompt variant")
        if len(parsed) > 16:
            raise ValueError(f"too many variants ({len(parsed)}); at most 16")
        names = [v.name for v in parsed]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"variant names must be unique; repeated: {', '.join(duplicates)}")
        self.variants = tuple(f"{v.name}: {v.template}" for v in parsed)
        self.seeds = tuple(parse_seeds(self.seeds))
        if not self.seeds:
            raise ValueError("give at least one seed, e.g. '0-3'")
        for name in ("steps", "heatmap_resolution", "heatmap_steps", "max_heatmap_tokens", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) and not (isinstance(value, float) and value.is_integer()):
                raise ValueError(f"{name} must be a whole number, got {value!r}")
            setattr(self, name, int(value))
        if not 1 <= self.steps <= 200:
            raise ValueError(f"steps must be between 1 and 200, got {self.steps}")
        try:
            self.guidance = float(self.guidance)
        except (TypeError, ValueError):
            raise ValueError(f"guidance must be a number, got {self.guidance!r}") from None
        if not math.isfinite(self.guidance) or not 0.0 <= self.guidance <= 50.0:
            raise ValueError(f"guidance must be between 0 and 50, got {self.guidance}")
        if not 4 <= self.heatmap_resolution <= 64:
            raise ValueError(f"heatmap_resolution must be between 4 and 64, got {self.heatmap_resolution}")
        if not 1 <= self.heatmap_steps <= 12:
            raise ValueError(f"heatmap_steps must be between 1 and 12, got {self.heatmap_steps}")
        if not 1 <= self.max_heatmap_tokens <= 16:
            raise ValueError(f"max_heatmap_tokens must be between 1 and 16, got {self.max_heatmap_tokens}")
        if not 1 <= self.batch_size <= 64:
            raise ValueError(f"batch_size must be between 1 and 64, got {self.batch_size}")
        if not isinstance(self.anchor, str) or not self.anchor.strip():
            raise ValueError("the anchor prompt template is empty")

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


# -- token bookkeeping -------------------------------------------------------------------------
@dataclass(frozen=True)
class Word:
    text: str
    start: int
    end: int
    positions: tuple[int, ...]  # token positions in the encoder input (start token = 0)


@dataclass(frozen=True)
class TokenMap:
    """A prompt's words and the token positions each one occupies."""

    prompt: str
    input_ids: tuple[int, ...]  # with start/end tokens, without padding
    tokens: tuple[str, ...]
    words: tuple[Word, ...]
    max_length: int

    @property
    def word_positions(self) -> tuple[int, ...]:
        return tuple(sorted({p for w in self.words for p in w.positions}))

    def positions(self, word_indices: Sequence[int]) -> tuple[int, ...]:
        return tuple(sorted({p for i in word_indices for p in self.words[i].positions}))

    def find(self, phrase: str) -> list[int]:
        """Start indices (in words) of each occurrence of `phrase`'s words, case-insensitive."""
        target = [w.lower() for w, _, _ in split_words(phrase)]
        words = [w.text.lower() for w in self.words]
        n = len(target)
        return [i for i in range(len(words) - n + 1) if n and words[i : i + n] == target]


def split_words(text: str) -> list[tuple[str, int, int]]:
    """Words (letters/digits with inner apostrophes) and single punctuation marks, with spans."""
    return [(m.group(0), m.start(), m.end()) for m in WORD_RE.finditer(text)]


def _special_ids(tokenizer) -> set[int]:
    return {int(i) for i in getattr(tokenizer, "all_special_ids", []) if i is not None}


def map_words(tokenizer, prompt: str) -> TokenMap:
    """Map each word of `prompt` to its token positions with the pipeline's tokenizer.

    Raises ValueError if the prompt does not fit the tokenizer's length or cannot be aligned.
    """
    max_length = int(getattr(tokenizer, "model_max_length", 77) or 77)
    ids = list(tokenizer(prompt, add_special_tokens=True, truncation=False).input_ids)
    if len(ids) > max_length:
        raise ValueError(f"prompt {prompt!r} is {len(ids)} tokens; this model's tokenizer takes at most {max_length} (start/end included)")
    special = _special_ids(tokenizer)
    words = split_words(prompt)
    content = [i for i, t in enumerate(ids) if t not in special]
    offsets = None
    try:
        encoded = tokenizer(prompt, add_special_tokens=True, truncation=False, return_offsets_mapping=True)
        offsets = encoded.get("offset_mapping")
    except (NotImplementedError, TypeError, ValueError, KeyError):
        offsets = None
    mapped: list[Word] = []
    if offsets is not None and len(offsets) == len(ids):
        for text, start, end in words:
            pos = tuple(i for i in content if offsets[i][1] > offsets[i][0] and offsets[i][0] < end and offsets[i][1] > start)
            mapped.append(Word(text, start, end, pos))
    else:  # slow tokenizer: tokenize word by word and check that this reproduces the prompt's tokens
        pieces = [list(tokenizer(text, add_special_tokens=False).input_ids) for text, _, _ in words]
        if [t for piece in pieces for t in piece] != [ids[i] for i in content]:
            raise ValueError(f"cannot align the words of {prompt!r} with its tokens")
        cursor = 0
        for (text, start, end), piece in zip(words, pieces):
            mapped.append(Word(text, start, end, tuple(content[cursor : cursor + len(piece)])))
            cursor += len(piece)
    tokens = tuple(tokenizer.convert_ids_to_tokens(ids))
    return TokenMap(prompt, tuple(int(i) for i in ids), tokens, tuple(mapped), max_length)


@dataclass(frozen=True)
class TokenSets:
    concept: tuple[int, ...]
    instruction: tuple[int, ...]


def token_sets(tmap: TokenMap, concept: str) -> TokenSets:
    """Concept tokens (content words of each occurrence of the concept) and instruction tokens."""
    concept_words = [w.lower() for w, _, _ in split_words(concept)]
    content = [k for k, w in enumerate(concept_words) if w not in STOPWORDS and any(c.isalnum() for c in w)]
    content = content or list(range(len(concept_words)))
    inside, concept_idx = set(), set()
    for start in tmap.find(concept):
        inside.update(range(start, start + len(concept_words)))
        concept_idx.update(start + k for k in content)
    instruction_idx = [
        i for i, w in enumerate(tmap.words) if i not in inside and w.text.lower() not in FRAMING_WORDS and any(c.isalnum() for c in w.text)
    ]
    return TokenSets(tmap.positions(sorted(concept_idx)), tmap.positions(instruction_idx))


def _padded(tokenizer, ids: Sequence[int], max_length: int) -> list[int]:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ids[-1]
    return list(ids)[:max_length] + [int(pad)] * (max_length - len(ids))


def without_positions(tmap: TokenMap, drop: Sequence[int]) -> list[int]:
    """The prompt's token ids (start/end kept, no padding) with the positions in `drop` removed."""
    drop = set(drop)
    return [t for i, t in enumerate(tmap.input_ids) if i not in drop]


# -- text side ---------------------------------------------------------------------------------
@dataclass
class TextScores:
    """Similarity of a variant's text embedding to the anchor's, and the token-ablation drops."""

    cosine: float  # pooled embedding
    cosine_mean: float  # mean over word tokens of the last hidden state
    drop_without_concept: float  # cosine − cosine with the concept tokens removed (pooled)
    drop_without_instruction: float
    drop_without_concept_mean: float
    drop_without_instruction_mean: float


@torch.no_grad()
def encode_token_ids(pipe, sequences: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled, mean-over-word-tokens) text embeddings of unpadded id sequences, float32 CPU."""
    tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
    max_length = int(tokenizer.model_max_length)
    batch = torch.tensor([_padded(tokenizer, s, max_length) for s in sequences], device=encoder.device)
    out = encoder(batch)
    hidden = out.last_hidden_state.float()
    pooled = getattr(out, "pooler_output", None)
    if pooled is None:
        pooled = out.text_embeds
    means = []
    for row, seq in enumerate(sequences):
        n = min(len(seq), max_length)
        span = hidden[row, 1 : n - 1] if n > 2 else hidden[row, max(n - 1, 0) : n]
        means.append(span.mean(dim=0))
    return pooled.float().cpu(), torch.stack(means).cpu()


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.unsqueeze(0), b.unsqueeze(0)).item())


def text_analysis(pipe, concept: str, anchor_prompt: str, prompts: dict[str, str]) -> dict[str, TextScores]:
    """Cosine of each prompt's text embedding to the anchor, and the token-ablation drops."""
    anchor = map_words(pipe.tokenizer, anchor_prompt)
    sequences = [list(anchor.input_ids)]
    for prompt in prompts.values():
        tmap = map_words(pipe.tokenizer, prompt)
        sets = token_sets(tmap, concept)
        sequences += [list(tmap.input_ids), without_positions(tmap, sets.concept), without_positions(tmap, sets.instruction)]
    pooled, mean = encode_token_ids(pipe, sequences)
    scores = {}
    for k, name in enumerate(prompts):
        full, no_concept, no_instr = 1 + 3 * k, 2 + 3 * k, 3 + 3 * k
        cos_p, cos_m = _cos(pooled[full], pooled[0]), _cos(mean[full], mean[0])
        scores[name] = TextScores(
            cosine=cos_p,
            cosine_mean=cos_m,
            drop_without_concept=cos_p - _cos(pooled[no_concept], pooled[0]),
            drop_without_instruction=cos_p - _cos(pooled[no_instr], pooled[0]),
            drop_without_concept_mean=cos_m - _cos(mean[no_concept], mean[0]),
            drop_without_instruction_mean=cos_m - _cos(mean[no_instr], mean[0]),
        )
    return scores


# -- cross-attention metrics -------------------------------------------------------------------
def mass_on(mass: np.ndarray | torch.Tensor, positions: Sequence[int]) -> np.ndarray:
    """M_t(S) from per-token mass (..., steps, tokens): sum over the positions in S."""
    mass = np.asarray(mass.cpu() if isinstance(mass, torch.Tensor) else mass, dtype=np.float64)
    if not len(positions):
        return np.zeros(mass.shape[:-1])
    return mass[..., list(positions)].sum(axis=-1)


def auc(curve: Sequence[float]) -> float:
    """Area under a per-step curve over normalised steps x in [0, 1] (trapezoid rule).

    A single step counts as a constant curve (its value).
    """
    y = np.asarray(curve, dtype=np.float64).reshape(-1)
    if y.size == 0:
        raise ValueError("cannot take the AUC of an empty curve")
    if y.size == 1:
        return float(y[0])
    x = np.linspace(0.0, 1.0, y.size)
    return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2.0)


# -- image side: CLIP --------------------------------------------------------------------------
class ClipScorer:
    """CLIP image–text cosine similarity (a real CLIP model, never a stand-in)."""

    def __init__(self, model, processor, source: str):
        self.model, self.processor, self.source = model.eval(), processor, source

    @torch.no_grad()
    def similarity(self, images: Sequence, text: str) -> list[float]:
        inputs = self.processor(text=[text], images=list(images), return_tensors="pt", padding=True)
        out = self.model(**inputs)
        image, txt = out.image_embeds.float(), out.text_embeds.float()
        image = image / image.norm(dim=-1, keepdim=True)
        txt = txt / txt.norm(dim=-1, keepdim=True)
        return [float(v) for v in (image @ txt[0])]


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@functools.lru_cache(maxsize=2)
def _load_clip(source: str) -> tuple[ClipScorer | None, str | None]:
    try:
        from transformers import CLIPModel, CLIPProcessor
    except ImportError as error:
        return None, f"transformers has no CLIP ({error})"
    local = Path(source).expanduser()
    try:
        if local.exists():
            return ClipScorer(CLIPModel.from_pretrained(str(local)), CLIPProcessor.from_pretrained(str(local)), source), None
        try:  # the local Hugging Face cache first: no network round trips
            return ClipScorer(CLIPModel.from_pretrained(source, local_files_only=True), CLIPProcessor.from_pretrained(source, local_files_only=True), source), None
        except OSError:
            if not _hub_reachable():
                return None, f"CLIP model {source!r} is not in the local cache and the Hugging Face hub is unreachable (offline); set {CLIP_ENV} to a local CLIP folder"
            return ClipScorer(CLIPModel.from_pretrained(source), CLIPProcessor.from_pretrained(source), source), None
    except Exception as error:  # transformers raises OSError, ValueError, HTTP errors, ...
        return None, f"cannot load CLIP model {source!r}: {str(error).splitlines()[0][:200] if str(error) else type(error).__name__}"


def load_clip(source: str | None = None) -> tuple[ClipScorer | None, str | None]:
    """(scorer, None) or (None, reason). Source: argument, else ${HOTFIX_CLIP_MODEL}, else CLIP ViT-B/32."""
    source = source or os.environ.get(CLIP_ENV) or CLIP_DEFAULT
    return _load_clip(source)


# -- the probe ---------------------------------------------------------------------------------
@dataclass
class VariantResult:
    name: str
    prompt: str
    tokens: tuple[str, ...]  # the prompt's tokens, start/end included, no padding
    concept_positions: tuple[int, ...]
    instruction_positions: tuple[int, ...]
    text: TextScores
    seeds: tuple[int, ...]
    images: list  # PIL images, one per seed
    concept_curves: np.ndarray  # (seeds, steps) M_t(concept)
    instruction_curves: np.ndarray  # (seeds, steps) M_t(instruction)
    token_mass: np.ndarray  # (steps, tokens) mean over seeds, tokens of `tokens` only
    heatmaps: np.ndarray | None  # (steps, tokens, R, R) mean over seeds
    image_similarity: list[float] | None = None

    @property
    def concept_auc(self) -> list[float]:
        return [auc(c) for c in self.concept_curves]

    @property
    def instruction_auc(self) -> list[float]:
        return [auc(c) for c in self.instruction_curves]

    def token_label(self, position: int) -> str:
        token = self.tokens[position].replace("</w>", "")
        role = " (concept)" if position in self.concept_positions else " (instruction)" if position in self.instruction_positions else ""
        return f"{position}: {token}{role}"


@dataclass
class ProbeResult:
    config: ProbeConfig
    anchor_prompt: str
    variants: dict[str, VariantResult]
    out_dir: Path
    csv_path: Path
    summary_path: Path
    figures: dict[str, Path]
    image_paths: dict[str, list[Path]]
    rows: list[dict]
    image_similarity_reason: str | None
    seconds: float

    def summary(self) -> dict:
        per_variant = {}
        for name, v in self.variants.items():
            per_variant[name] = {
                "prompt": v.prompt,
                "concept_tokens": [v.tokens[p] for p in v.concept_positions],
                "instruction_tokens": [v.tokens[p] for p in v.instruction_positions],
                "text": asdict(v.text),
                "concept_auc_mean": float(np.mean(v.concept_auc)),
                "instruction_auc_mean": float(np.mean(v.instruction_auc)),
                "image_similarity_mean": None if v.image_similarity is None else float(np.mean(v.image_similarity)),
            }
        return {
            "config": self.config.to_dict(),
            "anchor_prompt": self.anchor_prompt,
            "variants": per_variant,
            "image_similarity": "clip" if self.image_similarity_reason is None else None,
            "image_similarity_unavailable": self.image_similarity_reason,
            "seconds": round(self.seconds, 2),
            "definitions": {
                "text_cosine": "cosine of the pooled CLIP text embedding to the anchor prompt's",
                "drop_without_concept": "text_cosine minus the cosine after removing the concept tokens",
                "drop_without_instruction": "text_cosine minus the cosine after removing the instruction tokens",
                "auc": "trapezoid area under M_t(S) = mean over image queries (heads, layers) of sum_{j in S} A_t[q, j], steps normalised to [0, 1]",
            },
        }


def _denoiser(pipe):
    for name in ("unet", "transformer"):
        model = getattr(pipe, name, None)
        if model is not None:
            return model
    raise ValueError(f"{type(pipe).__name__} has neither a UNet nor a transformer to probe")


def _check_text_pipeline(pipe) -> None:
    if getattr(pipe, "tokenizer", None) is None or getattr(pipe, "text_encoder", None) is None:
        raise ValueError(f"{type(pipe).__name__} has no text encoder: the instruction probe needs a text-to-image model")


def _generate_variant(pipe, prompt: str, config: ProbeConfig, n_tokens: int, tick: Callable[[], None]):
    """Images, per-image token mass (seeds, steps, K) and seed-mean heat maps for one prompt."""
    denoiser = _denoiser(pipe)
    images, masses, heat_sum = [], [], None
    seeds = list(config.seeds)
    for start in range(0, len(seeds), config.batch_size):
        chunk = seeds[start : start + config.batch_size]
        tracer = AttentionTracer(config.heatmap_resolution, images_per_call=len(chunk))

        def on_step_end(p, step, timestep, callback_kwargs):
            tracer.step_callback(p, step, timestep, callback_kwargs)
            tick()
            return callback_kwargs

        with capture_attention(denoiser, tracer):
            out = pipe(
                [prompt] * len(chunk),
                num_inference_steps=config.steps,
                guidance_scale=config.guidance,
                generator=[torch.Generator().manual_seed(int(s)) for s in chunk],
                callback_on_step_end=on_step_end,
            )
        trace = tracer.trace()
        images.extend(out.images)
        masses.append(trace.mass.transpose(0, 1).numpy())  # (B, steps, K)
        if trace.heatmaps is not None:
            part = trace.heatmaps[:, :, :n_tokens].sum(dim=1).numpy()  # (steps, tokens, R, R)
            heat_sum = part if heat_sum is None else heat_sum + part
    mass = np.concatenate(masses, axis=0)
    heat = None if heat_sum is None else (heat_sum / len(seeds)).astype(np.float32)
    return images, mass, heat


def run_probe(
    pipe,
    concept: str | ProbeConfig,
    variants: Sequence[str] | str | None = None,
    seeds: Sequence[int] | str | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    out_dir: str | Path = "runs/probe",
    progress: Progress | None = None,
) -> ProbeResult:
    """Run the instruction-forgetting probe and write CSV, JSON, figures and images to `out_dir`.

    `concept` is the concept string (the other settings then default to `ProbeConfig`'s) or a
    whole `ProbeConfig` (then leave variants/seeds/steps/guidance out). `progress(done, total)`
    is called after every denoising step.
    """
    started = time.perf_counter()
    if isinstance(concept, ProbeConfig):
        if any(v is not None for v in (variants, seeds, steps, guidance)):
            raise ValueError("pass either a ProbeConfig or the separate settings, not both")
        config = concept
    else:
        given = {k: v for k, v in dict(variants=variants, seeds=seeds, steps=steps, guidance=guidance).items() if v is not None}
        config = ProbeConfig(concept=concept, **given)
    _check_text_pipeline(pipe)
    out_dir = Path(out_dir)
    variant_list = config.variant_list
    prompts = {v.name: v.prompt(config.concept) for v in variant_list}
    anchor_prompt = config.anchor_prompt
    maps = {name: map_words(pipe.tokenizer, prompt) for name, prompt in prompts.items()}  # length errors before any work
    text = text_analysis(pipe, config.concept, anchor_prompt, prompts)

    clip, clip_reason = (None, "image similarity switched off") if not config.image_similarity else load_clip(config.clip_model)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    chunks = math.ceil(len(config.seeds) / config.batch_size)
    total, done = len(variant_list) * chunks * config.steps, [0]

    def tick():
        done[0] += 1
        if progress is not None:
            progress(done[0], total)

    results: dict[str, VariantResult] = {}
    for variant in variant_list:
        tmap = maps[variant.name]
        sets = token_sets(tmap, config.concept)
        n_tokens = len(tmap.input_ids)
        images, mass, heat = _generate_variant(pipe, prompts[variant.name], config, n_tokens, tick)
        similarity = clip.similarity(images, anchor_prompt) if clip is not None else None
        results[variant.name] = VariantResult(
            name=variant.name,
            prompt=prompts[variant.name],
            tokens=tmap.tokens,
            concept_positions=sets.concept,
            instruction_positions=sets.instruction,
            text=text[variant.name],
            seeds=tuple(config.seeds),
            images=images,
            concept_curves=mass_on(mass, sets.concept),
            instruction_curves=mass_on(mass, sets.instruction),
            token_mass=mass[:, :, :n_tokens].mean(axis=0),
            heatmaps=heat,
            image_similarity=similarity,
        )

    result = ProbeResult(
        config=config,
        anchor_prompt=anchor_prompt,
        variants=results,
        out_dir=out_dir,
        csv_path=out_dir / "results.csv",
        summary_path=out_dir / "summary.json",
        figures={},
        image_paths={},
        rows=probe_rows(results),
        image_similarity_reason=None if clip is not None else clip_reason,
        seconds=0.0,
    )
    write_outputs(result)
    result.seconds = time.perf_counter() - started
    result.summary_path.write_text(json.dumps(result.summary(), indent=2))
    return result


def probe_rows(results: dict[str, VariantResult]) -> list[dict]:
    """One row per variant and seed, with the CSV columns."""
    rows = []
    for v in results.values():
        c_auc, i_auc = v.concept_auc, v.instruction_auc
        for k, seed in enumerate(v.seeds):
            rows.append(
                {
                    "variant": v.name,
                    "prompt": v.prompt,
                    "seed": seed,
                    "text_cosine": round(v.text.cosine, 6),
                    "drop_without_concept": round(v.text.drop_without_concept, 6),
                    "drop_without_instruction": round(v.text.drop_without_instruction, 6),
                    "concept_auc": round(c_auc[k], 6),
                    "instruction_auc": round(i_auc[k], 6),
                    "image_similarity": "" if v.image_similarity is None else round(v.image_similarity[k], 6),
                }
            )
    return rows


def _safe_name(name: str) -> str:
    return re.sub(r"[^\w-]+", "_", name)[:40] or "variant"


def write_outputs(result: ProbeResult) -> None:
    """CSV, per-image PNGs and the figures (summary.json is written by run_probe)."""
    out = result.out_dir
    (out / "images").mkdir(parents=True, exist_ok=True)
    with open(result.csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(result.rows)
    for name, v in result.variants.items():
        paths = []
        for seed, image in zip(v.seeds, v.images):
            path = out / "images" / f"{_safe_name(name)}_seed{seed}.png"
            image.save(path)
            paths.append(path)
        result.image_paths[name] = paths
    result.figures["similarity"] = plot_similarity(result, out / "similarity.png")
    result.figures["attention_mass"] = plot_attention_mass(result, out / "attention_mass.png")
    result.figures["images"] = plot_images(result, out / "images.png")
    for name, v in result.variants.items():
        if v.heatmaps is not None:
            result.figures[f"heatmaps_{name}"] = plot_heatmaps(v, out / f"heatmaps_{_safe_name(name)}.png", result.config.heatmap_steps, result.config.max_heatmap_tokens)


def export_zip(result: ProbeResult, path: str | Path | None = None) -> Path:
    """One zip with the CSV, summary.json, the figures and the images."""
    path = Path(path) if path else result.out_dir / "probe_export.zip"
    files = [result.csv_path, result.summary_path, *result.figures.values(), *(p for ps in result.image_paths.values() for p in ps)]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for file in files:
            if Path(file).is_file():
                archive.write(file, Path(file).relative_to(result.out_dir).as_posix())
    return path


# -- figures (matplotlib, Agg, no pyplot state) ------------------------------------------------
def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=90, layout="constrained")


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def plot_similarity(result: ProbeResult, path: Path) -> Path:
    """Paper fig. 2–3 style: text cosine to the anchor, token ablation, CLIP image similarity."""
    names = list(result.variants)
    vs = [result.variants[n] for n in names]
    x = np.arange(len(names))
    fig = _figure(12, 3.6)
    axes = fig.subplots(1, 3)
    ax = axes[0]
    ax.bar(x - 0.2, [v.text.cosine for v in vs], 0.4, label="pooled")
    ax.bar(x + 0.2, [v.text.cosine_mean for v in vs], 0.4, label="mean over tokens")
    low = min([v.text.cosine for v in vs] + [v.text.cosine_mean for v in vs])
    ax.set_ylim(min(0.0, low - 0.05), 1.02)
    ax.set_title(f"(a) text cosine to anchor\n'{result.anchor_prompt}'", fontsize=9)
    ax.legend(fontsize=8, loc="lower left")
    ax = axes[1]
    ax.bar(x - 0.2, [v.text.drop_without_concept for v in vs], 0.4, label="remove concept tokens", color="tab:red")
    ax.bar(x + 0.2, [v.text.drop_without_instruction for v in vs], 0.4, label="remove instruction tokens", color="tab:gray")
    ax.axhline(0, color="black", lw=0.6)
    ax.set_title("(b) token ablation: drop in text cosine", fontsize=9)
    ax.legend(fontsize=8)
    ax = axes[2]
    if result.image_similarity_reason is None:
        means = [float(np.mean(v.image_similarity)) for v in vs]
        stds = [float(np.std(v.image_similarity)) for v in vs]
        ax.bar(x, means, 0.6, yerr=stds, capsize=3, color=_colors(len(vs)))
        ax.set_title("(c) CLIP image–text similarity to anchor", fontsize=9)
    else:
        ax.text(0.5, 0.5, "CLIP image similarity unavailable:\n" + _wrap(result.image_similarity_reason, 50), ha="center", va="center", fontsize=8, transform=ax.transAxes)
        ax.set_title("(c) CLIP image–text similarity", fontsize=9)
        ax.set_axis_off()
    for ax in axes[:2] if result.image_similarity_reason else axes:
        ax.set_xticks(x, names, rotation=20, fontsize=8)
    fig.savefig(path)
    return path


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(line for part in text.split("\n") for line in textwrap.wrap(part, width)[:6])


def plot_attention_mass(result: ProbeResult, path: Path) -> Path:
    """Paper fig. 4 style: M_t(concept) and M_t(instruction) over normalised steps, AUC in legend."""
    fig = _figure(11, 3.8)
    axes = fig.subplots(1, 2, sharey=True)
    colors = _colors(len(result.variants))
    for color, v in zip(colors, result.variants.values()):
        for ax, curves, aucs in ((axes[0], v.concept_curves, v.concept_auc), (axes[1], v.instruction_curves, v.instruction_auc)):
            mean = curves.mean(axis=0)
            xs = np.linspace(0, 1, mean.size) if mean.size > 1 else np.array([0.0])
            ax.plot(xs, mean, color=color, marker="o" if mean.size < 3 else None, label=f"{v.name} (AUC {np.mean(aucs):.3f})")
            if curves.shape[0] > 1:
                ax.fill_between(xs, curves.min(axis=0), curves.max(axis=0), color=color, alpha=0.15)
    axes[0].set_title(f"attention mass on concept tokens ('{result.config.concept}')", fontsize=9)
    axes[1].set_title("attention mass on instruction tokens", fontsize=9)
    for ax in axes:
        ax.set_xlabel("denoising progress (normalised step)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("M_t(S)")
    fig.savefig(path)
    return path


def heatmap_steps(total: int, count: int) -> list[int]:
    """`count` evenly spaced step indices in [0, total)."""
    return sorted({int(round(s)) for s in np.linspace(0, total - 1, min(count, total))})


def plot_heatmaps(v: VariantResult, path: Path, columns: int = 6, max_tokens: int = 8) -> Path:
    """Grid of per-token heat maps (rows: concept then instruction tokens) over denoising steps."""
    positions = list(v.concept_positions) + list(v.instruction_positions)
    if not positions:
        positions = list(range(1, len(v.tokens) - 1))
    positions = positions[:max_tokens]
    steps = heatmap_steps(v.heatmaps.shape[0], columns)
    fig = _figure(1.3 * len(steps) + 1.2, 1.3 * len(positions) + 0.6)
    axes = np.atleast_2d(fig.subplots(len(positions), len(steps), squeeze=False))
    for r, pos in enumerate(positions):
        maps = v.heatmaps[:, pos]
        vmin, vmax = float(maps.min()), float(maps.max())
        for c, step in enumerate(steps):
            ax = axes[r, c]
            ax.imshow(maps[step], cmap="magma", vmin=vmin, vmax=max(vmax, vmin + 1e-12), interpolation="bilinear")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"step {step + 1}", fontsize=8)
            if c == 0:
                ax.set_ylabel(v.token_label(pos).replace(" (", "\n("), fontsize=7)
    title = f"{v.name}: '{v.prompt}'\n(colour scale per token row: its min to max over steps)"
    fig.suptitle(_wrap(title, int(14 * len(steps) + 12)), fontsize=8)
    fig.savefig(path)
    return path


def plot_images(result: ProbeResult, path: Path) -> Path:
    """Images per variant (rows) and seed (columns), same initial noise per column."""
    names = list(result.variants)
    seeds = result.config.seeds
    fig = _figure(1.4 * len(seeds) + 1.4, 1.4 * len(names) + 0.3)
    axes = np.atleast_2d(fig.subplots(len(names), len(seeds), squeeze=False))
    for r, name in enumerate(names):
        for c, (seed, image) in enumerate(zip(seeds, result.variants[name].images)):
            ax = axes[r, c]
            ax.imshow(np.asarray(image))
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"seed {seed}", fontsize=8)
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.savefig(path)
    return path


def heatmap_image(result: ProbeResult, variant: str, position: int, step: int, size: int = 256):
    """One token's heat map at one step as an RGB PIL image (colour scale: that token's min to max over steps)."""
    from matplotlib import colormaps
    from PIL import Image

    v = result.variants[variant]
    if v.heatmaps is None:
        raise ValueError("this probe kept no heat maps")
    maps = v.heatmaps[:, int(position)]
    step = min(max(int(step), 0), maps.shape[0] - 1)
    low, high = float(maps.min()), float(maps.max())
    scaled = (maps[step] - low) / max(high - low, 1e-12)
    rgb = (colormaps["magma"](np.clip(scaled, 0, 1))[..., :3] * 255).astype(np.uint8)
    return Image.fromarray(rgb).resize((size, size), Image.BILINEAR)


def token_choices(result: ProbeResult, variant: str) -> list[tuple[str, int]]:
    """(label, position) for each word token of a variant's prompt (start/end excluded)."""
    v = result.variants[variant]
    tmap_positions = range(1, len(v.tokens) - 1)
    return [(v.token_label(p), p) for p in tmap_positions]


# -- loading and CLI ---------------------------------------------------------------------------
def load_pipeline(model: str = DEMO_MODEL, device: str = "auto"):
    """`DiffusionPipeline.from_pretrained(model)` (no remote code) on a device; raises ModelLoadError."""
    from unlearn_core.models import load_model

    return load_model(model, device).pipe


def register_cli(subparsers):
    """Add the `probe` verb to an argparse sub-parser collection; returns its parser."""
    parser = subparsers.add_parser("probe", help="instruction-forgetting analysis: why 'forget X' in the prompt does not work")
    parser.add_argument("--model", default=DEMO_MODEL, help="hub id or local diffusers folder (default: the embedded demo model)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--concept", required=True, help="the concept X, e.g. 'the flag of japan'")
    parser.add_argument("--seeds", default="0-3", help="'0-3', '0,2,5' or '7'")
    parser.add_argument("--out", required=True, help="output folder (CSV, summary.json, PNGs)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--variant", action="append", default=None, help="extra prompt variant, 'name: template' with {concept} (repeatable)")
    parser.add_argument("--no-default-variants", action="store_true", help="use only the --variant prompts")
    parser.add_argument("--heatmap-resolution", type=int, default=16)
    parser.add_argument("--clip-model", default=None, help=f"CLIP id/folder for image similarity (default: ${CLIP_ENV} or {CLIP_DEFAULT})")
    parser.set_defaults(func=probe_main)
    return parser


def probe_main(args) -> int:
    """Run the probe from parsed CLI arguments; prints the key numbers."""
    from tqdm.auto import tqdm

    variants = ([] if args.no_default_variants else list(DEFAULT_VARIANTS)) + list(args.variant or [])
    config = ProbeConfig(
        concept=args.concept,
        variants=variants,
        seeds=parse_seeds(args.seeds),
        steps=args.steps,
        guidance=args.guidance,
        heatmap_resolution=args.heatmap_resolution,
        clip_model=args.clip_model,
    )
    pipe = load_pipeline(args.model, args.device)
    with tqdm(total=1, desc="probe", unit="step") as bar:

        def progress(done, total):
            bar.total = total
            bar.update(done - bar.n)

        result = run_probe(pipe, config, out_dir=args.out, progress=progress)
    print(f"anchor: {result.anchor_prompt!r}")
    print(f"{'variant':<12} {'text cos':>9} {'-concept':>9} {'-instr':>9} {'concept AUC':>12} {'instr AUC':>10} {'image sim':>10}")
    for v in result.variants.values():
        image = "n/a" if v.image_similarity is None else f"{np.mean(v.image_similarity):.4f}"
        print(f"{v.name:<12} {v.text.cosine:9.4f} {v.text.drop_without_concept:9.4f} {v.text.drop_without_instruction:9.4f} {np.mean(v.concept_auc):12.4f} {np.mean(v.instruction_auc):10.4f} {image:>10}")
    if result.image_similarity_reason:
        print(f"image similarity: not computed ({result.image_similarity_reason})")
    print(f"wrote {result.csv_path}, {result.summary_path} and {len(result.figures)} figures in {result.out_dir} ({result.seconds:.1f} s)")
    return 0
