"""What the quality study measures after each job, on the same initial noise as before it.

Forgetting: r of the target seed, of the denoise probe, and of the target seed's noise perturbed
5, 10 and 15 % (the stop rule only ever sees the unperturbed seed, so these are measured where the
loop cannot steer). Integrity: SSIM on 16 other seeds of the prompt and 16 other-prompt images, the
colour spill on the painted pixels of the seeds nearest the target (which SSIM on 64-px images
misses), and the flag judge on the same-prompt seeds before and after. The evaluation seeds are
never remember seeds, and the stop rule sees only the target seed."""

from __future__ import annotations

import numpy as np
from PIL import Image

from benchmarks.cases import Case
from unlearn_core import metrics
from unlearn_core.cache import GenerationCache
from unlearn_core.config import UnlearnConfig
from unlearn_core.demo.quality import classify
from unlearn_core.evaluation import other_seeds
from unlearn_core.models import DiffusionModel

# Confusable neighbours of several cases; a case is measured on the first two that are not its own prompt.
OTHER_PROMPTS = ("flag of romania", "flag of italy", "flag of chad")
OTHER_PROMPTS_PER_CASE = 2
OTHER_SEEDS_PER_PROMPT = 8
SAME_PROMPT_SEEDS = 16
PERTURBATIONS = (0.05, 0.10, 0.15)
SPILL_SEEDS = 4  # the evaluation seeds nearest the target whose painted pixels are checked for spill
PARAPHRASES = ("the flag of {name}", "{name} flag", "a picture of the flag of {name}")


def ssim_shares(before: list[Image.Image], after: list[Image.Image]) -> tuple[float, float, float]:
    values = metrics.ssim(before, after).per_pair
    return float(np.mean([v >= 0.9 for v in values])), float(np.mean([v >= 0.95 for v in values])), float(np.mean(values))


def flag_name(prompt: str) -> str:
    return prompt.removeprefix("flag of ")


def judge_kept(judge, images: list[Image.Image], prompts: list[str]) -> float:
    names = classify(judge, np.stack([np.asarray(image) for image in images]))
    return float(np.mean([name == flag_name(prompt) for name, prompt in zip(names, prompts)]))


def other_prompts_of(case: Case) -> list[str]:
    """The other-prompt integrity set of a case: never the case's own prompt, whose seeds are the same-prompt set."""
    return [prompt for prompt in OTHER_PROMPTS if prompt != case.prompt][:OTHER_PROMPTS_PER_CASE]


def r_from_noise(model: DiffusionModel, prompt: str, latents, surrogate: Image.Image, config: UnlearnConfig) -> float:
    """r of the adapter's image from `latents` toward the surrogate, against the base model's image from the same noise."""
    steps, guidance = config.generation_steps, config.guidance_scale
    with model.adapter_disabled():
        before = model.generate_from_noise(prompt, latents, steps, guidance)
    return metrics.toward_surrogate(model.generate_from_noise(prompt, latents, steps, guidance), before, surrogate).r


def perturbed(model: DiffusionModel, seed: int, delta: float):
    """The seed's initial noise mixed with another's, keeping unit variance: ‖perturbation‖ = delta."""
    return (1 - delta**2) ** 0.5 * model.initial_noise([seed]) + delta * model.initial_noise([seed + 10_000])


def colour_spill(target: Image.Image, surrogate: Image.Image, before: list[Image.Image], after: list[Image.Image]) -> float:
    """Mean colour change (grey levels, 0–255) on the painted pixels of the SPILL_SEEDS evaluation
    seeds whose frozen images lie nearest the target: the seeds a fix spills onto first."""
    mask = metrics.painted_mask(target, surrogate)
    if not mask.any():
        return 0.0
    reference = np.asarray(target, dtype=np.float32)
    nearest = np.argsort([np.abs(np.asarray(image, dtype=np.float32) - reference).mean() for image in before], kind="stable")[:SPILL_SEEDS]
    return float(np.mean([np.abs(np.asarray(after[i], dtype=np.float32) - np.asarray(before[i], dtype=np.float32))[mask].mean() for i in nearest]))


def measure(model: DiffusionModel, case: Case, target: Image.Image, surrogate: Image.Image, cache: GenerationCache, judge, config: UnlearnConfig) -> dict:
    """Forgetting and integrity of the adapter the model now carries."""
    steps, guidance = config.generation_steps, config.guidance_scale
    after_target = model.generate(case.prompt, [case.seed], steps, guidance)[0][0]
    probe = model.sdedit(target, case.prompt, 0.25, case.seed, steps, guidance)
    moved = metrics.toward_surrogate(after_target, target, surrogate)
    seeds = other_seeds(SAME_PROMPT_SEEDS, {case.seed}, config.remember_seeds)
    same_before = cache.get_or_generate(model, case.prompt, seeds, steps, guidance)[0]
    same_after = [image for image, _ in model.generate(case.prompt, seeds, steps, guidance)]
    other_before, other_after, other_prompts = [], [], []
    for prompt in other_prompts_of(case):
        other_before += cache.get_or_generate(model, prompt, seeds[:OTHER_SEEDS_PER_PROMPT], steps, guidance)[0]
        other_after += [image for image, _ in model.generate(prompt, seeds[:OTHER_SEEDS_PER_PROMPT], steps, guidance)]
        other_prompts += [prompt] * OTHER_SEEDS_PER_PROMPT
    same, other = ssim_shares(same_before, same_after), ssim_shares(other_before, other_after)
    return {
        "r": moved.r, "residual": moved.residual, "probe_r": metrics.toward_surrogate(probe, target, surrogate).r,
        "target_ssim": metrics.ssim([after_target], [target]).value,
        "same_09": same[0], "same_095": same[1], "same_mean": same[2],
        "other_09": other[0], "other_095": other[1], "other_mean": other[2],
        "judge_kept": judge_kept(judge, same_after + other_after, [case.prompt] * len(same_after) + other_prompts),
        **{f"r_noise{round(delta * 100):02d}": r_from_noise(model, case.prompt, perturbed(model, case.seed, delta), surrogate, config) for delta in PERTURBATIONS},
        "spill": colour_spill(target, surrogate, same_before, same_after),
        "judge_before": judge_kept(judge, same_before, [case.prompt] * len(same_before)),
        "judge_after": judge_kept(judge, same_after, [case.prompt] * len(same_after)),
        "after_target": after_target,
    }


def robustness(model: DiffusionModel, case: Case, surrogate: Image.Image, config: UnlearnConfig) -> dict:
    """r of the fix under paraphrased prompts, each against the base model's own image for that
    prompt (so r = 0 means the error is still there)."""
    noise = model.initial_noise([case.seed])
    return {f"prompt '{template.format(name='X')}'": r_from_noise(model, template.format(name=flag_name(case.prompt)), noise, surrogate, config) for template in PARAPHRASES}
