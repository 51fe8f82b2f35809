"""Model families behind one small interface (DESIGN §2 table).

`load_model(source)` returns a `DiffusionModel`: the trainer, metrics, CLI and UI only use its
methods — encode/decode, prompt conditioning, noise levels, prediction, generation, LoRA — so
none of them branches on the family.

- `StableDiffusionModel`: `StableDiffusionPipeline` (SD1.x/2.x, epsilon or v-prediction; the demo model)
- `StableDiffusion3Model`: `StableDiffusion3Pipeline` (rectified flow, MMDiT; T5 optional)
- `PixelDDPMModel`: `DDPMPipeline` / `UNet2DModel` (pixel space, unconditional)
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from unlearn_core.config import DEMO_MODEL


class ModelLoadError(RuntimeError):
    """A model that cannot be loaded, with a message for the operator."""


@dataclass(frozen=True)
class Provenance:
    """Where an image came from: enough to regenerate it exactly."""

    model: str
    family: str
    prompt: str
    seed: int
    steps: int
    guidance: float
    scheduler: str
    width: int
    height: int

    def to_dict(self) -> dict:
        return asdict(self)


def seeded_generators(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per image: an image's initial noise depends on its seed alone."""
    return [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def sdedit_steps(strength: float, steps: int) -> int:
    """Enough scheduler steps that img2img runs at least one denoising step at this strength."""
    return max(int(steps), int(np.ceil(1.0 / max(strength, 1e-3))))


class DiffusionModel:
    """The interface. Subclasses wrap one pipeline family."""

    family = "base"
    prediction_type = "epsilon"
    conditional = True
    lora_target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    adapter_name = "hotfix"

    def __init__(self, pipe, source: str, device: torch.device):
        self.pipe = pipe.to(device)
        self.source = source
        self.device = device
        if hasattr(self.pipe, "set_progress_bar_config"):
            self.pipe.set_progress_bar_config(disable=True)

    # -- properties -------------------------------------------------------------------------
    @property
    def denoiser(self) -> torch.nn.Module:
        raise NotImplementedError

    @property
    def image_size(self) -> tuple[int, int]:
        """(width, height) of generated images."""
        raise NotImplementedError

    @property
    def scheduler_name(self) -> str:
        return type(self.pipe.scheduler).__name__

    # -- data ------------------------------------------------------------------------------
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (B, 3, H, W) → x0 the denoiser works on (scaled latents or pixels)."""
        return images.to(self.device)

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        return x0

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Conditioning tensors for the denoiser, batch-first, computed once for fixed sets."""
        return {}

    # -- noise levels ----------------------------------------------------------------------
    def sample_noise_levels(self, batch: int, generator: torch.Generator):
        """Random noise levels: (model timestep, a_t, b_t, s ∈ [0, 1]) each of shape (B,)."""
        steps = self.pipe.scheduler.config.num_train_timesteps
        t = torch.randint(0, steps, (batch,), generator=generator)
        alphas = self.pipe.scheduler.alphas_cumprod.float()
        a, b = alphas[t].sqrt(), (1 - alphas[t]).sqrt()
        return t.to(self.device), a.to(self.device), b.to(self.device), (t.float() / (steps - 1)).to(self.device)

    def predict(self, denoiser, x_t: torch.Tensor, timesteps: torch.Tensor, cond: dict) -> torch.Tensor:
        raise NotImplementedError

    @property
    def x0_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of what the denoiser works on."""
        config = self.denoiser.config
        size = config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return (config.in_channels, height, width)

    def initial_noise(self, seeds: list[int]) -> torch.Tensor:
        """The initial noise generation starts from for each seed (same draw as the pipelines)."""
        noise = [torch.randn((1, *self.x0_shape), generator=generator) for generator in seeded_generators(seeds)]
        return torch.cat(noise).to(self.device) * float(getattr(self.pipe.scheduler, "init_noise_sigma", 1.0))

    # -- generation ------------------------------------------------------------------------
    def generate(self, prompt: str, seeds: list[int], steps: int = 25, guidance: float = 5.0, batch_size: int = 8) -> list[tuple[Image.Image, Provenance]]:
        """A seed grid; each image carries its provenance. Same seed → same initial noise."""
        results = []
        for start in range(0, len(seeds), batch_size):
            chunk = seeds[start : start + batch_size]
            images = self._generate_batch(prompt, chunk, steps, guidance)
            width, height = images[0].size
            for seed, image in zip(chunk, images):
                results.append((image, Provenance(self.source, self.family, prompt, int(seed), steps, float(guidance), self.scheduler_name, width, height)))
        return results

    def _generate_batch(self, prompt: str, seeds: list[int], steps: int, guidance: float) -> list[Image.Image]:
        raise NotImplementedError

    def sdedit(self, image: Image.Image, prompt: str, strength: float, seed: int, steps: int = 25, guidance: float = 5.0) -> Image.Image:
        """Noise `image` to `strength`·T and denoise it (SDEdit)."""
        raise NotImplementedError

    # -- LoRA ------------------------------------------------------------------------------
    def add_lora(self, rank: int, alpha: float) -> list[torch.nn.Parameter]:
        """Attach a fresh LoRA to the denoiser; return its trainable parameters (all else frozen)."""
        from peft import LoraConfig

        self.denoiser.requires_grad_(False)
        config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(self.lora_target_modules))
        self.denoiser.add_adapter(config, adapter_name=self.adapter_name)
        return [p for p in self.denoiser.parameters() if p.requires_grad]

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(self.denoiser, adapter_name=self.adapter_name)

    def load_lora_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        from peft.utils import set_peft_model_state_dict

        set_peft_model_state_dict(self.denoiser, state, adapter_name=self.adapter_name)

    def save_lora(self, folder: Path) -> list[str]:
        """Write the adapter in the format plain diffusers (or peft) loads; return file names."""
        raise NotImplementedError

    def load_lora(self, folder: Path) -> None:
        """Load a saved adapter into this model (as adapter `hotfix`)."""
        raise NotImplementedError

    def has_lora(self) -> bool:
        """True when some layer still holds LoRA weights (peft keeps emptied layers after deletion)."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        return any(isinstance(m, BaseTunerLayer) and len(getattr(m, "lora_A", {})) > 0 for m in self.denoiser.modules())

    @contextlib.contextmanager
    def adapter_disabled(self):
        """Run the base model: every LoRA layer off inside the block, back on after."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers = [m for m in self.denoiser.modules() if isinstance(m, BaseTunerLayer)]
        for layer in layers:
            layer.enable_adapters(False)
        try:
            yield
        finally:
            for layer in layers:
                layer.enable_adapters(True)

    def remove_lora(self) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        if not self.has_lora():
            return
        if hasattr(self.denoiser, "delete_adapters"):
            try:
                self.denoiser.delete_adapters(self.denoiser.active_adapters())
                return
            except (ValueError, AttributeError):
                pass
        for module in self.denoiser.modules():
            if isinstance(module, BaseTunerLayer):
                for name in list(module.active_adapters):
                    module.delete_adapter(name)


class TextToImageModel(DiffusionModel):
    """What the diffusers text-to-image pipelines share: seed grids, SDEdit through the family's
    img2img pipeline, and LoRA files in the family's `save_lora_weights` format."""

    img2img_pipeline = ""  # diffusers class name
    lora_layers_argument = ""  # keyword of the pipeline's save_lora_weights for the denoiser
    img2img_extras: dict = {}

    @property
    def image_size(self):
        size = self.denoiser.config.sample_size * self.pipe.vae_scale_factor
        return (size, size)

    def encode_images(self, images):
        """Scaled VAE latents (mean of the posterior); SD3's VAE also has a shift factor, SD's none."""
        vae = self.pipe.vae
        with torch.no_grad():
            latents = vae.encode(images.to(self.device, vae.dtype)).latent_dist.mode().float()
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * vae.config.scaling_factor

    def decode(self, x0):
        vae = self.pipe.vae
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        with torch.no_grad():
            return vae.decode((x0 / vae.config.scaling_factor + shift).to(vae.dtype)).sample.float()

    def sdedit(self, image, prompt, strength, seed, steps=25, guidance=5.0):
        import diffusers

        img2img = getattr(diffusers, self.img2img_pipeline).from_pipe(self.pipe, **self.img2img_extras)
        img2img.set_progress_bar_config(disable=True)
        return img2img(prompt=prompt, image=image, strength=strength, num_inference_steps=sdedit_steps(strength, steps), guidance_scale=guidance, generator=seeded_generators([seed])).images[0]

    def save_lora(self, folder):
        from diffusers.utils import convert_state_dict_to_diffusers

        layers = convert_state_dict_to_diffusers(self.lora_state_dict())
        type(self.pipe).save_lora_weights(folder, **{self.lora_layers_argument: layers}, safe_serialization=True)
        return ["pytorch_lora_weights.safetensors"]

    def _generate_batch(self, prompt, seeds, steps, guidance):
        width, height = self.image_size
        return self.pipe(
            [prompt] * len(seeds), num_inference_steps=steps, guidance_scale=guidance,
            generator=seeded_generators(seeds), width=width, height=height,
        ).images

    def load_lora(self, folder):
        self.remove_lora()
        self.pipe.load_lora_weights(str(folder), adapter_name=self.adapter_name)


class StableDiffusionModel(TextToImageModel):
    family = "stable-diffusion"
    img2img_pipeline = "StableDiffusionImg2ImgPipeline"
    img2img_extras = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    lora_layers_argument = "unet_lora_layers"

    def __init__(self, pipe, source, device):
        super().__init__(pipe, source, device)
        self.prediction_type = pipe.scheduler.config.get("prediction_type", "epsilon")

    @property
    def denoiser(self):
        return self.pipe.unet

    def encode_prompts(self, prompts):
        with torch.no_grad():
            embeds, _ = self.pipe.encode_prompt(prompts, self.device, 1, False)
        return {"encoder_hidden_states": embeds.float()}

    def predict(self, denoiser, x_t, timesteps, cond):
        return denoiser(x_t, timesteps, encoder_hidden_states=cond["encoder_hidden_states"]).sample


class StableDiffusion3Model(TextToImageModel):
    family = "stable-diffusion-3"
    prediction_type = "flow"
    img2img_pipeline = "StableDiffusion3Img2ImgPipeline"
    lora_layers_argument = "transformer_lora_layers"
    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")

    @property
    def denoiser(self):
        return self.pipe.transformer

    def encode_prompts(self, prompts):
        with torch.no_grad():
            embeds, _, pooled, _ = self.pipe.encode_prompt(prompts, prompts, prompts, device=self.device, do_classifier_free_guidance=False)
        return {"encoder_hidden_states": embeds.float(), "pooled_projections": pooled.float()}

    def sample_noise_levels(self, batch, generator):
        sigma = torch.rand(batch, generator=generator).clamp(1e-3, 1.0)
        timestep = sigma * self.pipe.scheduler.config.num_train_timesteps
        return timestep.to(self.device), (1 - sigma).to(self.device), sigma.to(self.device), sigma.to(self.device)

    def predict(self, denoiser, x_t, timesteps, cond):
        return denoiser(hidden_states=x_t, timestep=timesteps, encoder_hidden_states=cond["encoder_hidden_states"], pooled_projections=cond["pooled_projections"]).sample


class PixelDDPMModel(DiffusionModel):
    """Unconditional pixel-space DDPM. `UNet2DModel` has no diffusers adapter mixin: peft directly."""

    family = "ddpm"
    conditional = False
    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2")

    def __init__(self, pipe, source, device):
        super().__init__(pipe, source, device)
        self.prediction_type = pipe.scheduler.config.get("prediction_type", "epsilon")

    @property
    def denoiser(self):
        return self.pipe.unet

    @property
    def image_size(self):
        size = self.pipe.unet.config.sample_size
        return (size, size) if isinstance(size, int) else (size[1], size[0])

    def predict(self, denoiser, x_t, timesteps, cond):
        return denoiser(x_t, timesteps).sample

    def _denoise_from(self, x_t: torch.Tensor, start_index: int, steps: int, seeds: list[int]) -> torch.Tensor:
        """Deterministic DDIM (eta = 0) from timestep index `start_index` of a `steps`-step schedule."""
        from diffusers import DDIMScheduler

        scheduler = DDIMScheduler.from_config(self.pipe.scheduler.config)
        scheduler.set_timesteps(steps, device=self.device)
        sample = x_t
        with torch.no_grad():
            for t in scheduler.timesteps[start_index:]:
                output = self.pipe.unet(sample, t).sample
                sample = scheduler.step(output, t, sample).prev_sample
        return sample

    def _generate_batch(self, prompt, seeds, steps, guidance):
        # Written by hand instead of DDPMPipeline: DDIM with eta=0 keeps each image a function of
        # its seed's initial noise alone (ancestral DDPM sampling draws fresh noise every step).
        from diffusers.utils.torch_utils import randn_tensor

        width, height = self.image_size
        channels = self.pipe.unet.config.in_channels
        noise = randn_tensor((len(seeds), channels, height, width), generator=seeded_generators(seeds)).to(self.device)
        from unlearn_core.images import to_pil

        return to_pil(self._denoise_from(noise, 0, steps, seeds))

    def sdedit(self, image, prompt, strength, seed, steps=25, guidance=5.0):
        # No diffusers img2img pipeline exists for unconditional pixel models: noise to t, then DDIM.
        from diffusers import DDIMScheduler

        from unlearn_core.images import to_pil, to_tensor

        scheduler = DDIMScheduler.from_config(self.pipe.scheduler.config)
        scheduler.set_timesteps(steps)
        start = min(steps - 1, max(0, steps - int(round(strength * steps))))
        x0 = to_tensor(image.resize(self.image_size)).to(self.device)
        noise = torch.randn(x0.shape, generator=torch.Generator("cpu").manual_seed(seed)).to(self.device)
        x_t = scheduler.add_noise(x0, noise, scheduler.timesteps[start : start + 1].to(self.device))
        return to_pil(self._denoise_from(x_t, start, steps, [seed]))[0]

    def add_lora(self, rank, alpha):
        from peft import LoraConfig, inject_adapter_in_model

        self.denoiser.requires_grad_(False)
        config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(self.lora_target_modules))
        inject_adapter_in_model(config, self.denoiser, adapter_name=self.adapter_name)
        self._lora_config = config
        return [p for p in self.denoiser.parameters() if p.requires_grad]

    def save_lora(self, folder):
        """peft's own format (adapter_config.json + adapter_model.safetensors), loadable by PeftModel."""
        from safetensors.torch import save_file

        folder = Path(folder)
        config = self._lora_config.to_dict()
        config["base_model_name_or_path"] = self.source
        config["target_modules"] = sorted(config["target_modules"])
        (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, default=str))
        state = {f"base_model.model.{k}": v.detach().cpu().contiguous() for k, v in self.lora_state_dict().items()}
        save_file(state, str(folder / "adapter_model.safetensors"))
        return ["adapter_model.safetensors", "adapter_config.json"]

    def load_lora(self, folder):
        from peft import LoraConfig
        from safetensors.torch import load_file

        folder = Path(folder)
        self.remove_lora()
        config = LoraConfig.from_pretrained(str(folder))
        self.add_lora(config.r, config.lora_alpha)
        state = {k.removeprefix("base_model.model."): v for k, v in load_file(str(folder / "adapter_model.safetensors")).items()}
        self.load_lora_state_dict(state)


FAMILIES = {
    "StableDiffusionPipeline": StableDiffusionModel,
    "StableDiffusion3Pipeline": StableDiffusion3Model,
    "DDPMPipeline": PixelDDPMModel,
    "DDIMPipeline": PixelDDPMModel,
}


def family_of(pipe) -> type[DiffusionModel]:
    name = type(pipe).__name__
    if name not in FAMILIES:
        raise ModelLoadError(f"{name} is not supported; use a Stable Diffusion 1.x/2.x, Stable Diffusion 3 or DDPM model")
    return FAMILIES[name]


def wrap_pipeline(pipe, source: str, device: str | torch.device = "auto") -> DiffusionModel:
    """Put an already-built pipeline behind the interface (tests build tiny ones from configs)."""
    return family_of(pipe)(pipe, source, pick_device(device) if isinstance(device, str) else device)


def allowed_model(source: str) -> None:
    """Apply the optional allow-list `HOTFIX_MODEL_ALLOWLIST` (comma-separated ids or folders)."""
    allow = [item.strip() for item in os.environ.get("HOTFIX_MODEL_ALLOWLIST", "").split(",") if item.strip()]
    if allow and source not in allow and source != DEMO_MODEL:
        raise ModelLoadError(f"model {source!r} is not on this server's allow-list")


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


def load_model(source: str = DEMO_MODEL, device: str = "auto", dtype: torch.dtype | None = None, without_t5: bool = False) -> DiffusionModel:
    """Load a hub id or local diffusers folder; never runs remote code. Raises `ModelLoadError`.

    `without_t5` drops SD3's T5 encoder (the pipeline then pads with zeros, as diffusers allows).
    """
    from diffusers import DiffusionPipeline

    source = (source or DEMO_MODEL).strip()
    allowed_model(source)
    if len(source) > 300 or "\x00" in source:
        raise ModelLoadError("model name is not a valid hub id or folder")
    path = Path(source)
    if path.exists() and not (path / "model_index.json").is_file():
        raise ModelLoadError(f"{source} is not a diffusers model folder (no model_index.json)")
    kwargs = {"trust_remote_code": False, **_absent_components(path)}
    if without_t5:
        kwargs.update(text_encoder_3=None, tokenizer_3=None)
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    try:
        pipe = DiffusionPipeline.from_pretrained(source, **kwargs)
    except Exception as error:  # diffusers raises many kinds: OSError, ValueError, HTTP errors
        reason = str(error).split("\n")[0][:300]
        hint = " (no network? hub models need to be downloaded once)" if not path.exists() else ""
        raise ModelLoadError(f"cannot load model {source!r}: {reason}{hint}") from error
    return wrap_pipeline(pipe, source, device)
