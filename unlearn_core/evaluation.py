"""Before/after evaluation on the same initial noise.

Forgetting: the target seed's output after unlearning vs the target (and vs the surrogate), and
the denoise probe (the target noised to t≈T/4 and denoised by the unlearned model); for each, how
far the painted pixels moved toward the surrogate (r) and the verdict that gives. Integrity:
before vs after on other seeds of the same prompt and on other prompts.
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image, ImageDraw

from unlearn_core import metrics
from unlearn_core.cache import GenerationCache
from unlearn_core.config import UnlearnConfig
from unlearn_core.images import grid
from unlearn_core.models import DiffusionModel

PROBE_STRENGTH = 0.25


@dataclass
class EvalTarget:
    prompt: str
    seed: int
    target: Image.Image
    surrogate: Image.Image


def other_seeds(count: int, exclude: set[int], remember_range: range) -> list[int]:
    """The first `count` seeds that are neither target seeds nor remember-set seeds."""
    seeds, candidate = [], 0
    while len(seeds) < count:
        if candidate not in exclude and candidate not in remember_range:
            seeds.append(candidate)
        candidate += 1
    return seeds


def _after(model: DiffusionModel, prompt: str, seeds: list[int], steps: int, guidance: float) -> list[Image.Image]:
    return [image for image, _ in model.generate(prompt, seeds, steps, guidance)]


def evaluate(model: DiffusionModel, targets: list[EvalTarget], config: UnlearnConfig, cache: GenerationCache | None = None) -> tuple[dict, Image.Image]:
    """Metrics dict (JSON-ready) and the before/after grid; the model must carry its adapter.

    Reads the config's eval seeds and prompts, remember seeds (never evaluated on) and sampling
    settings."""
    cache = cache or GenerationCache()
    steps, guidance, eval_prompts = config.generation_steps, config.guidance_scale, config.eval_prompts
    report: dict = {"availability": metrics.availability(), "sscd_threshold": metrics.SSCD_THRESHOLD, "targets": [], "integrity": {}}
    grid_rows_before, grid_rows_after = [], []
    exclude = {t.seed for t in targets}
    seeds = other_seeds(config.eval_seeds, exclude, config.remember_seeds)
    for target in targets:
        after_target = _after(model, target.prompt, [target.seed], steps, guidance)[0]
        probe_after = model.sdedit(target.target, target.prompt, PROBE_STRENGTH, target.seed, steps, guidance)
        with model.adapter_disabled():
            probe_before = model.sdedit(target.target, target.prompt, PROBE_STRENGTH, target.seed, steps, guidance)
        entry = {
            "prompt": target.prompt,
            "seed": target.seed,
            "after_vs_target": metrics.compare([after_target], [target.target]),
            "after_vs_surrogate": metrics.compare([after_target], [target.surrogate]),
            "denoise_probe_after_vs_target": metrics.compare([probe_after], [target.target]),
            "denoise_probe_before_vs_target": metrics.compare([probe_before], [target.target]),
        }
        sscd = entry["after_vs_target"]["sscd"]
        entry["forgotten"] = (sscd["value"] < metrics.SSCD_THRESHOLD) if sscd["available"] else None
        entry["toward_surrogate"] = metrics.toward_surrogate(after_target, target.target, target.surrogate).to_dict()
        entry["denoise_probe_toward_surrogate"] = metrics.toward_surrogate(probe_after, target.target, target.surrogate).to_dict()
        entry["denoise_probe_before_toward_surrogate"] = metrics.toward_surrogate(probe_before, target.target, target.surrogate).to_dict()
        report["targets"].append(entry)
        grid_rows_before.append(target.target)
        grid_rows_after.append(after_target)
    integrity_prompts = list(dict.fromkeys([t.prompt for t in targets] + list(eval_prompts)))
    for prompt in integrity_prompts:
        prompt_seeds = seeds if prompt in {t.prompt for t in targets} else seeds[: max(1, min(8, len(seeds)))]
        if not prompt_seeds:
            continue
        before, _ = cache.get_or_generate(model, prompt, prompt_seeds, steps, guidance)
        after = _after(model, prompt, prompt_seeds, steps, guidance)
        scores = metrics.compare(before, after)
        ssim_values = scores["ssim"]["per_pair"]
        scores["seeds"] = prompt_seeds
        scores["ssim_at_least_0.9"] = sum(v >= 0.9 for v in ssim_values)
        report["integrity"][prompt or "(empty prompt)"] = scores
        grid_rows_before.extend(before[:7])
        grid_rows_after.extend(after[:7])
    report["forgetting"] = forgetting_summary(report["targets"])
    picture = before_after_grid(grid_rows_before, grid_rows_after)
    return report, picture


def forgetting_summary(entries: list[dict]) -> dict:
    """The run's answer: the least-fixed target's r (same seed regenerated) and its verdict."""
    worst = min(entries, key=lambda e: e["toward_surrogate"]["r"] if e["toward_surrogate"]["r"] is not None else float("inf"))
    moved = worst["toward_surrogate"]
    return {
        "toward_surrogate": moved["r"],
        "residual": moved["residual"],
        "denoise_probe_toward_surrogate": worst["denoise_probe_toward_surrogate"]["r"],
        "verdict": moved["verdict"],
        "unpainted_change": max(e["toward_surrogate"]["unpainted_change"] for e in entries),
        "rest_changed": max(e["toward_surrogate"]["unpainted_change"] for e in entries) > metrics.UNPAINTED_CHANGE_WARNING,
        "fixed_at": metrics.FIXED_AT,
        "worst_target_seed": worst["seed"],
    }


def before_after_grid(before: list[Image.Image], after: list[Image.Image], scale: int = 2) -> Image.Image:
    """Two rows: before (pretrained / target) over after (unlearned), same seeds, labelled."""
    size = before[0].size
    top = grid([img.resize(size) for img in before], len(before))
    bottom = grid([img.resize(size) for img in after], len(after))
    label_width = 56
    canvas = Image.new("RGB", (top.width + label_width, top.height * 2), (255, 255, 255))
    canvas.paste(top, (label_width, 0))
    canvas.paste(bottom, (label_width, top.height))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, top.height // 2 - 5), "before", fill=(0, 0, 0))
    draw.text((4, top.height + top.height // 2 - 5), "after", fill=(0, 0, 0))
    return canvas.resize((canvas.width * scale, canvas.height * scale), Image.Resampling.NEAREST)
