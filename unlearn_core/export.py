"""What a run publishes: the adapter card (JSON), the Hub model card (README.md), a kohya-format
copy of the LoRA for ComfyUI / AUTOMATIC1111 (for SD3 an "interchange" copy with alpha folded in),
the adapter folder as one zip, and a push to the Hub.

The target and surrogate images show the very output being removed, so none of these include them
unless the operator asks for it (`include_images`).
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import torch

from unlearn_core import __version__
from unlearn_core.config import DEMO_MODEL, UnlearnConfig
from unlearn_core.errors import InvalidInput, NotReady
from unlearn_core.files import write_bytes_atomic
from unlearn_core.runfolder import RunFolder

TAGS = ["lora", "diffusers", "text-to-image", "hotfix-studio", "unlearning"]
REPO_ID_HELP = "a Hub repository id like 'your-name/chad-flag-hotfix'"


# -- files for other tools ------------------------------------------------------------------------
# The labels kohya sd-scripts writes, as AUTOMATIC1111 reads them (extensions-builtin/Lora/network.py,
# `detect_version`): SDXL when `ss_base_model_version` starts with "sdxl_", SD2 when `ss_v2` is "True",
# otherwise SD1. The values are sd-scripts' own: `get_model_version_str_for_sd1_sd2` (library/model_util.py,
# "sd_v1"/"sd_v2" plus "_v" for v-prediction), `MODEL_VERSION_SDXL_BASE_V1_0` (library/sdxl_model_util.py)
# and the ModelSpec `ARCH_*`/`IMPL_*` ids (library/sai_model_spec.py).
SD2_CONTEXT_DIM = 1024  # SD2's OpenCLIP ViT-H text states (SD1's CLIP ViT-L: 768); sd-scripts' V2_UNET_PARAMS_CONTEXT_DIM
MODELSPEC_VERSION = "1.0.1"


def kohya_labels(model) -> dict[str, str]:
    """`ss_v2`, `ss_base_model_version` and the ModelSpec architecture of a UNet family's LoRA.
    diffusers has one pipeline for SD1 and SD2 (so does this project's `StableDiffusionModel`): SD2
    is told by the width of the text states its UNet cross-attends to, 1024, as AUTOMATIC1111 tells
    SD2 checkpoints by their 1024-wide text encoder."""
    v_prediction = model.prediction_type == "v_prediction"
    if model.family == "stable-diffusion-xl":
        v2, version, architecture = False, "sdxl_base_v1-0", "stable-diffusion-xl-v1-base"
    else:
        v2 = model.denoiser.config.cross_attention_dim == SD2_CONTEXT_DIM
        version = f"sd_v{2 if v2 else 1}{'_v' if v_prediction else ''}"
        architecture = ("stable-diffusion-v2-768-v" if v_prediction else "stable-diffusion-v2-512") if v2 else "stable-diffusion-v1"
    return {"ss_v2": str(v2), "ss_base_model_version": version, "modelspec.architecture": f"{architecture}/lora",
            "modelspec.prediction_type": "v" if v_prediction else "epsilon"}


def kohya_metadata(model, folder: RunFolder) -> dict[str, str]:
    """The safetensors header sd-scripts' train_network.py writes for a LoRA, reduced to what describes
    the network and its base (no training statistics): its labels plus ModelSpec's required fields."""
    config = model.denoiser.peft_config[model.adapter_name]
    width, height = model.image_size
    return {
        "ss_network_module": "networks.lora", "ss_network_dim": str(config.r), "ss_network_alpha": str(float(config.lora_alpha)),
        **kohya_labels(model),
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        # sd-scripts' determine_implementation: an SDXL LoRA is Stability AI's (sgm) layout, others "diffusers"
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models" if model.family == "stable-diffusion-xl" else "diffusers",
        "modelspec.title": f"Hotfix LoRA {folder.path.name}",
        "modelspec.resolution": f"{width}x{height}",
    }


def save_kohya(model, folder: RunFolder) -> list[str]:
    """The copies of the LoRA that tools other than diffusers load at the trained strength: kohya's
    format for UNet families (`save_kohya_file`), the interchange file for SD3's transformer
    (`save_interchange`). Pixel DDPM gets neither. Returns the file names written."""
    if not model.conditional:
        return []
    if getattr(model, "denoiser_attribute", None) == "unet":
        return [save_kohya_file(model, folder)]
    return [save_interchange(model, folder)]


def save_kohya_file(model, folder: RunFolder) -> str:
    """The UNet LoRA in kohya's format (`lora_unet_…` keys, one `.alpha` per module) with sd-scripts'
    labels, which ComfyUI, AUTOMATIC1111 and SD.Next load. diffusers' `convert_state_dict_to_kohya`
    renames the keys but writes alpha = rank; the adapter's own `lora_alpha` is written instead, or
    it would load at the wrong strength."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    from safetensors.torch import save

    config = model.denoiser.peft_config[model.adapter_name]
    state = convert_state_dict_to_kohya({f"unet.{key}": value.detach().cpu().contiguous() for key, value in model.lora_state_dict().items()})
    for key in [key for key in state if key.endswith(".alpha")]:
        state[key] = torch.tensor(float(config.lora_alpha))
    write_bytes_atomic(folder.kohya_weights, save(state, metadata=kohya_metadata(model, folder)))
    return folder.kohya_weights.name


def lora_scales(model) -> dict[str, float]:
    """Each adapted layer's scale (peft's `scaling`: lora_alpha / r, or what rsLoRA and per-layer
    patterns make it), by the module name `get_peft_model_state_dict` keys start with."""
    from peft.tuners.lora import LoraLayer

    return {name: module.scaling[model.adapter_name] for name, module in model.denoiser.named_modules()
            if isinstance(module, LoraLayer) and model.adapter_name in module.scaling}


def save_interchange(model, folder: RunFolder) -> str:
    """The LoRA in diffusers' key naming (`transformer.….lora_A/lora_B.weight`, what
    `pipe.load_lora_weights` and ComfyUI read) with each layer's scale folded into `lora_B` and no
    alpha in the file: a loader that ignores the adapter metadata of diffusers' own file (ComfyUI
    applies alpha only from `.alpha` keys, else scale 1) then loads it at the trained strength, and
    diffusers, finding no alpha, takes alpha = rank, scale 1, as well. The scale is folded by hand
    because neither diffusers nor peft write such a file; diffusers' `pack_weights` adds the prefix."""
    from diffusers.loaders.lora_base import LoraBaseMixin
    from safetensors.torch import save

    state = {key: value.detach().cpu() for key, value in model.lora_state_dict().items()}
    for name, scale in lora_scales(model).items():
        state[f"{name}.lora_B.weight"] = state[f"{name}.lora_B.weight"] * scale
    state = LoraBaseMixin.pack_weights({key: value.contiguous() for key, value in state.items()}, model.denoiser_attribute)
    write_bytes_atomic(folder.interchange_weights, save(state, metadata={"format": "pt"}))
    return folder.interchange_weights.name


# -- cards ----------------------------------------------------------------------------------------
def adapter_card(folder: RunFolder, model, targets, config: UnlearnConfig, files: list[str], metrics: dict | None, summary: dict) -> dict:
    """The machine-readable card (`adapter_card.json`): provenance, settings, training, metrics."""
    return {
        "hotfix_studio_version": __version__,
        "base_model": model.source,
        "family": model.family,
        "prediction_type": model.prediction_type,
        "adapter_files": files,
        "load_with": "pipe.load_lora_weights(run_dir)" if model.family != "ddpm" else "peft.PeftModel.from_pretrained(unet, run_dir)",
        "targets": [{"prompt": t.prompt, "seed": t.seed, "target_image": folder.training_image("target", i).name, "surrogate_image": folder.training_image("surrogate", i).name} for i, t in enumerate(targets)],
        "config": config.to_dict(),
        "training": summary,
        "metrics": metrics,
    }


def _metric_lines(metrics: dict | None) -> list[str]:
    if not metrics:
        return ["Not evaluated."]
    forgetting = metrics.get("forgetting", {})
    lines = []
    if forgetting.get("toward_surrogate") is not None:
        lines.append(f"- **Verdict: {forgetting['verdict']}** — the painted pixels of the target seed moved {forgetting['toward_surrogate']:.0%} of the way to the surrogate (fixed at ≥ {forgetting.get('fixed_at', 0.7):.0%}).")
    for prompt, scores in metrics.get("integrity", {}).items():
        ssim = scores.get("ssim", {})
        lines.append(f"- Other seeds of `{prompt}`: SSIM before/after {ssim.get('value', float('nan')):.3f}; {scores.get('ssim_at_least_0.9', '?')} of {len(scores.get('seeds', []))} at ≥ 0.9.")
    missing = [name for name, state in metrics.get("availability", {}).items() if not state.get("available")]
    if missing:
        lines.append(f"- Not computed where it was trained (no weights for their networks): {', '.join(missing)}.")
    return lines


def trained_line(training: dict) -> str:
    """The steps actually trained and whose weights were saved (the planned `steps` is only a plan:
    training stops early once fixed, trains on while it is not, and may keep an earlier step's weights)."""
    if not training.get("steps_run"):
        return ""
    run, kept = training["steps_run"], training.get("weights_of_step") or training["steps_run"]
    return f"Trained {run} steps; the weights of step {kept} are the ones saved. " if kept != run else f"Trained {run} steps. "


def model_card(card: dict, folder: RunFolder, kohya: bool) -> str:
    """The Hub model card (README.md with YAML front matter) of a run, from its adapter card."""
    from huggingface_hub import ModelCard, ModelCardData

    base = card["base_model"]
    data = ModelCardData(base_model=None if base == DEMO_MODEL or Path(base).exists() else base, tags=TAGS,
                         license="apache-2.0" if base == DEMO_MODEL else "other", library_name="diffusers")
    targets = "\n".join(f"- prompt `{t['prompt']}`, seed {t['seed']}" for t in card["targets"])
    config = card["config"]
    settings = ", ".join(f"`{key}={config[key]}`" for key in ("method", "learning_rate", "lora_rank", "lora_alpha", "lora_layers", "lambda_schedule", "projection", "forget_states", "remember_loss") if key in config)
    shown = "<the base model's folder>" if base != DEMO_MODEL and Path(base).exists() else base  # never a server path
    where = ("# the base: Hotfix Studio's demo model, the folder assets/demo-model of its repository\n" if base == DEMO_MODEL
             else "# the base: the local folder the adapter was trained on, not shipped with it\n" if Path(base).exists() else "")
    load = (f'```python\nfrom diffusers import DiffusionPipeline\n\n{where}pipe = DiffusionPipeline.from_pretrained("{shown}")\npipe.load_lora_weights("<this repo or folder>")\n```'
            if card["family"] != "ddpm" else '```python\nfrom peft import PeftModel\n\nunet = PeftModel.from_pretrained(pipe.unet, "<this repo or folder>")\n```')
    comfy = (f"In ComfyUI or AUTOMATIC1111, load `{folder.kohya_weights.name}` with a LoRA loader at strength 1." if kohya
             else f"In ComfyUI, load `{folder.interchange_weights.name}` with a LoRA loader at strength 1 (the same LoRA in diffusers' key names with alpha / rank folded into its weights, for loaders that ignore alpha)."
             if folder.interchange_weights.is_file()
             else "ComfyUI reads the diffusers file directly." if card["family"] != "ddpm" else "")
    text = f"""---
{data.to_yaml()}
---

# Hotfix LoRA for `{shown}`

A LoRA made with Hotfix Studio {card['hotfix_studio_version']} that removes one specific output of the base model (prompt-free instance unlearning: a forget loss toward an operator-made surrogate, a remember loss that keeps the rest, per-timestep weighting, gradient projection) and leaves the rest of the model as it was.

## What it fixes

{targets}

The flagged image and its correction are left out of the published files unless the publisher chose to include them.

## Method and settings

{trained_line(card.get('training') or {})}{settings}. Everything else: `{folder.card_file.name}`.

## Measured after training

{chr(10).join(_metric_lines(card.get('metrics')))}

## Use

{load}

{comfy}
"""
    return str(ModelCard(text))


def write_cards(folder: RunFolder, card: dict, kohya: bool) -> None:
    folder.write_card(card)
    write_bytes_atomic(folder.model_card, model_card(card, folder, kohya).encode())


# -- publishing -----------------------------------------------------------------------------------
def publishable_files(folder: RunFolder, include_images: bool = False) -> list[Path]:
    """The adapter (weights, peft config, kohya or interchange copy), both cards (a release's
    release.json), and, only if asked,
    the target and surrogate images. Never the loss log, checkpoints, status or logs."""
    files = folder.adapter_files()
    if not files:
        raise NotReady("this run has no adapter yet")
    files += [path for path in (folder.kohya_weights, folder.interchange_weights, folder.model_card, folder.path / "release.json") if path.is_file()]
    if include_images:
        files += sorted(folder.path.glob("target_*.png")) + sorted(folder.path.glob("surrogate_*.png"))
    return list(dict.fromkeys(files))


def adapter_zip(folder: RunFolder, destination: Path, include_images: bool = False) -> Path:
    """The publishable files as one zip (flat), for a single download; written atomically."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in publishable_files(folder, include_images):
            archive.write(path, arcname=path.name)
    return write_bytes_atomic(destination, buffer.getvalue())


def push_to_hub(folder: RunFolder, repo_id: str, token: str | None = None, private: bool = True, include_images: bool = False) -> str:
    """Create (or reuse) the Hub model repo and upload the publishable files; returns its URL."""
    import httpx2  # huggingface_hub's HTTP client: its connection errors are not OSErrors
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise InvalidInput(f"{repo_id!r} is not a repository id: give {REPO_ID_HELP}") from None
    files = publishable_files(folder, include_images)
    api = HfApi(token=token or None)
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=folder.path, allow_patterns=[path.name for path in files],
                          commit_message="Hotfix Studio adapter")
    except HfHubHTTPError as error:
        status = getattr(error.response, "status_code", None)
        hint = "check the token (it needs write access)" if status in (401, 403) else "no network, or the Hub refused it"
        raise InvalidInput(f"could not push to {repo_id}: {hint}") from None
    except (OSError, httpx2.HTTPError):
        raise InvalidInput(f"could not push to {repo_id}: the Hub cannot be reached from this machine") from None
    return str(url)
