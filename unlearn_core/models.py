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
import functools
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from unlearn_core import objectives
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
    # LoRA placement per `UnlearnConfig.lora_layers`: the attention projections diffusers' training
    # scripts use, or those plus the family's ResNet convolutions and feed-forward layers.
    lora_layer_sets: dict[str, tuple[str, ...]] = {
        "text-kv": ("attn2.to_k", "attn2.to_v"),
        "attention": ("to_q", "to_k", "to_v", "to_out.0"),
        "all": ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "ff.net.0.proj", "ff.net.2"),
    }
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
    def noise_levels_at(self, timesteps: torch.Tensor):
        """(a_t, b_t, s ∈ [0, 1]) for model timesteps, each of shape (B,): x_t = a_t·x0 + b_t·ε."""
        steps = self.pipe.scheduler.config.num_train_timesteps
        alphas = self.pipe.scheduler.alphas_cumprod.float()
        index = timesteps.detach().cpu().round().long().clamp(0, steps - 1)
        a, b = alphas[index].sqrt(), (1 - alphas[index]).sqrt()
        return a.to(self.device), b.to(self.device), (index.float() / (steps - 1)).to(self.device)

    def sample_noise_levels(self, batch: int, generator: torch.Generator):
        """Random noise levels for training: (model timestep, a_t, b_t, s ∈ [0, 1]) each of shape (B,)."""
        t = torch.randint(0, self.pipe.scheduler.config.num_train_timesteps, (batch,), generator=generator)
        return (t.to(self.device), *self.noise_levels_at(t))

    def predict(self, denoiser, x_t: torch.Tensor, timesteps: torch.Tensor, cond: dict) -> torch.Tensor:
        raise NotImplementedError

    def remember_loss_weight(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Per-sample weight of the ordinary diffusion loss: 1 in the prediction's own space, as
        diffusers' SD/DDPM training scripts use it (SD3 overrides it with diffusers' x0-space loss)."""
        return torch.ones_like(a)

    @property
    def x0_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of what the denoiser works on."""
        config = self.denoiser.config
        size = config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return (config.in_channels, height, width)

    def initial_noise(self, seeds: list[int]) -> torch.Tensor:
        """Each seed's unit-variance initial noise ε (the pipelines' own draw, before they scale it by
        the scheduler's `init_noise_sigma`, which is 14.6 for Euler schedulers)."""
        noise = [torch.randn((1, *self.x0_shape), generator=generator) for generator in seeded_generators(seeds)]
        return torch.cat(noise).to(self.device)

    # -- sampling states -------------------------------------------------------------------
    def denoiser_call(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(x_t, timesteps, conditioning) of one call of the denoiser, as the pipeline made it."""
        raise NotImplementedError

    def record_sampling(self, prompt: str, seeds: list[int], steps: int, guidance: float, batch_size: int = 8) -> "SamplingRecord":
        """Generate and record every state the denoiser saw: x_t, t, conditioning and its outputs.

        A forward hook on the denoiser (not a copied sampling loop) sees exactly what the family's
        pipeline feeds it, so the states are the model's real sampling trajectory for these seeds.
        With classifier-free guidance the pipelines batch [unconditional, conditional]; both
        halves' predictions are kept. Seeds are sampled `batch_size` at a time, as `generate` does.
        """
        chunks = [self._record_batch(prompt, seeds[i : i + batch_size], steps, guidance) for i in range(0, len(seeds), batch_size)]
        return SamplingRecord.merge(chunks)

    def _record_batch(self, prompt: str, seeds: list[int], steps: int, guidance: float) -> "SamplingRecord":
        calls: list[tuple[torch.Tensor, torch.Tensor, dict, torch.Tensor]] = []

        def hook(module, args, kwargs, output):
            x_t, t, cond = self.denoiser_call(args, kwargs)
            sample = output.sample if hasattr(output, "sample") else output[0]
            t = torch.as_tensor(t, device=x_t.device).reshape(-1).expand(x_t.shape[0])
            conditioning = {} if calls else {k: v.detach().float().cpu() for k, v in cond.items()}  # the same every step: kept once
            calls.append((x_t.detach().float().cpu(), t.detach().float().cpu(), conditioning, sample.detach().float().cpu()))

        handle = self.denoiser.register_forward_hook(hook, with_kwargs=True)
        try:
            with torch.no_grad():
                images = [image for image, _ in self.generate(prompt, seeds, steps, guidance, batch_size=max(1, len(seeds)))]
        finally:
            handle.remove()
        return SamplingRecord.from_calls(calls, len(seeds), images, prompt)

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
    def lora_config(self, rank: int, alpha: float, layers: str = "attention"):
        from peft import LoraConfig

        if layers not in self.lora_layer_sets:
            raise ValueError(f"lora_layers must be one of {', '.join(self.lora_layer_sets)}; got {layers!r}")
        return LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(self.lora_layer_sets[layers]))

    def add_lora(self, rank: int, alpha: float, layers: str = "attention") -> list[torch.nn.Parameter]:
        """Attach a fresh LoRA to the denoiser; return its trainable parameters (all else frozen)."""
        self.denoiser.requires_grad_(False)
        self.denoiser.add_adapter(self.lora_config(rank, alpha, layers), adapter_name=self.adapter_name)
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


@dataclass
class SamplingRecord:
    """The states of sampling runs of B seeds over K steps, flattened (step-major within each chunk of seeds).

    `cond`/`uncond` hold the conditioning rows the pipeline used (B rows each, reused every step);
    `out_cond`/`out_uncond` the denoiser's predictions there (out_uncond is None without guidance).
    """

    x_t: torch.Tensor
    timesteps: torch.Tensor
    out_cond: torch.Tensor
    out_uncond: torch.Tensor | None
    cond: dict[str, torch.Tensor]
    uncond: dict[str, torch.Tensor] | None
    images: list
    prompt: str = ""

    @classmethod
    def from_calls(cls, calls, batch: int, images, prompt: str = "") -> "SamplingRecord":
        guided = calls[0][0].shape[0] == 2 * batch

        def half(tensor, which):
            return tensor[batch * which : batch * (which + 1)] if guided else tensor

        return cls(
            x_t=torch.cat([half(x, 1) for x, _, _, _ in calls]),
            timesteps=torch.cat([half(t, 1) for _, t, _, _ in calls]),
            out_cond=torch.cat([half(out, 1) for _, _, _, out in calls]),
            out_uncond=torch.cat([half(out, 0) for _, _, _, out in calls]) if guided else None,
            cond={k: half(v, 1) for k, v in calls[0][2].items()},
            uncond={k: half(v, 0) for k, v in calls[0][2].items()} if guided else None,
            images=images,
            prompt=prompt,
        )

    @classmethod
    def merge(cls, records: list["SamplingRecord"]) -> "SamplingRecord":
        """Records of the same prompt (sampled in chunks of seeds) as one; conditioning rows are shared."""
        first = records[0]
        if len(records) == 1:
            return first
        return cls(
            x_t=torch.cat([r.x_t for r in records]),
            timesteps=torch.cat([r.timesteps for r in records]),
            out_cond=torch.cat([r.out_cond for r in records]),
            out_uncond=torch.cat([r.out_uncond for r in records]) if first.out_uncond is not None else None,
            cond=first.cond,
            uncond=first.uncond,
            images=[image for r in records for image in r.images],
            prompt=first.prompt,
        )

    def __len__(self) -> int:
        return self.x_t.shape[0]


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
        """peft-format keys plus the adapter's LoraConfig as metadata, as diffusers' current training
        scripts save them: convolution layers and lora_alpha ≠ rank then load back exactly."""
        metadata = self.denoiser.peft_config[self.adapter_name].to_dict()
        type(self.pipe).save_lora_weights(folder, **{self.lora_layers_argument: self.lora_state_dict(), f"{self.lora_layers_argument.removesuffix('_layers')}_adapter_metadata": metadata}, safe_serialization=True)
        return ["pytorch_lora_weights.safetensors"]

    def _generate_batch(self, prompt, seeds, steps, guidance):
        width, height = self.image_size
        return self.pipe(
            [prompt] * len(seeds), num_inference_steps=steps, guidance_scale=guidance,
            generator=seeded_generators(seeds), width=width, height=height,
        ).images

    def generate_from_noise(self, prompt: str, noise: torch.Tensor, steps: int = 25, guidance: float = 5.0) -> Image.Image:
        """One image from given unit initial noise (shape of `initial_noise`), e.g. a perturbed seed."""
        width, height = self.image_size
        return self.pipe(prompt, latents=noise.to(self.device), num_inference_steps=steps, guidance_scale=guidance, width=width, height=height).images[0]

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

    def denoiser_call(self, args, kwargs):
        x_t = args[0] if args else kwargs["sample"]
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        return x_t, t, {"encoder_hidden_states": kwargs["encoder_hidden_states"]}


class StableDiffusion3Model(TextToImageModel):
    family = "stable-diffusion-3"
    prediction_type = "flow"
    img2img_pipeline = "StableDiffusion3Img2ImgPipeline"
    lora_layers_argument = "transformer_lora_layers"
    lora_layer_sets = {
        "text-kv": ("add_k_proj", "add_v_proj"),
        "attention": ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"),
        "all": ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"),
    }

    @property
    def denoiser(self):
        return self.pipe.transformer

    def encode_prompts(self, prompts):
        with torch.no_grad():
            embeds, _, pooled, _ = self.pipe.encode_prompt(prompts, prompts, prompts, device=self.device, do_classifier_free_guidance=False)
        return {"encoder_hidden_states": embeds.float(), "pooled_projections": pooled.float()}

    def noise_levels_at(self, timesteps):
        sigma = (timesteps.detach().float() / self.pipe.scheduler.config.num_train_timesteps).clamp(1e-3, 1.0).to(self.device)
        return 1 - sigma, sigma, sigma

    def sample_noise_levels(self, batch, generator):
        """σ as diffusers' `train_dreambooth_lora_sd3.py` draws it: logit-normal u (mean 0, std 1)
        indexing the timesteps of a fresh copy of the shifted flow-matching schedule."""
        from diffusers.training_utils import compute_density_for_timestep_sampling

        schedule = self.training_schedule
        u = compute_density_for_timestep_sampling("logit_normal", batch, logit_mean=0.0, logit_std=1.0, generator=generator)
        indices = (u * schedule.config.num_train_timesteps).long().clamp(0, len(schedule.timesteps) - 1)
        timesteps = schedule.timesteps[indices].float()
        return (timesteps.to(self.device), *self.noise_levels_at(timesteps))

    @functools.cached_property
    def training_schedule(self):
        """A pristine copy of the scheduler: generation calls set_timesteps on the pipeline's own."""
        return type(self.pipe.scheduler).from_config(self.pipe.scheduler.config)

    def remember_loss_weight(self, a, b):
        """x0-space loss (diffusers' SD3 script: prediction preconditioned to x0, weighting 1)."""
        return objectives.x0_error_weight(self.prediction_type, a, b)

    def denoiser_call(self, args, kwargs):
        cond = {"encoder_hidden_states": kwargs["encoder_hidden_states"], "pooled_projections": kwargs["pooled_projections"]}
        return kwargs["hidden_states"], kwargs["timestep"], cond

    def predict(self, denoiser, x_t, timesteps, cond):
        return denoiser(hidden_states=x_t, timestep=timesteps, encoder_hidden_states=cond["encoder_hidden_states"], pooled_projections=cond["pooled_projections"]).sample


class PixelDDPMModel(DiffusionModel):
    """Unconditional pixel-space DDPM. `UNet2DModel` has no diffusers adapter mixin: peft directly."""

    family = "ddpm"
    conditional = False
    lora_layer_sets = {"attention": ("to_q", "to_k", "to_v", "to_out.0"), "all": ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2")}

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

    def denoiser_call(self, args, kwargs):
        return (args[0] if args else kwargs["sample"]), (args[1] if len(args) > 1 else kwargs["timestep"]), {}

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

    def add_lora(self, rank, alpha, layers="all"):
        return self._inject(self.lora_config(rank, alpha, layers))

    def _inject(self, config):
        from peft import inject_adapter_in_model

        self.denoiser.requires_grad_(False)
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
        self._inject(LoraConfig.from_pretrained(str(folder)))
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
