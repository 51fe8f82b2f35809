"""The interface every model family implements (what sampling records is `models.record`).

The trainer, metrics, CLI and UI only use `DiffusionModel`'s methods (encode, prompt conditioning,
noise levels, prediction, generation, LoRA), so none of them branches on the family.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from unlearn_core.distributed import process_device, world_size
from unlearn_core.errors import AdapterError, InvalidInput
from unlearn_core.models.record import SamplingRecord


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
    """auto: this process's device under torchrun / accelerate launch; else a CUDA GPU, else
    Apple's mps, else the CPU."""
    if name == "auto" and world_size() > 1:
        return process_device()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device, demo: bool = False) -> torch.dtype:
    """The weights' precision: `auto` is half precision on a CUDA GPU (bf16 where the card has it,
    else fp16; the LoRA weights stay fp32, as peft keeps them) and fp32 elsewhere, and always fp32
    for the `demo` model. That model (3.2 M parameters) gains nothing from half precision and draws
    other images in it on a GPU: on an H200, chad seed 40 in bf16 or fp16 came out 20–45 grey
    levels off its fp32 image, and the README's adapter moved it 1.6 levels instead of 17."""
    if name == "auto":
        if device.type != "cuda" or demo:
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def sdedit_steps(strength: float, steps: int) -> int:
    """Enough scheduler steps that img2img runs at least one denoising step at this strength."""
    return max(int(steps), int(np.ceil(1.0 / max(strength, 1e-3))))


# A U-Net's up (decoder) blocks: where each seed's details and colours are drawn; the down and mid
# blocks, which decide every seed's layout, stay frozen. Measured in docs/QUALITY.md.
UP_BLOCKS = r".*up_blocks\..*\.(to_q|to_k|to_v|to_out\.0|conv1|conv2)"


class DiffusionModel:
    """The interface. Subclasses wrap one pipeline family."""

    family = "base"
    conditional = True
    # LoRA placement per `UnlearnConfig.lora_layers`: the attention projections diffusers' training
    # scripts use, or those plus the family's ResNet convolutions and feed-forward layers, or (a
    # U-Net's decoder) the attention projections and convolutions of the up blocks only: a regex,
    # which peft matches against whole module names.
    lora_layer_sets: dict[str, tuple[str, ...] | str] = {
        "text-kv": ("attn2.to_k", "attn2.to_v"),
        "attention": ("to_q", "to_k", "to_v", "to_out.0"),
        "all": ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "ff.net.0.proj", "ff.net.2"),
        "decoder": UP_BLOCKS,
    }
    adapter_name = "hotfix"

    def __init__(self, pipe, source: str, device: torch.device):
        self.pipe = pipe.to(device)
        self.source = source
        self.device = device
        self.image_counters: list = []  # `counting_images`
        if getattr(pipe, "vae", None) is not None:
            pipe.vae.requires_grad_(False)  # the pixel forget loss backpropagates through it, into the LoRA only
        if hasattr(self.pipe, "set_progress_bar_config"):
            self.pipe.set_progress_bar_config(disable=True)

    # -- properties -------------------------------------------------------------------------
    denoiser_attribute = "unet"  # the pipeline's attribute holding the network that is fine-tuned

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipe, self.denoiser_attribute)

    @property
    def prediction_type(self) -> str:
        """epsilon or v_prediction, as the scheduler says (flow-matching families override it)."""
        return self.pipe.scheduler.config.get("prediction_type", "epsilon")

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

    def decode_x0(self, x0: torch.Tensor) -> torch.Tensor:
        """x0 the denoiser works on → images in [-1, 1], differentiable (pixel models: x0 itself)."""
        return x0

    @property
    def pixels_per_x0_cell(self) -> int:
        """Image pixels per x0 cell along each side (the VAE's downscale; 1 for pixel models)."""
        return self.image_size[0] // self.x0_shape[2]

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
        """The denoiser's output at x_t. Recorded states and conditioning are kept in fp32; they are
        cast here to the weights' precision (bf16 or fp16 by default on a GPU), which the denoiser's
        own layers require outside autocast. peft casts them back up for the fp32 LoRA weights."""
        dtype = self.weights_dtype
        cond = {key: value.to(dtype) if value.is_floating_point() else value for key, value in cond.items()}
        return self._predict(denoiser, x_t.to(dtype), timesteps, cond)

    @property
    def weights_dtype(self) -> torch.dtype:
        """The precision of the denoiser's own weights (an attached LoRA's weights stay fp32)."""
        return next(p.dtype for name, p in self.denoiser.named_parameters() if "lora_" not in name)

    def _predict(self, denoiser, x_t: torch.Tensor, timesteps: torch.Tensor, cond: dict) -> torch.Tensor:
        """The family's call of its denoiser, inputs already in the weights' precision."""
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
            with self.lora_merged():
                images = self._generate_batch(prompt, chunk, steps, guidance)
            for counter in self.image_counters:
                counter(len(chunk))
            width, height = images[0].size
            for seed, image in zip(chunk, images):
                results.append((image, Provenance(self.source, self.family, prompt, int(seed), steps, float(guidance), self.scheduler_name, width, height)))
        return results

    def _generate_batch(self, prompt: str, seeds: list[int], steps: int, guidance: float) -> list[Image.Image]:
        raise NotImplementedError

    @contextlib.contextmanager
    def counting_images(self, counter):
        """Call `counter(n)` after every batch of n images sampled (generated or recorded) inside
        the block: a long phase made of many samplings reports how far it has come."""
        self.image_counters.append(counter)
        try:
            yield
        finally:
            self.image_counters.remove(counter)

    def sdedit(self, image: Image.Image, prompt: str, strength: float, seed: int, steps: int = 25, guidance: float = 5.0) -> Image.Image:
        """Noise `image` to `strength`·T and denoise it (SDEdit)."""
        raise NotImplementedError

    # -- LoRA ------------------------------------------------------------------------------
    def lora_config(self, rank: int, alpha: float, layers: str = "attention"):
        from peft import LoraConfig

        if layers not in self.lora_layer_sets:
            raise InvalidInput(f"lora_layers must be one of {', '.join(self.lora_layer_sets)}; got {layers!r}")
        targets = self.lora_layer_sets[layers]
        return LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets if isinstance(targets, str) else list(targets))

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
        """Load a saved adapter into this model (as adapter `hotfix`). An adapter that does not fit
        is refused with an `AdapterError` and leaves no half-loaded layers behind."""
        try:
            self._load_lora(folder)
        except Exception as error:  # diffusers and peft raise many kinds for a file of the wrong shape or format
            self.remove_lora()
            text = str(error)
            reason = ("its layer shapes do not match this model (an adapter trained on another base model?)" if "size mismatch" in text
                      else (text.strip().splitlines() or [type(error).__name__])[0][:300])
            raise AdapterError(f"cannot load this adapter into {self.source}: {reason}") from None

    def _load_lora(self, folder: Path) -> None:
        raise NotImplementedError

    def has_lora(self) -> bool:
        """True when some layer still holds LoRA weights (peft keeps emptied layers after deletion)."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        return any(isinstance(m, BaseTunerLayer) and len(getattr(m, "lora_A", {})) > 0 for m in self.denoiser.modules())

    @contextlib.contextmanager
    def lora_merged(self):
        """For sampling on the CPU: every enabled LoRA layer's update folded into its base weights
        inside the block (peft's `merge`), so each adapted layer runs one product instead of three.
        On the demo model that makes a 25-step guided sample about a quarter faster (per-operator
        overhead dominates these small layers), which matters because a job re-samples its target
        every few steps. Afterwards the base weights are copied back exactly: peft's `unmerge`
        subtracts the update again, leaving rounding in the frozen weights that every later
        distillation step would learn from. Only for fp32 weights on the CPU (on a GPU the LoRA's
        extra products cost little and the copies would take memory), and not for a layer whose
        adapter is off."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        if self.device.type != "cpu" or self.weights_dtype != torch.float32:  # half-precision weights would round the update
            yield
            return
        layers = [m for m in self.denoiser.modules() if isinstance(m, BaseTunerLayer) and not m.disable_adapters and not m.merged
                  and any(name in getattr(m, "lora_A", {}) for name in m.active_adapters)]
        kept = [{name: tensor.detach().clone() for name, tensor in layer.get_base_layer().named_parameters(recurse=False)} for layer in layers]
        for layer in layers:
            layer.merge()
        try:
            yield
        finally:
            for layer, weights in zip(layers, kept):
                layer.unmerge()
                with torch.no_grad():
                    for name, tensor in layer.get_base_layer().named_parameters(recurse=False):
                        tensor.copy_(weights[name])

    @contextlib.contextmanager
    def adapter_disabled(self):
        """Run the base model: every LoRA layer off inside the block, back on after (only those that
        were on, so a nested block leaves the outer one's layers off)."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers = [m for m in self.denoiser.modules() if isinstance(m, BaseTunerLayer) and not m.disable_adapters]
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
