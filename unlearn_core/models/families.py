"""The model families behind `DiffusionModel`:

- `StableDiffusionModel`: `StableDiffusionPipeline` (SD1.x/2.x, epsilon or v-prediction; the demo model)
- `StableDiffusion3Model`: `StableDiffusion3Pipeline` (rectified flow, MMDiT; T5 optional)
- `StableDiffusionXLModel`: `StableDiffusionXLPipeline` (two text encoders, pooled text and size conditioning)
- `PixelDDPMModel`: `DDPMPipeline` / `UNet2DModel` (pixel space, unconditional)
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch
from PIL import Image

from unlearn_core import objectives
from unlearn_core.files import write_json_atomic
from unlearn_core.models.base import UP_BLOCKS, DiffusionModel, sdedit_steps, seeded_generators
from unlearn_core.runfolder import LORA_WEIGHT_NAME_SAFE, PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME


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

    def decode_x0(self, x0):
        """Scaled latents → images in [-1, 1] through the VAE decoder, keeping the graph (the
        forget loss is measured on the decoded pixels, where the operator painted)."""
        vae = self.pipe.vae
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        with self._vae_precision():
            return vae.decode((x0 / vae.config.scaling_factor + shift).to(vae.dtype)).sample.float()

    def _vae_precision(self):
        return contextlib.nullcontext()

    def sdedit(self, image, prompt, strength, seed, steps=25, guidance=5.0):
        img2img = self._img2img
        with self.lora_merged():
            return img2img(prompt=prompt, image=image, strength=strength, num_inference_steps=sdedit_steps(strength, steps), guidance_scale=guidance, generator=seeded_generators([seed])).images[0]

    @functools.cached_property
    def _img2img(self):
        """The family's img2img pipeline on this pipeline's own components (built once)."""
        import diffusers
        from diffusers.utils import logging as diffusers_logging

        # from_pipe casts the shared components to its `dtype`, fp32 unless given: the model's own.
        # That no-op cast logs "modules ... should be kept in float32: []" for every component, a
        # diffusers quirk that would reach the CLI's output: quiet for this call only.
        level = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()
        try:
            img2img = getattr(diffusers, self.img2img_pipeline).from_pipe(self.pipe, dtype=self.weights_dtype, **self.img2img_extras)
        finally:
            diffusers_logging.set_verbosity(level)
        img2img.set_progress_bar_config(disable=True)
        return img2img

    def save_lora(self, folder):
        """peft-format keys plus the adapter's LoraConfig as metadata, as diffusers' current training
        scripts save them: convolution layers and lora_alpha ≠ rank then load back exactly."""
        metadata = self.denoiser.peft_config[self.adapter_name].to_dict()
        type(self.pipe).save_lora_weights(folder, **{self.lora_layers_argument: self.lora_state_dict(), f"{self.lora_layers_argument.removesuffix('_layers')}_adapter_metadata": metadata}, safe_serialization=True)
        return [LORA_WEIGHT_NAME_SAFE]

    def _generate_batch(self, prompt, seeds, steps, guidance):
        width, height = self.image_size
        return self.pipe(
            [prompt] * len(seeds), num_inference_steps=steps, guidance_scale=guidance,
            generator=seeded_generators(seeds), width=width, height=height,
        ).images

    def generate_from_noise(self, prompt: str, noise: torch.Tensor, steps: int = 25, guidance: float = 5.0) -> Image.Image:
        """One image from given unit initial noise (shape of `initial_noise`), e.g. a perturbed seed."""
        width, height = self.image_size
        return self.pipe(prompt, latents=noise.to(self.device, self.weights_dtype), num_inference_steps=steps, guidance_scale=guidance, width=width, height=height).images[0]

    def _load_lora(self, folder):
        self.remove_lora()
        self.pipe.load_lora_weights(str(folder), adapter_name=self.adapter_name)


class StableDiffusionModel(TextToImageModel):
    family = "stable-diffusion"
    img2img_pipeline = "StableDiffusionImg2ImgPipeline"
    img2img_extras = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    lora_layers_argument = "unet_lora_layers"

    def encode_prompts(self, prompts):
        with torch.no_grad():
            embeds, _ = self.pipe.encode_prompt(prompts, self.device, 1, False)
        return {"encoder_hidden_states": embeds.float()}

    def _predict(self, denoiser, x_t, timesteps, cond):
        return denoiser(x_t, timesteps, encoder_hidden_states=cond["encoder_hidden_states"]).sample

    def denoiser_call(self, args, kwargs):
        x_t = args[0] if args else kwargs["sample"]
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        return x_t, t, {"encoder_hidden_states": kwargs["encoder_hidden_states"]}


class StableDiffusion3Model(TextToImageModel):
    family = "stable-diffusion-3"
    prediction_type = "flow"
    denoiser_attribute = "transformer"
    img2img_pipeline = "StableDiffusion3Img2ImgPipeline"
    lora_layers_argument = "transformer_lora_layers"
    lora_layer_sets = {
        "text-kv": ("add_k_proj", "add_v_proj"),
        "attention": ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"),
        "all": ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"),
    }
    lora_layer_sets["decoder"] = lora_layer_sets["all"]  # a transformer has no decoder blocks: every layer (not measured on SD3 here)


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

    def _predict(self, denoiser, x_t, timesteps, cond):
        return denoiser(hidden_states=x_t, timestep=timesteps, encoder_hidden_states=cond["encoder_hidden_states"], pooled_projections=cond["pooled_projections"]).sample


class StableDiffusionXLModel(TextToImageModel):
    """SDXL: two text encoders (hidden states concatenated, pooled embedding from the second) and
    the micro-conditioning `time_ids`, all kept batch-first in the conditioning dict."""

    family = "stable-diffusion-xl"
    img2img_pipeline = "StableDiffusionXLImg2ImgPipeline"
    lora_layers_argument = "unet_lora_layers"

    def encode_prompts(self, prompts):
        with torch.no_grad():
            embeds, _, pooled, _ = self.pipe.encode_prompt(prompts, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False)
        return {"encoder_hidden_states": embeds.float(), "text_embeds": pooled.float(), "time_ids": self.time_ids(len(prompts), int(pooled.shape[-1]))}

    def time_ids(self, batch: int, projection_dim: int) -> torch.Tensor:
        """What the pipeline passes at the model's own resolution: original size = target size =
        (height, width), crop (0, 0), as diffusers' SDXL training script also does."""
        width, height = self.image_size
        ids = self.pipe._get_add_time_ids((height, width), (0, 0), (height, width), dtype=torch.float32, text_encoder_projection_dim=projection_dim)
        return ids.to(self.device).repeat(batch, 1)

    def encode_images(self, images):
        with self._vae_precision():
            return super().encode_images(images)

    @contextlib.contextmanager
    def _vae_precision(self):
        """SDXL's original VAE overflows in fp16 (`force_upcast` in its config): it then encodes and
        decodes in fp32, as the SDXL pipelines do."""
        vae = self.pipe.vae
        if vae.dtype != torch.float16 or not vae.config.get("force_upcast", False):
            yield
            return
        vae.to(torch.float32)
        try:
            yield
        finally:
            vae.to(torch.float16)

    def _predict(self, denoiser, x_t, timesteps, cond):
        added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
        return denoiser(x_t, timesteps, encoder_hidden_states=cond["encoder_hidden_states"], added_cond_kwargs=added).sample

    def denoiser_call(self, args, kwargs):
        x_t = args[0] if args else kwargs["sample"]
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        added = kwargs["added_cond_kwargs"]
        return x_t, t, {"encoder_hidden_states": kwargs["encoder_hidden_states"], "text_embeds": added["text_embeds"], "time_ids": added["time_ids"]}


class PixelDDPMModel(DiffusionModel):
    """Unconditional pixel-space DDPM. `UNet2DModel` has no diffusers adapter mixin: peft directly."""

    family = "ddpm"
    conditional = False
    lora_layer_sets = {"attention": ("to_q", "to_k", "to_v", "to_out.0"), "all": ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"), "decoder": UP_BLOCKS}

    @property
    def image_size(self):
        size = self.pipe.unet.config.sample_size
        return (size, size) if isinstance(size, int) else (size[1], size[0])

    def _predict(self, denoiser, x_t, timesteps, cond):
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
                output = self.pipe.unet(sample.to(self.weights_dtype), t).sample.float()  # steps in fp32
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
        """peft's own format (its config and weight files), loadable by PeftModel."""
        from safetensors.torch import save_file

        folder = Path(folder)
        config = self._lora_config.to_dict()
        config["base_model_name_or_path"] = self.source
        if not isinstance(config["target_modules"], str):  # a set of names (JSON needs a list); a regex stays as it is
            config["target_modules"] = sorted(config["target_modules"])
        write_json_atomic(folder / PEFT_CONFIG_NAME, config)
        state = {f"base_model.model.{k}": v.detach().cpu().contiguous() for k, v in self.lora_state_dict().items()}
        save_file(state, str(folder / PEFT_WEIGHTS_NAME))
        return [PEFT_WEIGHTS_NAME, PEFT_CONFIG_NAME]

    def _load_lora(self, folder):
        from peft import LoraConfig
        from safetensors.torch import load_file

        folder = Path(folder)
        self.remove_lora()
        self._inject(LoraConfig.from_pretrained(str(folder)))
        state = {k.removeprefix("base_model.model."): v for k, v in load_file(str(folder / PEFT_WEIGHTS_NAME)).items()}
        self.load_lora_state_dict(state)
