"""The default unlearning job, through the CLI, on an SD1.5-size pipeline built from its configs.

    python -m benchmarks.gpu_job [--tiny] [--quick] [--device cuda]

Nothing is downloaded: the U-Net, VAE and CLIP text encoder have SD1.5's sizes and random weights,
and the demo model's tokenizer stands in for CLIP's. Random weights draw noise, so the target is
never 'fixed'; what the run shows is that the default path runs at this size (the target's
trajectory recorded and re-recorded at 64² latents, the forget loss through the VAE decoder on the
painted box at 512², distillation, evaluation, export) in the weights' default precision, what it
costs, and that plain diffusers loads the adapter it writes. `--quick` trains 20 steps on 8
remember seeds and checks 4 other seeds (a smoke run); `--tiny` builds tiny components (CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import ImageDraw

from benchmarks.gpu import SD15_UNET, TINY_UNET
from unlearn_core.settings import DEMO_MODEL_DIR

ROOT = Path(__file__).resolve().parent.parent
PROMPT, SEED = "flag of chad", 40
SD15_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512)
TINY_VAE = dict(block_out_channels=(32, 32, 32, 32), layers_per_block=1, sample_size=128)
SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12)
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2)
QUICK = ["--steps", "20", "--extend-until-fixed", "0", "--remember-count", "8", "--renoised-seed-multiple", "1", "--eval-seeds", "4"]


def build_pipeline(folder: Path, tiny: bool) -> int:
    """Write a StableDiffusionPipeline of SD1.5's sizes (or tiny ones) with random weights; return its resolution."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(DEMO_MODEL_DIR / "tokenizer")
    text = CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                          **(TINY_TEXT if tiny else SD15_TEXT))
    unet = UNet2DConditionModel(**{**(TINY_UNET if tiny else SD15_UNET), "cross_attention_dim": text.hidden_size})
    vae_sizes = TINY_VAE if tiny else SD15_VAE
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4,
                        norm_num_groups=32, scaling_factor=0.18215, **vae_sizes)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=CLIPTextModel(text), tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.to(torch.float16).save_pretrained(folder)  # half the bytes to write; loading casts to the precision asked for
    return vae_sizes["sample_size"]


def painted_surrogate(folder: Path, device: str, out: Path) -> None:
    """The model's own image for PROMPT and SEED with its middle third painted red (an operator's correction)."""
    from unlearn_core.models import load_model

    model = load_model(str(folder), device)
    target = model.generate(PROMPT, [SEED], 25, 5.0)[0][0]
    width, height = target.size
    surrogate = target.copy()
    ImageDraw.Draw(surrogate).rectangle((width // 3, 0, 2 * width // 3, height - 1), fill=(210, 16, 52))
    surrogate.save(out)


def plain_diffusers_change(folder: Path, adapter: Path, device: str) -> float:
    """Mean absolute change (grey levels) the adapter makes to SEED's image in plain diffusers."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32).to(device)  # saved in fp16
    pipe.set_progress_bar_config(disable=True)

    def image():
        return np.asarray(pipe(PROMPT, generator=torch.Generator("cpu").manual_seed(SEED), num_inference_steps=25, guidance_scale=5.0).images[0], dtype=float)

    before = image()
    pipe.load_lora_weights(adapter)
    return float(np.abs(image() - before).mean())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny components (a CPU smoke run)")
    parser.add_argument("--quick", action="store_true", help="20 steps, 8 remember seeds, 4 other seeds")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        folder, surrogate, run = scratch / "sd15-random", scratch / "surrogate.png", scratch / "run"
        started = time.perf_counter()
        resolution = build_pipeline(folder, args.tiny)
        painted_surrogate(folder, args.device, surrogate)
        print(f"built a {'tiny' if args.tiny else 'SD1.5-size'} pipeline ({resolution}²) and a surrogate in {time.perf_counter() - started:.0f} s", flush=True)
        command = [sys.executable, "-m", "unlearn_core", "unlearn", "--model", str(folder), "--device", args.device, "--prompt", PROMPT,
                   "--seed", str(SEED), "--surrogate", str(surrogate), "--out", str(run), *(QUICK if args.quick else [])]
        started = time.perf_counter()
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HOTFIX_CACHE": str(scratch / "cache")})
        seconds = time.perf_counter() - started
        if done.returncode:
            print(done.stdout[-3000:], done.stderr[-3000:])
            raise SystemExit(f"the job failed ({done.returncode})")
        metrics = json.loads((run / "metrics.json").read_text())
        timing, forgetting = metrics["timing"], metrics["forgetting"]
        print(f"job: {seconds:.0f} s wall ({timing['seconds_preparing']:.0f} s preparing, cold cache; {timing['seconds_training']:.0f} s training, "
              f"{timing['steps_run']} steps of {timing['mean_seconds_per_step']:.2f} s); verdict {forgetting['verdict']} at r {forgetting['toward_surrogate']:.2f}")
        print(f"plain diffusers: the adapter changes seed {SEED}'s image by {plain_diffusers_change(folder, run, args.device):.2f} grey levels on average")


if __name__ == "__main__":
    main()
