"""Held-back cases: painted corrections that no setting was ever chosen on, run as an operator would.

    python -m benchmarks.held_back [--out runs/held-back] [--cases france-77-red,ireland-77-orange]

Each case is the demo model's own output for a prompt and seed with a region repainted the way
`benchmarks.cases` paints (the source colour picked at a point, as with an eyedropper), or, for a
global surrogate, SDEdit of it with its own prompt (every pixel changes, as the Surrogate tab's
SDEdit makes it). The job is
the CLI's `unlearn` with default settings; the adapter is then loaded into a plain diffusers
`StableDiffusionPipeline`, as a user would load it, and measured there: r on the target seed,
and SSIM ≥ 0.9 of 16 other seeds of the prompt and of 8 seeds each of two other prompts. The user's
generation cache is warmed for each case first (`warm_cache`), so the job time is a warm job's.
This 2-core machine's speed varies by day (up to 4× slower than when the 60 s goal was set), so
the generation row of `python -m benchmarks` is timed just before each job, and the job's time is
also given scaled by it to the idle machine's row (`IDLE_GENERATION_SECONDS`).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.__main__ import IDLE_GENERATION_SECONDS
from benchmarks.cases import Recolour, paint
from benchmarks.quality import machine_speed
from benchmarks.quality_measures import ssim_shares
from benchmarks.quality_report import cases_picture
from unlearn_core import metrics
from unlearn_core.cache import GenerationCache
from unlearn_core.config import DEMO_MODEL, UnlearnConfig
from unlearn_core.evaluation import EvalTarget
from unlearn_core.run import warm_remember_cache

ROOT = Path(__file__).resolve().parent.parent
STEPS, GUIDANCE = 25, 5.0
OTHER_PROMPTS = ("flag of italy", "flag of chad")
OTHER_SEEDS = 8


@dataclass(frozen=True)
class HeldBackCase:
    name: str
    prompt: str
    seed: int
    at: tuple[int, int] = (0, 0)  # (x, y) inside the region to repaint
    new: str = ""  # hex colour painted there
    sdedit_strength: float | None = None  # a global surrogate instead: SDEdit of the target at this strength (it changes every pixel)


CASES = (
    HeldBackCase("netherlands-74-bottom", "flag of the netherlands", 74, (32, 42), "21468b"),
    HeldBackCase("netherlands-75-bottom", "flag of the netherlands", 75, (32, 42), "21468b"),
    HeldBackCase("france-77-red", "flag of france", 77, (50, 32), "ef4135"),
    HeldBackCase("ireland-77-orange", "flag of ireland", 77, (50, 32), "ff883e"),
    HeldBackCase("germany-77-gold", "flag of germany", 77, (32, 42), "ffce00"),
    HeldBackCase("france-61-sdedit-0.6", "flag of france", 61, sdedit_strength=0.6),
)


def colour_at(image: Image.Image, at: tuple[int, int]) -> str:
    """The median colour of the 3×3 pixels around `at`, as hex (the operator's eyedropper)."""
    x, y = at
    patch = np.asarray(image.convert("RGB"))[y - 1 : y + 2, x - 1 : x + 2].reshape(-1, 3)
    return "".join(f"{int(v):02x}" for v in np.median(patch, axis=0))


def images(pipe, prompt: str, seeds: list[int]) -> list[Image.Image]:
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    return pipe([prompt] * len(seeds), num_inference_steps=STEPS, guidance_scale=GUIDANCE, generator=generators).images


def kept(before: list[Image.Image], after: list[Image.Image]) -> int:
    """How many of the pairs keep SSIM ≥ 0.9."""
    return round(ssim_shares(before, after)[0] * len(before))


def warm_cache(case: HeldBackCase, surrogate: Image.Image) -> None:
    """Put what the CLI job reads from the user's generation cache there first (the target image,
    the recorded remember trajectories, the extra renoised images), so the timed job runs warm, as
    the goal is stated; an operator's second job on a prompt finds them there."""
    from unlearn_core.models import load_model

    model, cache, config = load_model(DEMO_MODEL, device="cpu"), GenerationCache(), UnlearnConfig()
    target = cache.get_or_generate(model, case.prompt, [case.seed], config.generation_steps, config.guidance_scale)[0][0]
    warm_remember_cache(model, [EvalTarget(case.prompt, case.seed, target, surrogate)], config, cache)


def global_surrogate(case: HeldBackCase, target: Image.Image) -> Image.Image:
    """SDEdit of the target with its own prompt, as the Surrogate tab makes it (seed 0, 25 steps)."""
    from unlearn_core.models import load_model

    return load_model(DEMO_MODEL, device="cpu").sdedit(target, case.prompt, case.sdedit_strength, 0, STEPS, GUIDANCE)


def generation_row() -> float:
    """Seconds of `python -m benchmarks`' generation row on this machine now."""
    from unlearn_core.models import load_model

    return machine_speed(load_model(DEMO_MODEL, device="cpu"))


def run_case(case: HeldBackCase, out: Path) -> dict:
    from diffusers import StableDiffusionPipeline

    folder = out / case.name
    folder.mkdir(parents=True, exist_ok=True)
    pipe = StableDiffusionPipeline.from_pretrained(str(ROOT / DEMO_MODEL), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    target = images(pipe, case.prompt, [case.seed])[0]
    surrogate = global_surrogate(case, target) if case.sdedit_strength else paint(target, (Recolour(colour_at(target, case.at), case.new, at=case.at),))
    target.save(folder / "target.png")
    surrogate.save(folder / "surrogate.png")
    warm_cache(case, surrogate)
    speed = generation_row()
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "unlearn_core", "unlearn", "--prompt", case.prompt, "--seed", str(case.seed), "--surrogate", str(folder / "surrogate.png"),
                    "--out", str(folder / "job")], cwd=ROOT, check=True, capture_output=True)
    seconds = time.perf_counter() - started
    seeds = [seed for seed in range(17) if seed != case.seed][:16]
    same_before = images(pipe, case.prompt, seeds)
    other_before = [image for prompt in OTHER_PROMPTS for image in images(pipe, prompt, seeds[:OTHER_SEEDS])]
    pipe.load_lora_weights(str(folder / "job"))
    after = images(pipe, case.prompt, [case.seed])[0]
    after.save(folder / "after.png")
    moved = metrics.toward_surrogate(after, target, surrogate)
    return {
        "case": case.name, "r": moved.r, "pictures": {"target": target, "surrogate": surrogate, "after": after}, "verdict": moved.verdict, "seconds": seconds, "speed": speed,
        "same": kept(same_before, images(pipe, case.prompt, seeds)),
        "other": kept(other_before, [image for prompt in OTHER_PROMPTS for image in images(pipe, prompt, seeds[:OTHER_SEEDS])]),
    }


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "runs" / "held-back"))
    parser.add_argument("--cases", default=",".join(case.name for case in CASES), help="comma-separated case names (default: all)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    chosen = args.cases.split(",")
    if unknown := set(chosen) - {case.name for case in CASES}:
        parser.error(f"unknown case(s): {', '.join(sorted(unknown))}; the cases are {', '.join(case.name for case in CASES)}")
    rows = []
    print(f"| case | r | verdict | same prompt SSIM ≥ 0.9 | other prompts SSIM ≥ 0.9 | job s | generation row s | job s at the idle machine's speed ({IDLE_GENERATION_SECONDS} s) |", flush=True)
    print("|---|---|---|---|---|---|---|---|", flush=True)
    for case in (case for case in CASES if case.name in chosen):
        row = run_case(case, out)
        rows.append(row)
        scaled = row["seconds"] * IDLE_GENERATION_SECONDS / row["speed"]
        print(f"| {row['case']} | {row['r']:.2f} | {row['verdict']} | {row['same']}/16 | {row['other']}/16 | {row['seconds']:.0f} | {row['speed']:.2f} | {scaled:.0f} |", flush=True)
    cases_picture({row["case"]: row["pictures"] for row in rows}, out / "held_back.png", scale=3)
    print(f"\nwrote {out / 'held_back.png'}")
    return rows


if __name__ == "__main__":
    main()
