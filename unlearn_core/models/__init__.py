"""Models: `load_model(source)` returns a `DiffusionModel` of the right family.

`base` holds the interface and sampling records, `families` the Stable Diffusion, SD3, SDXL and
pixel DDPM implementations.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from unlearn_core import settings
from unlearn_core.config import DEMO_MODEL
from unlearn_core.errors import ModelLoadError, without_server_paths
from unlearn_core.models.base import DiffusionModel, Provenance, SamplingRecord, pick_device, resolve_dtype, sdedit_steps, seeded_generators
from unlearn_core.models.families import PixelDDPMModel, StableDiffusion3Model, StableDiffusionModel, StableDiffusionXLModel, TextToImageModel
from unlearn_core.settings import DEMO_MODEL_DIR

__all__ = ["DiffusionModel", "Provenance", "SamplingRecord", "PixelDDPMModel", "StableDiffusion3Model", "StableDiffusionModel",
           "StableDiffusionXLModel", "TextToImageModel", "load_model", "wrap_pipeline", "family_of", "pick_device", "sdedit_steps", "seeded_generators"]


FAMILIES = {
    "StableDiffusionPipeline": StableDiffusionModel,
    "StableDiffusion3Pipeline": StableDiffusion3Model,
    "StableDiffusionXLPipeline": StableDiffusionXLModel,
    "DDPMPipeline": PixelDDPMModel,
    "DDIMPipeline": PixelDDPMModel,
}


def family_of(pipe) -> type[DiffusionModel]:
    name = type(pipe).__name__
    if name not in FAMILIES:
        raise ModelLoadError(f"{name} is not supported; use a Stable Diffusion 1.x/2.x, SDXL, Stable Diffusion 3 or DDPM model")
    return FAMILIES[name]


def wrap_pipeline(pipe, source: str, device: str | torch.device = "auto") -> DiffusionModel:
    """Put an already-built pipeline behind the interface (tests build tiny ones from configs)."""
    return family_of(pipe)(pipe, source, pick_device(device) if isinstance(device, str) else device)


def allowed_model(source: str) -> None:
    """Apply the server's optional allow-list (`Settings.model_allowlist`: ids or folders)."""
    allow = settings.current().model_allowlist
    if allow and source not in allow and source != DEMO_MODEL:
        raise ModelLoadError(f"model {source!r} is not on this server's allow-list")


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}")  # owner/name, as the Hub spells repository ids
NOT_OFFERED = ("this server loads models by Hugging Face id (owner/name), the demo model{listed}; "
               "folders on the server are not offered to the web")


def from_hub_only(source: str) -> bool:
    """For a web caller: whether `source` must come from the Hub even where a folder of that name
    exists here. The demo, the allow-list and (on a server that allows it) local folders load as
    named. Anything else that is not an owner/name id is refused with one message, the same
    whether or not such a folder exists, so the model box cannot probe the disk."""
    config = settings.current()
    if source == DEMO_MODEL or source in config.model_allowlist or config.web_loads_folders:
        return False
    if HUB_ID.fullmatch(source) and ".." not in source:
        return True
    listed = f" or one of: {', '.join(config.model_allowlist)}" if config.model_allowlist else ""
    raise ModelLoadError(NOT_OFFERED.format(listed=listed))


def _absent_components(path: Path) -> dict:
    """Components a local folder saved as null (e.g. SD3 without T5) must be passed as None."""
    index = path / "model_index.json"
    if not index.is_file():
        return {}
    try:
        entries = json.loads(index.read_text())
    except ValueError as error:
        raise ModelLoadError(f"{index} is not valid JSON ({error})") from None
    return {name: None for name, value in entries.items() if isinstance(value, list) and value[:1] == [None]}


def _hub_reason(error: Exception, source: str) -> str | None:
    """What to do about a Hub refusal anywhere in the error's chain (gated, missing, offline), or None."""
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    gated = f"it is gated: accept its licence on https://huggingface.co/{source} while logged in, then set HF_TOKEN (or run `hf auth login`) on this server"
    missing = "there is no such model on the Hub (or it is private: set HF_TOKEN to a token that can read it)"
    offline = "it is not downloaded yet and the Hub cannot be reached from this server (no network?)"
    seen = error
    while seen is not None:
        if isinstance(seen, GatedRepoError):
            return gated
        if isinstance(seen, RepositoryNotFoundError):
            return missing
        if isinstance(seen, LocalEntryNotFoundError):
            return offline
        seen = seen.__cause__ or seen.__context__
    text = str(error).lower()  # diffusers re-raises some of these as plain OSErrors with the reason in words
    if "gated" in text:
        return gated
    if "not fully cached locally" in text or "couldn't connect" in text or "offline" in text:
        return offline
    return None


def _hub_snapshot(pipeline_class, source: str) -> Path:
    """The Hub repository's files in the local cache (diffusers' own download, which never looks at
    folders here), or `ModelLoadError` with the Hub's reason."""
    try:
        return Path(pipeline_class.download(source))
    except Exception as error:  # huggingface_hub raises many kinds: HTTP, offline, gated, not found
        reason = _hub_reason(error, source) or without_server_paths(str(error).splitlines()[0][:300] if str(error) else type(error).__name__)
        raise ModelLoadError(f"cannot load model {source!r}: {reason}") from error


def load_model(source: str = DEMO_MODEL, device: str = "auto", dtype: str | torch.dtype | None = None, without_t5: bool | None = None,
               web: bool = False) -> DiffusionModel:
    """Load a hub id or local diffusers folder; never runs remote code. Raises `ModelLoadError`.

    `dtype` (auto | fp32 | fp16 | bf16 or a torch dtype) and `without_t5` (drop SD3's T5 encoder;
    the pipeline then pads with zeros, as diffusers allows) default to the settings. `web`: the
    name came from a web caller, so `from_hub_only` decides what it may be.
    """
    from diffusers import DiffusionPipeline

    source = (source or DEMO_MODEL).strip()
    allowed_model(source)
    if len(source) > 300 or "\x00" in source:
        raise ModelLoadError("model name is not a valid hub id or folder")
    path = DEMO_MODEL_DIR if source == DEMO_MODEL else Path(source)  # the demo model lives in the package, wherever the working directory is
    if web and from_hub_only(source):
        path = _hub_snapshot(DiffusionPipeline, source)
    elif path.exists() and not (path / "model_index.json").is_file():
        raise ModelLoadError(f"{source} is not a diffusers model folder (no model_index.json)")
    config = settings.current()
    target = pick_device(device)
    kwargs = {"trust_remote_code": False, **_absent_components(path)}
    if config.without_t5 if without_t5 is None else without_t5:
        kwargs.update(text_encoder_3=None, tokenizer_3=None)
    chosen = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype or config.dtype, target)
    if chosen != torch.float32:
        kwargs["torch_dtype"] = chosen
    try:
        pipe = DiffusionPipeline.from_pretrained(str(path) if path.exists() else source, **kwargs)
    except Exception as error:  # diffusers raises many kinds: OSError, ValueError, HTTP errors
        reason = _hub_reason(error, source) if not path.exists() else None
        reason = reason or without_server_paths(str(error).splitlines()[0][:300] if str(error) else type(error).__name__)
        raise ModelLoadError(f"cannot load model {source!r}: {reason}") from error
    return wrap_pipeline(pipe, source, target)
