"""Models: `load_model(source)` returns a `DiffusionModel` of the right family.

`base` holds the interface and sampling records, `families` the Stable Diffusion, SD3, SDXL and
pixel DDPM implementations.
"""

from __future__ import annotations

import json
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


def check_web_model(source: str) -> None:
    """What a web caller may load. A server only its own machine reaches (loopback) loads anything,
    as the CLI does; one that others reach (a Space, 0.0.0.0) loads the demo model and the
    allow-list. Every other name gets the same message, whether it is a folder that exists, one
    that does not or a Hub id, so the model box can neither probe the disk nor make the server
    download arbitrary models. `HOTFIX_LOCAL_MODELS` overrides the choice."""
    config = settings.current()
    if config.web_loads_folders or source == DEMO_MODEL or source in config.model_allowlist:
        return
    listed = f" and {', '.join(config.model_allowlist)}" if config.model_allowlist else ""
    raise ModelLoadError(f"this server offers the demo model ({DEMO_MODEL}){listed}; its operator can add models with HOTFIX_MODEL_ALLOWLIST")


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


def _dtype_argument() -> str:
    """from_pretrained's name for the precision: `dtype` where diffusers has renamed it (it warns on
    `torch_dtype` there), `torch_dtype` in the older releases the project's range allows."""
    from diffusers.utils import deprecation_utils

    return "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"


def load_model(source: str = DEMO_MODEL, device: str = "auto", dtype: str | torch.dtype | None = None, without_t5: bool | None = None,
               web: bool = False) -> DiffusionModel:
    """Load a hub id or local diffusers folder; never runs remote code. Raises `ModelLoadError`.

    `dtype` (auto | fp32 | fp16 | bf16 or a torch dtype) and `without_t5` (drop SD3's T5 encoder;
    the pipeline then pads with zeros, as diffusers allows) default to the settings. `web`: the
    name came from a web caller, so `check_web_model` decides what it may be.
    """
    from diffusers import DiffusionPipeline

    source = (source or DEMO_MODEL).strip()
    allowed_model(source)
    if len(source) > 300 or "\x00" in source:
        raise ModelLoadError("model name is not a valid hub id or folder")
    path = DEMO_MODEL_DIR if source == DEMO_MODEL else Path(source)  # the demo model lives in the package, wherever the working directory is
    if web:
        check_web_model(source)
    if path.exists() and not (path / "model_index.json").is_file():
        raise ModelLoadError(f"{source} is not a diffusers model folder (no model_index.json)")
    config = settings.current()
    target = pick_device(device)
    kwargs = {"trust_remote_code": False, **_absent_components(path)}
    if config.without_t5 if without_t5 is None else without_t5:
        kwargs.update(text_encoder_3=None, tokenizer_3=None)
    chosen = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype or config.dtype, target, demo=path == DEMO_MODEL_DIR)
    # Always named, fp32 too: without it a checkpoint saved in fp16 (as many on the Hub are) loads
    # its text encoder in fp16 beside fp32 parts, and the first prompt fails on the CPU.
    kwargs[_dtype_argument()] = chosen
    try:
        pipe = DiffusionPipeline.from_pretrained(str(path) if path.exists() else source, **kwargs)
    except Exception as error:  # diffusers raises many kinds: OSError, ValueError, HTTP errors
        reason = _hub_reason(error, source) if not path.exists() else None
        reason = reason or without_server_paths(str(error).splitlines()[0][:300] if str(error) else type(error).__name__)
        raise ModelLoadError(f"cannot load model {source!r}: {reason}") from error
    return wrap_pipeline(pipe, source, target)
