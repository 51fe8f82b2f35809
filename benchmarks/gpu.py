"""The unlearning step on SD1.5-size and SD3-medium-size denoisers built from their configs.

    python -m benchmarks.gpu [--tiny] [--steps 5]

Random weights (timings do not depend on them) and random latents / text embeddings: this times
the trainer (two forward/backward passes, projection, AdamW on LoRA) with bf16 autocast and
gradient checkpointing, which is where a GPU job spends its time. Prints a Markdown table; run it
on a machine with a GPU and paste the table into docs/PERFORMANCE.md with the device name.
"""

from __future__ import annotations

import argparse
import time
import types

import torch

from unlearn_core.config import UnlearnConfig
from unlearn_core.models import StableDiffusion3Model, StableDiffusionModel
from unlearn_core.sets import FixedSets
from unlearn_core.trainer import UnlearnTrainer

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8,
)
SD3_MEDIUM = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192,
)
TINY_UNET = dict(SD15_UNET, block_out_channels=(32, 32, 64, 64), cross_attention_dim=32, attention_head_dim=4, sample_size=16)
TINY_SD3 = dict(SD3_MEDIUM, num_layers=2, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64, sample_size=16, pos_embed_max_size=32)


def _pipe(**components):
    """A stand-in holding only what the trainer touches: the denoiser and the scheduler."""
    namespace = types.SimpleNamespace(**components)
    namespace.to = lambda device: namespace
    return namespace


def build(kind: str, tiny: bool, device: torch.device, resolution: int):
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, UNet2DConditionModel

    latent = resolution // 8
    with torch.device(device):
        if kind == "sd15":
            unet = UNet2DConditionModel(**(TINY_UNET if tiny else SD15_UNET)).to(torch.bfloat16 if device.type == "cuda" else torch.float32)
            model = StableDiffusionModel(_pipe(unet=unet, scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)), "sd15-size-random", device)
            dim = unet.config.cross_attention_dim
            cond = {"encoder_hidden_states": torch.randn(2, 77, dim)}
            shape = (2, 4, latent, latent)
        else:
            transformer = SD3Transformer2DModel(**(TINY_SD3 if tiny else SD3_MEDIUM)).to(torch.bfloat16 if device.type == "cuda" else torch.float32)
            model = StableDiffusion3Model(_pipe(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler()), "sd3-medium-size-random", device)
            config = transformer.config
            cond = {"encoder_hidden_states": torch.randn(2, 333, config.joint_attention_dim), "pooled_projections": torch.randn(2, config.pooled_projection_dim)}
            shape = (2, 16, latent, latent)
        sets = FixedSets(torch.randn(shape), torch.randn(shape), cond, torch.randn(shape), cond)
    return model, sets


def time_steps(kind: str, tiny: bool, device: torch.device, resolution: int, steps: int, checkpointing: bool) -> dict:
    model, sets = build(kind, tiny, device, resolution)
    config = UnlearnConfig(batch_size=1, steps=steps + 2, mixed_precision="bf16" if device.type == "cuda" else "no", gradient_checkpointing=checkpointing, lora_rank=16, lora_alpha=16, seed_noise_fraction=0.0, forget_states="random", forget_target="surrogate", remember_loss="denoise")
    model.add_lora(config.lora_rank, config.lora_alpha)
    trainer = UnlearnTrainer(model, config, sets)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        trainer.train_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    per_step = (time.perf_counter() - started) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    params = sum(p.numel() for p in model.denoiser.parameters()) / 1e9
    return {"model": kind, "params_b": params, "resolution": resolution, "checkpointing": checkpointing, "s_per_step": per_step, "s_per_100": per_step * 100, "peak_gib": peak}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny configs (CPU smoke test)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--only", choices=("sd15", "sd3"), default=None)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    cases = [("sd15", 512, True), ("sd15", 512, False), ("sd3", 1024, True)]
    print(f"device: {name}; torch {torch.__version__}; LoRA rank 16; batch 1 forget + 1 remember; bf16 autocast on GPU")
    print("| model (random weights) | params | resolution | checkpointing | s/step | 100 steps | peak GPU memory |\n|---|---|---|---|---|---|---|")
    for kind, resolution, checkpointing in cases:
        if args.only and kind != args.only:
            continue
        result = time_steps(kind, args.tiny, device, resolution if not args.tiny else 128, args.steps, checkpointing)
        print(f"| {kind} | {result['params_b']:.2f} B | {result['resolution']}² | {checkpointing} | {result['s_per_step']:.3f} | {result['s_per_100']:.0f} s | {result['peak_gib']:.1f} GiB |", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
