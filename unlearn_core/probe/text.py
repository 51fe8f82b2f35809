"""Text side of the probe, and the optional CLIP scorer of the image side.

Text: each variant's prompt and the anchor `a photo of X` go through the model's own (first) text
encoder as token-id sequences. Two embeddings are compared to the anchor's by cosine similarity:
the pooled embedding, and the mean of the last hidden state over the word tokens (start/end
tokens and padding left out). Token ablation re-encodes the prompt with the concept tokens, then
the instruction tokens, removed (see `tokens`), and reports how much the pooled and mean cosines
drop: if removing the instruction barely moves the embedding, the model cannot "read" it.

Image: when a CLIP model can be loaded, the CLIP image–text cosine of each image to the anchor.
CLIP is optional; when it cannot be loaded the probe goes on without it and reports why. The model
is the argument, else the `clip_model` setting (`HOTFIX_CLIP_MODEL`), else CLIP ViT-B/32. A
folder path is loaded from disk; a hub id from the local Hugging Face cache first, then from the
hub unless `HF_HUB_OFFLINE` is set or the hub cannot be reached within the download timeout. Loaded scorers are kept (at most two); failures are not, so a
model that appears later (a download, a fixed setting) is picked up by the next probe.
"""

from __future__ import annotations

import os
import socket
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence
from urllib.parse import urlparse

import torch

from unlearn_core import settings
from unlearn_core.errors import InvalidInput
from unlearn_core.probe.config import CLIP_DEFAULT, CLIP_ENV
from unlearn_core.probe.tokens import map_words, padded, token_sets, without_positions


@dataclass
class TextScores:
    """Similarity of a variant's text embedding to the anchor's, and the token-ablation drops."""

    cosine: float  # pooled embedding
    cosine_mean: float  # mean over word tokens of the last hidden state
    drop_without_concept: float  # cosine − cosine with the concept tokens removed (pooled)
    drop_without_instruction: float
    drop_without_concept_mean: float
    drop_without_instruction_mean: float


def text_encoder_of(model) -> tuple:
    """(tokenizer, text encoder) of a `DiffusionModel`'s pipeline: the first CLIP encoder for SD3.

    Raises InvalidInput for a model without text conditioning (the probe needs a text-to-image model).
    """
    pipe = model.pipe
    tokenizer, encoder = getattr(pipe, "tokenizer", None), getattr(pipe, "text_encoder", None)
    if not model.conditional or tokenizer is None or encoder is None:
        raise InvalidInput(f"{type(pipe).__name__} has no text encoder: the instruction probe needs a text-to-image model")
    return tokenizer, encoder


@torch.no_grad()
def encode_token_ids(tokenizer, encoder, sequences: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled, mean-over-word-tokens) text embeddings of unpadded id sequences, float32 CPU."""
    max_length = int(tokenizer.model_max_length)
    batch = torch.tensor([padded(tokenizer, s, max_length) for s in sequences], device=encoder.device)
    out = encoder(batch)
    hidden = out.last_hidden_state.float()
    pooled = getattr(out, "pooler_output", None)
    if pooled is None:  # CLIPTextModelWithProjection (SD3): the projected embedding
        pooled = out.text_embeds
    means = []
    for row, seq in enumerate(sequences):
        n = min(len(seq), max_length)
        span = hidden[row, 1 : n - 1] if n > 2 else hidden[row, max(n - 1, 0) : n]
        means.append(span.mean(dim=0))
    return pooled.float().cpu(), torch.stack(means).cpu()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.unsqueeze(0), b.unsqueeze(0)).item())


def text_analysis(tokenizer, encoder, concept: str, anchor_prompt: str, prompts: dict[str, str]) -> dict[str, TextScores]:
    """Cosine of each prompt's text embedding to the anchor, and the token-ablation drops."""
    anchor = map_words(tokenizer, anchor_prompt)
    sequences = [list(anchor.input_ids)]
    for prompt in prompts.values():
        tmap = map_words(tokenizer, prompt)
        sets = token_sets(tmap, concept)
        sequences += [list(tmap.input_ids), without_positions(tmap, sets.concept), without_positions(tmap, sets.instruction)]
    pooled, mean = encode_token_ids(tokenizer, encoder, sequences)
    scores = {}
    for k, name in enumerate(prompts):
        full, no_concept, no_instr = 1 + 3 * k, 2 + 3 * k, 3 + 3 * k
        cos_p, cos_m = cosine(pooled[full], pooled[0]), cosine(mean[full], mean[0])
        scores[name] = TextScores(
            cosine=cos_p,
            cosine_mean=cos_m,
            drop_without_concept=cos_p - cosine(pooled[no_concept], pooled[0]),
            drop_without_instruction=cos_p - cosine(pooled[no_instr], pooled[0]),
            drop_without_concept_mean=cos_m - cosine(mean[no_concept], mean[0]),
            drop_without_instruction_mean=cos_m - cosine(mean[no_instr], mean[0]),
        )
    return scores


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

    @torch.no_grad()
    def image_embeddings(self, images: Sequence) -> torch.Tensor:
        """CLIP's projected image embeddings, one row per image (float32)."""
        inputs = self.processor(images=list(images), return_tensors="pt")
        features = self.model.get_image_features(**inputs)
        # transformers 5 returns an output whose pooler_output is the projected embedding; 4.x a tensor
        return (features if isinstance(features, torch.Tensor) else features.pooler_output).float()


class ClipUnavailable(Exception):
    """Why no CLIP scorer could be loaded (the probe reports it and goes on without CLIP)."""


_LOADED: OrderedDict[str, ClipScorer] = OrderedDict()  # successes only, most recent last
_KEEP = 2
_LOCK = threading.Lock()


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _hub_reachable() -> bool:
    """One TCP connection to the hub, bounded by the download-timeout setting (this socket's own
    timeout, nothing process-wide): without it an offline server waits out the hub client's retries
    (about a minute) on every probe before reporting CLIP unavailable."""
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=settings.current().download_timeout_s).close()
        return True
    except OSError:
        return False


def _looks_like_path(source: str) -> bool:
    """A folder path, not a hub id ('org/name'): absolute, ~ or . prefixed, or more than one '/'."""
    return Path(source).expanduser().is_absolute() or source.startswith((".", "~")) or source.count("/") > 1 or "\\" in source


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


def _load_clip(source: str) -> ClipScorer:
    """Load CLIP from a folder or the hub; raises ClipUnavailable with the reason."""
    try:
        from transformers import CLIPModel, CLIPProcessor
    except ImportError as error:
        raise ClipUnavailable(f"transformers has no CLIP ({error})") from None

    def load(name: str, **kwargs) -> ClipScorer:
        return ClipScorer(CLIPModel.from_pretrained(name, **kwargs), CLIPProcessor.from_pretrained(name, **kwargs), source)

    hint = f"set {CLIP_ENV} to a local CLIP folder"
    local = Path(source).expanduser()
    # transformers raises OSError, ValueError, HTTP and safetensors errors alike: each becomes the reason.
    try:
        if local.is_dir():
            return load(str(local))
        if _looks_like_path(source):
            raise ClipUnavailable(f"no CLIP model folder at {source!r}; {hint} or a hub id")
        try:  # the local Hugging Face cache first: no network round trips
            return load(source, local_files_only=True)
        except OSError:
            if _offline():
                raise ClipUnavailable(f"CLIP model {source!r} is not in the local cache and HF_HUB_OFFLINE is set; {hint}") from None
            if not _hub_reachable():
                raise ClipUnavailable(f"CLIP model {source!r} is not in the local cache and the Hugging Face hub is unreachable (offline); {hint}") from None
        return load(source)
    except ClipUnavailable:
        raise
    except Exception as error:
        raise ClipUnavailable(f"cannot load CLIP model {source!r}: {_first_line(error)} ({hint} if the hub is unreachable)") from None


def load_clip(source: str | None = None) -> tuple[ClipScorer | None, str | None]:
    """(scorer, None) or (None, reason). Source: the argument, else the `clip_model` setting, else CLIP ViT-B/32."""
    source = source or settings.current().clip_model or CLIP_DEFAULT
    with _LOCK:
        if source in _LOADED:
            _LOADED.move_to_end(source)
            return _LOADED[source], None
        try:
            scorer = _load_clip(source)
        except ClipUnavailable as reason:
            return None, str(reason)
        _LOADED[source] = scorer
        while len(_LOADED) > _KEEP:
            _LOADED.popitem(last=False)
        return scorer, None
