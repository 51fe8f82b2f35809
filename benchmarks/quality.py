"""Does the hotfix fix? Forgetting against integrity on a suite of flagged cases (demo model, CPU).

    python -m benchmarks.quality                       # the whole study (≈ 40 min on 2 cores)
    python -m benchmarks.quality --quick               # default settings only, one training seed
    python -m benchmarks.quality --variants default,NegGrad --train-seeds 0,1,2 --cases chad-40-stripe

Each case (`benchmarks/cases.py`) is the model's own output for a prompt and seed with a local
painted correction. Every variant is trained on every case with each training seed, through the
same `run_unlearning` the CLI and the app use, and measured on the same initial noise:

- forgetting: r, how far the painted pixels moved toward the surrogate (1 = fixed, 0 = unchanged),
  for the target seed regenerated and for the denoise probe, and the residual off that line;
- integrity: SSIM before/after on 16 other seeds of the same prompt and on 16 other-prompt images
  (share ≥ 0.9, share ≥ 0.95, mean), and whether the flag judge still names the right flag;
- wall time of the job (preparation + training; the benchmark measures separately).

For the default it also reports, without a threshold, whether the fix holds for paraphrased
prompts and for slightly perturbed initial noise, and one two-target job. Writes
`runs/quality/results.csv`, `docs/QUALITY.md`, `docs/quality/pareto.png` and
`docs/quality/cases.png` (target | surrogate | after, per case).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.cases import CASES, CORRECTIONS, Case, paint
from unlearn_core import metrics
from unlearn_core.cache import GenerationCache
from unlearn_core.config import DEMO_MODEL, PRESETS, InstanceTarget, UnlearnConfig
from unlearn_core.demo.quality import classify, load_classifier
from unlearn_core.evaluation import EvalTarget, other_seeds
from unlearn_core.files import save_image_atomic
from unlearn_core.images import grid
from unlearn_core.models import DiffusionModel, load_model
from unlearn_core.run import run_unlearning, warm_remember_cache

ROOT = Path(__file__).resolve().parent.parent
JUDGE = ROOT / "assets" / "flag-classifier.safetensors"
# Confusable neighbours of several cases; a case is measured on the first two that are not its own prompt.
OTHER_PROMPTS = ("flag of romania", "flag of italy", "flag of chad")
OTHER_PROMPTS_PER_CASE = 2
OTHER_SEEDS_PER_PROMPT = 8
SAME_PROMPT_SEEDS = 16
PARAPHRASES = ("the flag of {name}", "{name} flag", "a picture of the flag of {name}")
NOISE_PERTURBATIONS = (0.05, 0.15)

# Baselines use our LoRA (rank 8, on the decoder) and learning rate, with their own losses and step
# counts: SISS 35 (its Stable Diffusion recipe), the paper's 240 for the paper preset, 60 otherwise.
# "forget loss on latents" is the default before the forget loss moved to decoded pixels (and before
# training went on past `steps` for a target not yet fixed, and while `steps` was 90 with no
# neighbour checks); "previous defaults" are this tool's
# settings before that, the remember loss held hardest at large t and the
# LoRA moved to the decoder.
PREVIOUS_REMEMBER_SET = {"remember_count": 16, "remember_batch_size": 8}  # before 2026-12-04: 16 remember seeds, 8 recorded states per step
NO_CONSOLIDATION = {"consolidate_steps": 0}  # before 2026-12-05: training ended where the target was fixed
NINETY_STEPS = {"steps": 90, "neighbour_checks": 0}  # before 2026-12-04 (session 18): 90 planned steps, the remember weight fixed
BASELINES: dict[str, dict] = {
    "NegGrad": {"method": "neggrad", "steps": 60},
    "SISS": {"method": "siss", "steps": 35},
    "EraseDiff": {"method": "erasediff", "steps": 60},
    "paper preset": dict(PRESETS["paper"]),
    "forget loss on latents": {"loss_space": "x0", "extend_until_fixed": 0, "remember_renoised": 0, **PREVIOUS_REMEMBER_SET, **NO_CONSOLIDATION, **NINETY_STEPS},
    "previous defaults": {"loss_space": "x0", "extend_until_fixed": 0, "remember_renoised": 0, **PREVIOUS_REMEMBER_SET, **NO_CONSOLIDATION, **NINETY_STEPS, "remember_weight": 4.0, "remember_large_t_boost": 0.0, "lora_layers": "all", "learning_rate": 1e-3},
    "gentle preset": dict(PRESETS["gentle"]),
    "strong preset": dict(PRESETS["strong"]),
}
ABLATIONS: dict[str, dict] = {
    "λ(s)=s^γ (paper's direction)": {"lambda_schedule": "timestep"},
    "constant λ": {"lambda_schedule": "constant"},
    "ε-space loss": {"loss_space": "native"},
    "no projection": {"projection": "none"},
    "project both (PCGrad)": {"projection": "both"},
    "random forget states": {"forget_states": "random"},
    "whole-surrogate target": {"forget_target": "surrogate"},
    "denoise remember": {"remember_loss": "denoise"},
    "attention-only LoRA": {"lora_layers": "attention"},
    "LoRA on every layer": {"lora_layers": "all"},
    "no early stop": {"stop_at_r": 0.0},
    "no large-t remember boost": {"remember_large_t_boost": 0.0},
    "no renoised remember": {"remember_renoised": 0},
    "renoise remember seeds only": {"renoised_seed_multiple": 1},
    "full remember weight while extending": {"extend_remember_factor": 1.0},
    "first remember seeds": {"remember_choice": "first"},
    "16 remember seeds and 8 samples": dict(PREVIOUS_REMEMBER_SET),
    "no consolidation": dict(NO_CONSOLIDATION),
    "90 planned steps": {"steps": 90},
    "no neighbour checks": {"neighbour_checks": 0},
    "90 steps without neighbour checks": dict(NINETY_STEPS),
}
VARIANTS: dict[str, dict] = {"default": {}, **BASELINES, **ABLATIONS}

# Ablations that run on their own cases instead of --ablation-cases: the remember weight past `steps`
# matters only to corrections not fixed within them; the choice of remember seeds is measured on the
# cases where integrity was hardest to keep; consolidation on the two it was made for and two corrections;
# the planned steps and the neighbour checks on the slow corrections, whose jobs they shorten.
REMEMBER_SET_CASES = ("chad-40-stripe", "belgium-40-stripe", "japan-77-disc", "belgium-77-two-stripes")
SLOW_CASES = ("belgium-40-stripe", "japan-77-disc", "belgium-77-two-stripes", "netherlands-62-stripe")
ABLATION_CASES: dict[str, tuple[str, ...]] = {
    "full remember weight while extending": ("belgium-77-two-stripes", "netherlands-62-stripe"),
    "first remember seeds": REMEMBER_SET_CASES,
    "16 remember seeds and 8 samples": REMEMBER_SET_CASES,
    "no consolidation": ("switzerland-61-no-cross", "sweden-67-no-cross", "chad-40-stripe", "belgium-77-two-stripes"),
    **{name: SLOW_CASES for name in ("90 planned steps", "no neighbour checks", "90 steps without neighbour checks")},
}


@dataclass
class Measured:
    """One run's numbers (a row of results.csv)."""

    variant: str
    case: str
    kind: str
    train_seed: int
    r: float
    residual: float
    probe_r: float
    target_ssim: float
    same_09: float
    same_095: float
    same_mean: float
    other_09: float
    other_095: float
    other_mean: float
    judge_kept: float
    seconds: float
    extra: dict = field(default_factory=dict)


def prepare_case(model: DiffusionModel, case: Case, cache: GenerationCache, folder: Path) -> tuple[Path, Path]:
    """target.png (the model's own output) and surrogate.png (the painted correction) of a case; the
    default job's recorded remember trajectories and extra renoised images are put in the cache, so
    every job runs warm, as timed."""
    target = cache.get_or_generate(model, case.prompt, [case.seed], 25, 5.0)[0][0]
    surrogate = Image.open(ROOT / case.surrogate_file).convert("RGB") if case.surrogate_file else paint(target, case.edits)
    warm_remember_cache(model, [EvalTarget(case.prompt, case.seed, target, surrogate)], UnlearnConfig(), cache)
    folder.mkdir(parents=True, exist_ok=True)
    return save_image_atomic(target, folder / "target.png"), save_image_atomic(surrogate, folder / "surrogate.png")


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
    same = ssim_shares(same_before, same_after)
    other = ssim_shares(other_before, other_after)
    kept = judge_kept(judge, same_after + other_after, [case.prompt] * len(same_after) + other_prompts)
    return {
        "r": moved.r, "residual": moved.residual, "probe_r": metrics.toward_surrogate(probe, target, surrogate).r,
        "target_ssim": metrics.ssim([after_target], [target]).value,
        "same_09": same[0], "same_095": same[1], "same_mean": same[2],
        "other_09": other[0], "other_095": other[1], "other_mean": other[2], "judge_kept": kept,
        "after_target": after_target,
    }


def robustness(model: DiffusionModel, case: Case, surrogate: Image.Image, config: UnlearnConfig) -> dict:
    """r of the fix under paraphrased prompts and perturbed initial noise, each measured against the
    base model's own image for that prompt/noise (so r = 0 means the error is still there)."""
    steps, guidance = config.generation_steps, config.guidance_scale
    name = flag_name(case.prompt)
    results = {}
    for template in PARAPHRASES:
        prompt = template.format(name=name)
        with model.adapter_disabled():
            before = model.generate(prompt, [case.seed], steps, guidance)[0][0]
        after = model.generate(prompt, [case.seed], steps, guidance)[0][0]
        results[f"prompt '{template.format(name='X')}'"] = metrics.toward_surrogate(after, before, surrogate).r
    noise = model.initial_noise([case.seed])
    other = model.initial_noise([case.seed + 10_000])
    for delta in NOISE_PERTURBATIONS:
        latents = (1 - delta**2) ** 0.5 * noise + delta * other
        with model.adapter_disabled():
            before = model.generate_from_noise(case.prompt, latents, steps, guidance)
        after = model.generate_from_noise(case.prompt, latents, steps, guidance)
        results[f"noise perturbed {delta:.0%}"] = metrics.toward_surrogate(after, before, surrogate).r
    return results


def run_one(model, case, files, variant, overrides, train_seed, cache, judge, out: Path) -> tuple[Measured, dict]:
    config = UnlearnConfig(**{**overrides, "seed": train_seed, "checkpoint_every": 0})
    run_dir = out / variant.replace(" ", "_") / case.name / f"seed{train_seed}"
    for stale in run_dir.glob("*"):
        stale.unlink()
    model.remove_lora()
    started = time.perf_counter()
    run_unlearning(model, [InstanceTarget(case.prompt, case.seed, str(files[1]), str(files[0]))], config, run_dir, cache=cache, evaluate_after=False)
    seconds = time.perf_counter() - started
    target, surrogate = (Image.open(f).convert("RGB") for f in files)
    numbers = measure(model, case, target, surrogate, cache, judge, config)
    after = numbers.pop("after_target")
    save_image_atomic(after, run_dir / "after_target.png")
    extra = robustness(model, case, surrogate, config) if variant == "default" and train_seed == 0 else {}
    model.remove_lora()
    return Measured(variant, case.name, case.kind, train_seed, seconds=seconds, extra=extra, **numbers), {"target": target, "surrogate": surrogate, "after": after}


def two_target_job(model, cases: list[Case], files: dict, cache, judge, out: Path) -> dict:
    """Two flagged outputs fixed by one job (the paper's Table I, right half)."""
    config = UnlearnConfig(checkpoint_every=0)
    targets = [InstanceTarget(case.prompt, case.seed, str(files[case.name][1]), str(files[case.name][0])) for case in cases]
    model.remove_lora()
    started = time.perf_counter()
    run_unlearning(model, targets, config, out / "two-targets", cache=cache, evaluate_after=False)
    seconds = time.perf_counter() - started
    result = {"cases": [case.name for case in cases], "seconds": seconds}
    for case in cases:
        target, surrogate = (Image.open(f).convert("RGB") for f in files[case.name])
        numbers = measure(model, case, target, surrogate, cache, judge, config)
        numbers.pop("after_target")
        result[case.name] = numbers
    model.remove_lora()
    return result


# -- report ------------------------------------------------------------------------------------
COLUMNS = ("r", "probe_r", "target_ssim", "same_09", "same_095", "same_mean", "other_09", "other_095", "other_mean", "judge_kept", "seconds")
HEADERS = ("r (target seed)", "r (denoise probe)", "SSIM after vs target", "same prompt SSIM ≥ 0.9", "≥ 0.95", "mean SSIM", "other prompts SSIM ≥ 0.9", "≥ 0.95", "mean SSIM", "judge kept", "job s")


def machine_speed(model: DiffusionModel) -> float:
    """Seconds for `benchmarks`' generation row (8 images × 25 steps, median of 3) on this run's
    machine, so a reader can scale the job times: the same row in docs/PERFORMANCE.md is the
    reference of an idle machine, and this 2-core machine has run up to 4× slower on some days."""
    from benchmarks.__main__ import bench_generation

    return bench_generation(model, repeats=3)


def where_it_ran(device: str) -> str:
    """The machine a study's numbers come from: the CPU's threads, or the GPU's name."""
    if device != "cpu" and torch.cuda.is_available():
        return f"a {torch.cuda.get_device_name()} GPU (fp32; r and kept seeds as on the CPU, job times not)"
    return f"this machine ({torch.get_num_threads()} threads)"


def mean_spread(values: list[float], share: bool) -> str:
    mean = statistics.fmean(values)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    if share:
        return f"{mean * 16:.1f} ± {spread * 16:.1f}/16"
    return f"{mean:.2f} ± {spread:.2f}"


def summary_row(rows: list[Measured]) -> list[str]:
    cells = []
    for column in COLUMNS:
        values = [getattr(row, column) for row in rows]
        cells.append(mean_spread(values, share=column in ("same_09", "same_095", "other_09", "other_095")))
    return cells


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def group_of(case: str) -> str:
    return "corrections of real errors" if case in {c.name for c in CORRECTIONS} else "edits against the prompt's concept"


def paired_differences(results: list[Measured], variant: str) -> list[str]:
    """The variant minus the default on the same case and training seed (mean ± std): how each
    choice moves forgetting and integrity, with case-to-case variation cancelled."""
    default = {(r.case, r.train_seed): r for r in results if r.variant == "default"}
    pairs = [(row, default[(row.case, row.train_seed)]) for row in results if row.variant == variant and (row.case, row.train_seed) in default]
    cells = []
    for column, scale in (("r", 1), ("same_09", 16), ("other_09", 16), ("seconds", 1)):
        values = [(getattr(a, column) - getattr(b, column)) * scale for a, b in pairs]
        cells.append(f"{statistics.fmean(values):+.2f} ± {statistics.stdev(values) if len(values) > 1 else 0:.2f}" if values else "—")
    return [variant, str(len(pairs)), *cells]


def pareto_plot(results: list[Measured], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(10, 5))
    colours = plt.get_cmap("tab20").colors  # one colour per variant (tab10 repeats after ten)
    for number, variant in enumerate(dict.fromkeys(row.variant for row in results)):
        rows = [row for row in results if row.variant == variant]
        x = [row.same_09 * 16 for row in rows]
        y = [row.r for row in rows]
        axis.errorbar(statistics.fmean(x), statistics.fmean(y), xerr=statistics.stdev(x) if len(x) > 1 else 0, yerr=statistics.stdev(y) if len(y) > 1 else 0, fmt="osD^vPX*"[number % 8], color=colours[number % len(colours)], capsize=3, label=variant,
                      markersize=9 if variant == "default" else 6, zorder=3 if variant == "default" else 2)
    axis.axhline(metrics.FIXED_AT, color="grey", linestyle="--", linewidth=1)
    axis.set_xlabel("integrity: same-prompt seeds with SSIM ≥ 0.9 (of 16)")
    axis.set_ylabel("forgetting: r toward the surrogate")
    axis.set_title("Forgetting against integrity (mean ± std over cases and training seeds)")
    axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def cases_picture(pictures: dict[str, dict], path: Path, scale: int = 2) -> None:
    """One row per case: target | surrogate | after (default settings, training seed 0)."""
    cells = []
    for images in pictures.values():
        cells += [images["target"], images["surrogate"], images["after"]]
    picture = grid(cells, 3)
    picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST).save(path)


def write_report(results: list[Measured], robust: dict, two: dict | None, args, path: Path, seconds: float, load: float | None = None, speed: float | None = None) -> None:
    """docs/QUALITY.md; `load` is the machine's mean 1-minute load average after each job, `speed`
    the seconds of `machine_speed` at the end of the run (None: not recorded)."""
    variants = list(dict.fromkeys(row.variant for row in results))
    lines = [
        "# Quality: does the hotfix fix, and what does it cost?",
        "",
        f"Written by `python -m benchmarks.quality {' '.join(args.argv)}`".rstrip() + f" in {seconds / 60:.0f} min on {args.where}. "
        "Every number is mean ± standard deviation over the runs of a row (cases × training seeds); "
        "shares are of 16 images. r is how far the painted pixels moved toward the surrogate "
        f"(1 fixed, 0 unchanged; verdict `fixed` at r ≥ {metrics.FIXED_AT}); SSIM after vs target says how much "
        "the target seed's image changed at all (NegGrad, SISS and EraseDiff know no surrogate: they can only move away)."
        + (f" The machine's speed at the end of the run: 8 images × 25 steps took {speed:.2f} s (the generation row of "
           "`python -m benchmarks`; docs/PERFORMANCE.md has it on an idle machine), so job times here scale with it." if speed else ""),
        "",
        "## All variants on the suite",
        "",
        table(["variant", "runs", *HEADERS], [[variant, str(sum(r.variant == variant for r in results)), *summary_row([r for r in results if r.variant == variant])] for variant in variants]),
        "",
        "![forgetting against integrity](quality/pareto.png)",
        "",
        "(The ablations and the paper preset ran on two or three of the cases, so their points are not on the same footing as the "
        f"default's {len({r.case for r in results if r.variant == 'default'})}: compare them through the paired table below.)",
        "",
        "## Default settings, per case",
        "",
        table(["case", "kind", *HEADERS], [[case, next(r.kind for r in results if r.case == case), *summary_row([r for r in results if r.variant == "default" and r.case == case])] for case in dict.fromkeys(r.case for r in results if r.variant == "default")]
              + [[f"**all {group}**", "", *summary_row(rows)] for group in ("corrections of real errors", "edits against the prompt's concept") if (rows := [r for r in results if r.variant == "default" and group_of(r.case) == group])]),
        "",
        "## Each choice against the default (same cases and training seed; difference, mean ± std)",
        "",
        table(["variant", "pairs", "Δ r", "Δ same prompt ≥ 0.9 (of 16)", "Δ other prompts ≥ 0.9 (of 16)", "Δ job s"], [paired_differences(results, variant) for variant in variants if variant != "default"]),
        "",
        "![target | surrogate | after, default settings, training seed 0](quality/cases.png)",
        "",
    ]
    if robust:
        checks = list(next(iter(robust.values())))
        lines += [
            "## Does the fix hold? (default, training seed 0; r against the base model's own image for that prompt or noise)",
            "",
            table(["case", *checks], [[case, *[f"{values[c]:.2f}" if values[c] is not None else "n/a" for c in checks]] for case, values in robust.items()]),
            "",
        ]
    if two:
        lines += ["## Two targets in one job (default settings)", "", table(["case", "r", "same ≥ 0.9", "other ≥ 0.9"], [[name, f"{two[name]['r']:.2f}", f"{two[name]['same_09'] * 16:.0f}/16", f"{two[name]['other_09'] * 16:.0f}/16"] for name in two["cases"]]), f"\nJob: {two['seconds']:.0f} s.", ""]
    job_seconds = [r.seconds for r in results if r.variant == "default"]
    # Other work shared the cores: the load stayed above the threads this run used, or a job took far longer than the typical one.
    loaded = args.shared_machine or (load is not None and load > 1.25 * torch.get_num_threads()) or (len(job_seconds) > 1 and max(job_seconds) > 3 * statistics.median(job_seconds))
    lines += [
        "## Reading it",
        "",
        *(["- **Job times of this run are not timings.** Other work shared the "
           f"cores for part of the run ({f'mean load {load:.1f} on {torch.get_num_threads()} threads; ' if load else ''}the slowest default job took {max(job_seconds):.0f} s, the fastest {min(job_seconds):.0f} s). "
           "`docs/PERFORMANCE.md` times jobs on an otherwise idle machine."] if loaded else []),
        ("- **This run: 60 planned steps and neighbour checks (`steps` 90 → 60, `neighbour_checks` 4; the row "
        "`90 steps without neighbour checks` is the setting before it, on the four slow corrections).** The slow jobs were slow "
        "in two ways. Targets fixed at r 0.70–0.79 by step 55–65 trained on to step 90 for the last hundredths (belgium-40, "
        "japan-77; held-back france, germany and ireland): a job now plans 60 steps, and a target fixed by then (r ≥ 0.7) "
        "stops there, or is consolidated if it has r to spare, while one not yet fixed trains on as before. And slow "
        "corrections stood at r 0.5–0.65 for 60 steps under the full remember weight (netherlands-62) whether or not that "
        "weight protected anything. Now, while r gains less than 0.05 in 10 steps, the job samples the flagged output's 4 "
        "nearest recorded remember seeds with the adapter (one batch of 4, about 1 s here) and compares each with its "
        "frozen image: all at SSIM ≥ 0.95, the remember weight is halved (down to 1/8); one under 0.9, it is doubled back; "
        "a check at the full weight that finds one under 0.95 ends the checks, and that target keeps the full weight past "
        "`steps` too (its slow climb is what holds its neighbours). The job's summary and the Results page say what the "
        "checks did. How it was found (scratch, training seed 0): after the default job, netherlands-62's 8 nearest "
        "remember seeds all kept SSIM ≥ 0.96, belgium-77's had fallen to 0.85 and belgium-40's to 0.91, and the nearest "
        "8 unseen seeds said the same (0.96, 0.87, 0.86); with the remember weight at 1/3 or 1/10 from the start, "
        "netherlands-62 kept 16/16 at r 0.74 and 0.80 while belgium-77 kept 11 and 3/16 and belgium-40 14 and 11: the "
        "weight a case can bear differs by case, and its nearest seeds say which. Lowered later it buys less than from the "
        "start (netherlands-62: halved at steps 30, 45 and 60, fixed at step 75, against 105 with 60 planned steps and no "
        "checks), and resetting AdamW's moments at each change did not speed the climb (with 90 planned steps: fixed at step "
        "100, against 90 without the reset). The first version of this change stopped every target at the first refresh "
        "past step 60 where it was fixed, and belgium-77 then kept 13, 11 and 14/16 same-prompt seeds (below the bar of 14; "
        "row `no neighbour checks` has the same stop, 13/16): its nearest seeds had been found leaving at the full weight "
        "(least SSIM 0.81–0.84 at steps 35–45), it crossed r 0.7 only at steps 70–80, and stopped as it crossed, the "
        "remember loss had not yet pulled them back. So a target not fixed at `steps` whose checks found its nearest seeds "
        "leaving is 'held': it trains to `steps_when_held` (90, the old plan) before a fix ends the job. The runs of this "
        "study that rule changes (belgium-77's three default runs, its runs in four ablation rows, and the two-target job; "
        "found from every run's log) were re-run with it in this study's folder and their rows replaced; runs are "
        "deterministic, and the row `90 steps without neighbour checks` repeats `runs/q17`'s default to the digit on its "
        "four cases. Against `runs/q17` (the same 12 cases and 3 training seeds, paired): r −0.007 ± 0.021 per run, same prompt "
        "−0.08 ± 0.37 seeds, other prompts +0.00 ± 0.24, job time −7.9 ± 11.0 s; every run fixed; default jobs took 17–58 s in "
        "process, none over 60 s (17–79 s in `runs/q17`, 7 of 36 over 60 s). belgium-40 keeps 16, 14 and 15/16 (was 16 each) at r "
        "0.71–0.73 (was 0.74–0.79) in 34–38 s (was 65–68 s); japan-77 16/16 at r 0.73–0.74 in 34–41 s (was 53–68 s); "
        "netherlands-62 16/16 at r 0.71–0.72 in 49–55 s (was 64–79 s), its remember weight halved three times from steps "
        "30–40 on, its nearest seeds at SSIM ≥ 0.96 throughout; italy 16/16 at r 0.78–0.82; belgium-77 14, 14, 14 at r "
        "0.71–0.73 (held, as before). r falls where the 90-step plan let a target creep from 0.72 to 0.8 (belgium-40 "
        "training seed 2 0.79 → 0.72, japan-77 seed 2 0.81 → 0.73, romania seed 0 0.81 → 0.76): time bought with the "
        "r above the verdict, not with the verdict or the other seeds."),
        ("- **A twelfth case (an earlier run).** `poland-68-red-corner` is the suite's first correction of a wrong "
        "*element* the model draws: seed 68 of `flag of poland` puts a red patch in the white band's top corner, which "
        "Poland's flag does not have, and the operator paints it the white around it (found by scanning seeds 40–87 of 15 "
        "flags; the crosses removed from the Swiss and Swedish flags are edits against what the model draws right). SISS "
        "moves it halfway (r 0.54) with 11/16 kept, NegGrad and EraseDiff keep none. In that run a row `stop at r 0.75` "
        "asked whether an earlier stop would shorten the slow corrections (training seed 0): it did not. belgium-77 and "
        "netherlands-62 never reached 0.75 before step 90, so their runs were the default's to the digit, yet took 69 and "
        "72 s against 54 and 64 s: the same computation, timed more than an hour apart, differed by 15 s."),
        ("- **Consolidation once the target is fixed (an earlier change: `consolidate_steps` 15, `consolidate_remember_factor` 4; "
        "the row `no consolidation` is the setting before it).** Training used to end at the refresh where the target was "
        "fixed. It now goes on up to 15 more steps with the remember loss at 4× its weight: the forget loss keeps holding "
        "the target while the other seeds the fix spilled onto are pulled back. r is measured at each refresh (every 5 "
        "steps); consolidation ends at the first refresh where r has fallen more than 0.05 below where it stood when the "
        "target was fixed, and the weights of the last refresh that held it are the ones saved (the job's summary and the "
        "Results page say which step's). A target fixed below r 0.75, with less than 0.05 to spare above the verdict "
        "'fixed', is not consolidated at all: it has no r to trade. How it was found (scratch, Switzerland, training seed 1, "
        "fixed at step 30 at r 0.82 with 9/16 other seeds kept): 5, 10 and 15 more steps with the remember loss alone kept "
        "15, 14 and 15/16 while r fell to 0.75, 0.67 and 0.45; with the forget loss kept and the remember weight ×4 they "
        "kept 13, 15 and 16/16 at r 0.79, 0.79 and 0.87. Sweden (training seed 2, fixed at step 45, 10/16) went to 14, 15 "
        "and 16 at r 0.77–0.79. A correction's r falls instead (a first version without the 0.05 limit let chad and italy "
        "fall from 0.81 to 0.70, their other seeds already kept), hence the limit. Against the study before consolidation "
        "(runs are deterministic, and the row `no consolidation` repeats its default on its four cases): the edits against the "
        "concept keep 15.9 ± 0.3 of 16 same-prompt seeds at SSIM ≥ 0.9 (was 13.8 ± 2.7) and 14.3 ± 1.8 at ≥ 0.95 "
        "(was 10.4 ± 5.5), at r 0.85 ± 0.04 (was 0.83 ± 0.02): Switzerland 16, 16, 16 (was 11, 9, 15) at r 0.92, 0.87, 0.90, "
        "Sweden 16, 15, 16 (was 12, 12, 10) at r 0.80, 0.81, 0.79, and the swapped Russian bands reach r 0.87–0.90 (was "
        "0.82–0.87). The corrections of real errors change within the noise: r −0.01 ± 0.02 per run, same prompt "
        "−0.05 ± 0.2 seeds, other prompts +0.05 ± 0.2; chad keeps 15, 15, 15 (was 16, 15, 15) at r 0.77, 0.82, 0.76 (was 0.81, "
        "0.82, 0.80); belgium-77 keeps 14, 14, 14 as before. A job of an edit took +7.9 ± 6.6 s, one of a correction "
        "+2.3 ± 9.2 s (paired job times; the study before ran on a day when the machine was 1.8× slow, this one 1.7×). The margin rule was measured in this run against the run just before "
        "it, which consolidated every fixed target (the same day, every default run paired): it changes only belgium-77, "
        "fixed at r 0.71–0.73, whose training seed 1 keeps 14 of 16 instead of 13 (seeds 0 and 2 had already fallen below "
        "0.7 at consolidation's first refresh and kept the weights they were fixed with); every other run repeats the "
        "run before to the digit (netherlands-62, fixed at r 0.70–0.71, had likewise kept its fixed weights)."),
        ("- **Does the fix hold beyond the flagged prompt and noise?** (the table above, default, training seed 0) "
        "Paraphrases in words the model knows move r by at most 0.01: the fix belongs to the seed's drawing, not to "
        "the wording. The one exception is the Polish corner, the smallest painted region of the suite (about 8 × 8 "
        "pixels): 0.76 to 0.82 against 0.82, still fixed. Perturbing the seed's initial noise by 5 % moves r by at most 0.04 (belgium-40 0.71 → 0.67, "
        "partly fixed); by 15 % the perturbed seed is partly another drawing, and r falls by up to 0.26 (poland-68 0.56, belgium-40 0.53, netherlands-62 "
        "0.58, chad 0.60) while romania, belgium-77 and the Russian bands hold. The targets fixed close to r 0.7 "
        "(netherlands-62, belgium-77, belgium-40; with 60 planned steps, fewer targets creep on toward 0.8) sit at the verdict's edge under every paraphrase. In the two-target job "
        "(chad-40 and italy-77 fixed by one job) both are fixed, r 0.80 and 0.75, and each keeps 16/16 same-prompt and "
        "other-prompt seeds."),
        ("- **A larger remember set (an earlier change: `remember_count` 32, `remember_batch_size` 16; the row `16 remember seeds "
        "and 8 samples` is the setting before it).** The recorded remember trajectories are the 32 of the flagged prompt's "
        "96 pool seeds nearest the flagged output (was 16 of 48; the other 64 are renoised, and the empty prompt keeps "
        "its first 32 seeds), and each step distils 16 recorded states instead of 8. Nothing else changes. Each half "
        "alone had moved belgium-77 by about one seed, within the noise (scratch, three training seeds each, the default "
        "then kept 13, 11, 13/16): 16 recorded samples per step 14, 13, 13; the 32 nearest of 96 14, 14, 12. Together "
        "(scratch, `--define '{\"rb16n32\": {\"remember_batch_size\": 16, \"remember_count\": 32}}'`) 14, 14, 14 at r "
        "0.71–0.73, and 16/16 other-prompt images each. Over the whole suite, that study's default paired with the "
        "one before it (the same 11 cases and 3 training seeds; runs are deterministic, and the row `16 remember seeds "
        "and 8 samples` repeated the default before it on its four cases): same prompt +0.5 ± 1.5 seeds per run at SSIM ≥ "
        "0.9 and +0.6 ± 2.0 at ≥ 0.95, other prompts +0.1 ± 0.6, r +0.00 ± 0.02, job time −1.0 ± 9.8 s (that run's "
        "machine was about 15 % slower than the one before, so per step the larger batch costs a little more). Per "
        "case: belgium-77 14, 14, 14 (was 13, 11, 13), belgium-40 16, 16, 16 (16, 14, 16), Switzerland 11, 9, 15 (11, 8, "
        "8), Sweden 12, 12, 10 (12, 9, 13); other prompts: the swapped Russian bands 16, 15, 16 (15, 15, 14) and the "
        "Swedish edit 15, 15, 15 (15, 14, 15), then on the bar of 15; every other case within one seed of before. A cold "
        "cache generates 64 more pool images per remember prompt and records twice as many remember trajectories (about "
        "20 s more for a job's two prompts on an idle machine, once); a warm job reads them back."),
        ("- **The remembered trajectories are the flagged output's neighbours (an earlier change, `remember_choice` 'nearest'; "
        "the row `first remember seeds` is the setting before it).** "
        "The seeds that drift are the ones that look like the flagged output: on belgium-77 (training seed 0, the previous "
        "default) the correlation between an evaluation or remember seed's SSIM after and its pixel distance to the target "
        "image was +0.47 over 32 seeds. So of the flagged prompt's pool of 48 seeds (the images renoised remembering draws "
        "from, generated anyway), the 16 whose frozen images lie nearest the flagged output (mean absolute pixel difference) "
        "give the recorded trajectories, and the other 32 are renoised; the empty prompt keeps its first 16 seeds (with 16 "
        "remember seeds, as it was made; now 32 of 96, above). Nothing "
        "else changes: the same remember loss, weights, batch and evaluation seeds. When it was made, on the seven corrections, three training seeds each (`--variants \"default,first remember seeds\" --cases <the 7 corrections> --no-extras`; runs are deterministic, so `first` repeats the default before it run for run): same prompt 15.3 ± 1.4/16 at SSIM ≥ 0.9 (previous default 14.7 ± 2.0), other prompts 16.0 ± 0.2 (15.9 ± 0.4), r 0.77 ± 0.05 (0.78 ± 0.05), every run fixed. Per case: belgium-77 12.3 (13, 11, 13; was 12, 9, 10) at r 0.71 (was 0.73), belgium-40 15.3 (16, 14, 16; was 15, 14, 14), japan-77 16.0 (was 16, 15, 15), chad 15.3 (16, 15, 15; was 15 each) at r 0.81 (was 0.83); italy, romania and netherlands-62 keep 16/16 as before. The row `first remember seeds` (chad, training seed 0) then repeated the previous default's run to the digit (r 0.83, 15/16). Scratch runs before it (training seeds 0 to 2, the same evaluation seeds): belgium-77 14, 11, 13 and belgium-40 16, 15, 16 with a first version that renoised some pool images twice. The nearest seeds are recorded once per target (records are cached by seed set); a cold cache also generates the prompt's first 16 images, which it used to get only inside their recorded trajectories."),
        ("- **Past `steps`, a correction not yet fixed is held back by half the remember weight (an earlier change, "
        "`extend_remember_factor` 0.5).** A slow correction settles near r 0.65–0.7 under the full remember weight: the "
        "forget and remember gradients balance there, and r crosses 0.7 only by the wobble of its measurement "
        "(held-back netherlands-75 stood at r 0.64–0.68 from step 120 to 150). A higher learning rate does not move that "
        "balance: twice the rate past step 90 took netherlands-75 165 steps instead of 155 (scratch). Half the remember "
        "weight past `steps` does. It was first probed on held-back netherlands-75 (130 steps), so that case is no longer "
        "untouched by this choice; the numbers that chose it are the two cases made for it. netherlands-62, new in this suite (its teal bottom band painted Dutch blue), is fixed at "
        "steps 110, 135 and 110 (r 0.70, 0.72, 0.70) in 47–56 s, keeping 16/16 same-prompt and other-prompt seeds; with "
        "the full weight (row `full remember weight while extending`, training seed 0) it took 140 steps. A scratch case "
        "made the same way, netherlands-81, took 170 steps (70 s) with the full weight and 100 (46 s) with half, 16/16 "
        "kept either way. Only runs that train past `steps` change, and in this suite they are netherlands-62 and "
        "belgium-77's training seed 0: 100 steps either way, r 0.74 and 12/16 kept (full weight: 0.73 and 13/16). Every "
        "other default run of this run repeats the previous run's r and kept seeds to the digit (runs are deterministic). "
        "Since the neighbour checks (this run), a target whose checks found its nearest seeds already leaving at the full "
        "weight keeps the full weight past `steps` (belgium-77, whose 60 planned steps leave it short of r 0.7)."),
        ("- **The remember trajectories are cached (an earlier change).** The frozen model's recorded sampling of the remember "
        "seeds (the states distillation learns from; 2 prompts × 16 seeds × 25 steps on the demo model) is kept in the "
        "generation cache beside its images (`GenerationCache.get_or_record`, float32, so a record read back is the one "
        "sampled), and a warm job reads it instead of sampling again: about 5 s less preparation on the demo model "
        "(belgium-40 with 30 steps, in one process, read back and sampled in turn: 0.9–1.2 s read back, 5.9–6.1 s sampled; "
        "training steps equal within the noise). Paired with the previous run's 30 default jobs: −3.4 ± 4.6 s; the "
        "90-step jobs (belgium-40, japan-77, belgium-77) ran about as long as before, within this machine's ±10 %."),
        ("- **Renoising three times as many of the prompt's images (an earlier change, `renoised_seed_multiple` 3).** "
        "Renoised remembering (below) drew its fresh noisings from the 16 remember seeds' own images; it now draws them "
        "from 48 per remember prompt, the 32 more generated once into the generation cache (a cold cache's first job pays "
        "for them: 64 images on the demo model). Over the whole suite, that run's default against the run before it (the "
        "same 10 cases and 3 training seeds, nothing else changed; runs are deterministic): same prompt +0.2 ± 0.9 seeds "
        "per run at SSIM ≥ 0.9 and +0.8 ± 1.5 at ≥ 0.95, r −0.003 ± 0.024, other prompts −0.1 ± 0.6, job time −1.0 ± 5.0 s. "
        "belgium-40 keeps 14.3/16 (15, 14, 14; was 14, 13, 14), over the bar; belgium-77 10.7 (13, 9, 10; was 11, 10, 7); "
        "japan-77 15.3 (16, 15, 15; was 16, 14, 14). Scratch runs before it, on belgium-77 and belgium-40 (three training "
        "seeds each): 96 images per prompt kept 9.7 and 14.7/16, 48 images with 8 renoised samples per step 10.3 and "
        "14.3; more than 48 buys nothing beyond the noise on belgium-77."),
        ("- **Remembering at fresh noisings of the remember images (an earlier change, `remember_renoised` 4).** The remember "
        "loss held where it was trained and not beyond: with the default before that change, belgium-77's 16 remember "
        "seeds kept 14/16 at SSIM ≥ 0.9 while its 16 evaluation seeds kept 8/16. The recorded sampling states are a few "
        "hundred fixed points, each drawn once or twice in a job, and the adapter learned to leave those points alone. "
        "Each step also distils the frozen model at 4 fresh noisings x_t = a·x0 + b·ε of the prompt's images, "
        "at random t (the teacher's prediction computed there, with the adapter off), so the remember loss covers "
        "the neighbourhood of the prompt's images. Paired with the default before it on the whole suite: same prompt "
        "+1.1 ± 2.0 seeds per run (belgium-77 +3, +4, +3, sweden-67 +9, +3, +4), r +0.01 ± 0.03, other prompts +0.1 ± 0.5, "
        "job time +0.2 ± 3.9 s. 8 renoised samples per step instead of 4 kept 9/16 on belgium-77 (seed 0); 32 remember "
        "seeds instead of 16 kept 12, 11, 8/16, one seed more each, for about 7 s more of preparation per job (each "
        "remember seed's whole trajectory is recorded; a renoised image is only encoded). On the three easy ablation "
        "cases renoising changes nothing beyond one seed (rows `no renoised remember`, `renoise remember seeds only`). "
        "The gap it was for narrowed: belgium-77's remember seeds keep 13/16 (mean SSIM 0.95) and its evaluation seeds "
        "11/16 (0.91) with 4 samples from the remember seeds' own images, where they kept 14 and 8 (0.94 and 0.89)."),
        ("- **Weighting the target's unpainted pixels** (scratch, training seed 0): the forget loss's error on pixels "
        "outside the painted region, where x̂0 is held at the frozen model's estimate, weighted 4× or 16× against the "
        "painted pixels. 4×: belgium-77 7/16 at r 0.70, belgium-40 14 at r 0.72, japan-77 14, chad 15. 16×: belgium-77 "
        "14/16 but r 0.57 after 180 steps, belgium-40 0.63, japan-77 0.59: not fixed. The same trade as a heavier remember "
        "loss; not adopted."),
        "- **Why the forget loss is measured on decoded pixels.** The demo model draws in latent space "
        "(a VAE, 4×4 pixels per latent cell), and a colour is a nonlinear function of the latents. With the forget loss on the "
        "latents, romania-79's target estimate reached 86 % of the way to the surrogate's latents on the painted cells but "
        "only 66 % of the way to its colour, and no setting moved it further: no remember loss at all gave r 0.67, a rank-32 "
        "LoRA on every layer at twice the learning rate 0.74. A painted correction also moves edges: a brush covers the "
        "anti-aliased pixels around a region, and those pixels carry most of ‖x_s − x_f‖² (a perfect recolour of the region "
        "without that one-pixel ring scores r 0.46 on romania-79 and 0.61 on belgium-40), finer than a latent cell. "
        "`loss_space` 'pixels' decodes x̂0 with the model's own VAE decoder inside the painted box (the painted cells and 8 "
        "cells around them) and compares it with the surrogate as painted. On the three cases the latent loss left partly "
        "fixed (belgium-40, romania-79, belgium-77) r rose by 0.14 each (training seed 0: 0.65 → 0.79, 0.66 → 0.80, 0.57 → "
        "0.71); the other cases reach the early stop (r 0.8) either way, which is why the paired row `forget loss on latents` "
        "averages only −0.05. With forgetting this much stronger, the remember weight went from 1 to 1.5 (sweep below).",
        "- **What did not help** (training seed 0, on belgium-40, romania-79, belgium-77 and italy-77): the unconditional "
        "branch trained in the forget loss instead of recorded (belgium-40 kept 6/16); the forget loss in ε-space (r up, "
        "belgium-40 6/16, italy 10/16); Min-SNR-5 weighting of the forget loss (belgium-40 10/16) or of both losses (romania "
        "0.65); constant λ (romania 0.59). Earlier sessions: forgetting only at s ≤ 0.5, a lower remember weight with a "
        "larger boost, distilling the guided prediction, on-policy remember trajectories, 32 remember seeds, 16 remember "
        "samples per step. For speed: re-recording the target's trajectory every 10 steps instead of 5 (each refresh "
        "samples the target seed again, about 0.6 s here), training seeds 0 and 1 on chad-40, belgium-40, japan-77 and "
        "belgium-77, paired with the default: job time −1.2 ± 1.8 s, r −0.02 ± 0.03, same prompt −0.3 ± 0.9 seeds. "
        "LoRA on fewer decoder blocks (scratch layer sets, training seed 0): the two finest up blocks only kept "
        "belgium-77 6/16 at r 0.70 (default 13 at 0.73); the finest only left chad, belgium-40 and japan-77 not fixed "
        "after 180 steps (r 0.65–0.68, about 60 s each) and kept belgium-77 12/16 at r 0.71. With this change's "
        "defaults (scratch, training seeds 0 and 1 on belgium-77 and belgium-40; the default kept 12, 9 and 15, 14/16): "
        "forgetting at large t, where x_t is still mostly the seed's own noise (λ(s)=s^γ, the paper's direction), was not "
        "more specific to the seed: 11, 3 and 14, 7/16 at r 0.75–0.81; forgetting nearer the end of sampling (γ 2 or 3 of "
        "`timestep-late`, carried to r 0.7 by the extension) kept 10, 13 and 12, 10/16 on belgium-77 and 15, 14 and "
        "15, 15 on belgium-40 at r 0.70–0.75, the gentle trade again, γ 3 taking 150 steps (46 s) on belgium-77.",
        ("- **Why belgium-77's other seeds change, and what did not stop it** (training seed 0, on belgium-77, belgium-40 and "
        "japan-77; scratch runs of the study with a variant defined by `--define`). Switching the trained adapter on only "
        "inside a window of timesteps while sampling belgium-77's 16 other seeds shows the drift comes from every part of "
        "sampling: t ≥ 500 alone moves the target to r 0.40 and keeps 15/16 other seeds, t < 500 alone r 0.34 and 14/16, "
        "both r 0.71 and 8/16; the small changes add up. Before remembering at fresh noisings, what did not move that "
        "frontier: 32 or 64 remember seeds (belgium-77: 13/16 at r 0.66, 8/16 at r 0.73), the remember loss measured "
        "on decoded pixels like the forget loss (belgium-40 fell to 8/16) or on both latents and pixels (belgium-77 9/16 "
        "at r 0.66, the same trade as a remember weight of 2), and on-policy remember states, 4 remember seeds re-sampled "
        "with the adapter at each trajectory refresh and distilled from the frozen model there (belgium-77 9/16 at r 0.72, "
        "25 s more per job). Each of these buys belgium-77's other seeds only with its own r."),
        ("- **Other levers tried on belgium-77 before the larger remember set** (scratch runs of the study with `--define`, training seed 0 unless "
        "said). Aiming the target's unpainted pixels at the frozen model's estimate on its *original* trajectory, so its "
        "background cannot drift: belgium-77 kept 9/16 (default 8), belgium-40 13 (14), japan-77 15 (14), chad 15 (16), "
        "no change beyond the ±2-seed noise. LoRA rank 2: belgium-77 4/16 and other prompts 10/16; attention layers only: "
        "5/16; learning rate 0.75e-3 (with the extension): 5/16; γ 3 (forgetting only near the end of sampling): 12/16 but "
        "r 0.66 after 180 steps, not fixed. Rank 32 with γ 2, three training seeds on belgium-77, belgium-40 and japan-77: "
        "same prompt 8.0, 14.7 and 14.0/16 (default 6.0, 13.7, 14.0) at r 0.71, 0.76 and 0.72 (default 0.72, 0.79, 0.76). "
        "Paired, that is +1.0 ± 1.9 seeds for −0.03 r: the gentle trade again, within the spread, with a 4× larger "
        "adapter, so it was not adopted. The gentle preset (a lower learning rate and a heavier remember loss, carried on "
        "to r 0.7 by the extension), three training seeds: belgium-77 kept 5.7/16 (5, 5, 7) at r 0.71, belgium-40 13.7/16 "
        "at r 0.75. On belgium-77, every one of these settings that reaches r 0.7 kept at most 10 of 16. An update confined to "
        "the null space of the other seeds' layer inputs (as knowledge editing does) cannot help either. At every "
        "decoder layer the target seed's inputs lie in the span of the remember seeds' inputs nearly as fully as the evaluation seeds' inputs do: outside the subspace that holds 99.9 % of the "
        "remember seeds' energy lies at most 4.3 % of the target's, 1 to 2.9 times the evaluation seeds' share. Such an "
        "update would remove the fix together with the drift."),
        ("- **What belgium-77's lost seeds are** (the previous default's adapter, 16 remember seeds, training seed 0, on the prompt's 16 evaluation "
        "seeds; picture below, before on top, after below, red: SSIM below 0.9). The seeds below 0.9 (6, 9 and 10: SSIM "
        "0.89, 0.87, 0.84) are the prompt's pale renderings; 9 and 10 are, after seed 13, the nearest to the flagged "
        "image (mean pixel distance 60 and 58; seed 13 56, seed 6 79, the others 66–115). Their flag keeps its outline "
        "and place, and its pale yellow and red turn saturated, the colours the operator painted: over the pixels that "
        "changed by more than 20 RGB units, seeds 9 and 10 moved closer to the painted yellow and red by 11 and 6 units "
        "on average. The correction reaches its nearest neighbours in its own direction, which SSIM counts as damage; "
        "the flag judge still names every image Belgium. The bar is not changed for it."),
        "",
        "  ![belgium-77: the prompt's 16 evaluation seeds before and after the previous default's adapter](quality/belgium-77-other-seeds.png)",
        "",
        ("- **Levers tried on belgium-77 since the nearest remember seeds** (three training seeds each, scratch study runs "
        "with `--define`; the default kept 13, 11, 13 at r 0.71): the 16 nearest of 96 pool seeds (`renoised_seed_multiple` "
        "6) 13, 12, 12 (r 0.73); the 32 nearest of 96 with 8 renoised samples per step 14, 11, 11 (0.72); remember weight 3 "
        "with large-t boost 5.5 (twice the small-t remember weight, the same at t=1) 13, 12, 13 (0.70); earlier, the 32 "
        "nearest of 96 14, 14, 12 (0.71). None moves belgium-77 beyond the ±2-seed noise. A lead measured on "
        "2026-12-04, the machine 1.6× slow (`--define '{\"rb16\": {\"remember_batch_size\": 16}}'`): 16 recorded remember "
        "samples per step instead of 8 kept belgium-77 14, 13, 13/16 at r 0.73, 0.74, 0.71 (other prompts 16, 16, 14), "
        "and left belgium-40 (16, 14, 16 at r 0.78–0.80) and japan-77 (16/16 each, r 0.79–0.81) as the default keeps "
        "them, r about 0.01 higher on average; job times −15 to +27 s against the default's same runs (each step distils twice as many "
        "states). Together with the 32 nearest of 96 it became the larger remember set (above)."),
        ("- **The study on a GPU.** `--device cuda` runs the demo model in fp32 on a GPU: on a lent H200 the default's runs "
        "on chad-40 and belgium-40 (training seeds 0, 1, 2) repeated this machine's r and kept seeds to four digits "
        "(chad 0.8076, 0.8120, 0.8006; belgium-40 0.7543, 0.8089, 0.7857). Seven variants beside the default there (32 "
        "remember seeds; 96 pool images; both; 16 remember samples; 8 renoised samples; 32 seeds with 8 renoised; "
        "large-t boost 24) stayed within 1 seed and 0.06 r of it on those two cases. With eight processes sharing the "
        "GPU, each job took 20–60 s, no faster than this CPU on a normal day. Moving the study there also found that a "
        "job with half-precision weights, a GPU's default, crashed at its first remember step; it now trains "
        "(`DiffusionModel.predict` casts states and conditioning to the weights' precision)."),
        "- **What stays hard.** belgium-77 (seed 77's noise gives odd colours for every prompt) sits exactly on the "
        "same-prompt bar: fixed at r 0.71–0.73, 14, 14, 14 of 16 kept (12.3 with 16 "
        "remember seeds, 10.3 with the first 16 seeds remembered, 6.0 before remembering at fresh noisings). It is fixed "
        "at or past step 90 with less than 0.05 to spare above r 0.7, so it is not consolidated (consolidating it kept 14, "
        "13, 14 in the run before this one). Its painted yellow and red "
        "are more saturated than the model's own Belgian colours, and the change reaches the prompt's pale renderings "
        "(above). With the forget loss on latents it keeps 12/16 because its colours hardly move (r 0.58). Removing the "
        "Swedish or Swiss cross, an edit against what every seed of the prompt draws, changed about a quarter to a third "
        "of the prompt's other seeds before consolidation (Sweden 11.3/16, Switzerland 11.7; 3.7 and 8.0 before renoised "
        "remembering), and the gentle preset had not changed that beyond the noise (scratch, 2026-12-04, three training "
        "seeds each: Switzerland 12, 11, 11, Sweden 13, 12, 12 at r 0.75–0.78); consolidation brings them to 16 and 15.7 "
        "(above). Every other case meets the three bars; the other-prompt images of the Swedish edit (15, 16, 16) and of "
        "the swapped Russian bands (15, 16, 15) are the nearest to theirs.",
        "- **Training goes on past `steps` while a target is not yet fixed** (`extend_until_fixed`, up to 90 more "
        "steps, stopping once r ≥ 0.7; the rows `forget loss on latents` and `previous defaults` run without it, as those "
        "defaults did). It is for slow corrections: in this suite netherlands-62 (all three training seeds: fixed at steps 105, "
        "105 and 115) and belgium-77 (training seed 1, step 95) are short of r 0.7 at step 90 (with the 90-step plan; with "
        "60 planned steps, netherlands-62 and belgium-77 train past step 60). The held-back numbers that follow are of the versions before the 60-step "
        "plan and the neighbour checks, except this one: with them (this version, 2026-12-04, the machine 1.8× slow) all five are fixed "
        "(netherlands-74 r 0.80, netherlands-75 0.71, france-77 0.74, ireland-77 0.71, germany-77 0.72), 16/16 same-prompt "
        "seeds each, 16/16 other-prompt images but netherlands-75's 15/16, in CLI jobs of 49–70 s (steps 75, 90, 60, 75, 60); a later run that day, the machine 2.4–3.1× slow, repeated every r and kept seed to the digit in CLI jobs of 72–98 s, which the generation row timed just before each job (2.43–3.14 s) scales to 25–42 s on the idle machine (1.05 s; a repeat of netherlands-75 gave the same log to the digit in 91 s with the row at 2.00 s, 48 s scaled: the scaling is itself noisy by about 15 %). Held-back netherlands-75 (`python -m benchmarks.held_back`) "
        "is partly fixed at step 90 (r 0.57); with the full remember weight it was fixed at step 155, a 69 s job (75 s "
        "through the CLI), and with half of it past step 90 at step 130, a 50 s job (56 s through the CLI), still 16/16 "
        "same-prompt and other-prompt seeds; with the nearest remember seeds at step 145 (16 of them) and 135 (32). With this version (consolidation, "
        "and none for a target fixed below r 0.75; 2026-12-04, the machine about 1.8× slow, a training step 0.7–0.9 s "
        "where the run before took 0.6 s), all five are fixed (netherlands-74 r 0.81, netherlands-75 0.70, france-77 "
        "0.73, ireland-77 0.76, germany-77 0.72), 16/16 same-prompt and 16/16 other-prompt seeds each, CLI jobs of "
        "75–127 s with imports and model loading; netherlands-74 and ireland-77 consolidated, the other three were "
        "fixed below r 0.75 and stopped there (steps 90, 90 and 135). After two speed-ups of the same day that change "
        "no result (one remember forward pass, the LoRA folded into the weights while sampling: docs/PERFORMANCE.md) "
        "the same five jobs gave the same r and kept seeds in 50–105 s (the machine about 1.75× slow, a training "
        "step 0.54–0.69 s); this study's job times were measured with them. Consolidating every fixed target (the run "
        "before, the machine 1.5–1.7× slow) gave the same verdicts and 16/16 everywhere at r 0.70 (netherlands-75), "
        "0.71 (france-77) and 0.70 (germany-77), CLI jobs of 57–93 s. The previous version on all "
        "five held-back cases (2026-12-04, the machine 1.8× slow): every one fixed (netherlands-74 r 0.81, "
        "netherlands-75 0.70, france-77 0.73, ireland-77 0.79, germany-77 0.72), 16/16 same-prompt and 16/16 other-prompt "
        "seeds, CLI jobs of 67–104 s with imports and model loading (about 38–58 s at the idle speed); with 16 remember "
        "seeds (the run before) r 0.70–0.80 and 16/16 everywhere too. In the two-target job both targets are fixed "
        "by step 90 (before renoised remembering italy stood at r 0.68 there). A job with several "
        "targets also spends its forget batch only on those not yet at `stop_at_r` once one is.",
        "- **The remember loss and the LoRA placement (an earlier change).** The seeds that fell below SSIM 0.9 kept their "
        "colours while their flag's outline moved by a pixel or two: the layout, which every seed decides early in sampling "
        "(large t), shifted. The distilled remember loss is weighted w·(1 + k·s), hardest at large t "
        "(`remember_large_t_boost` k = 12), and the LoRA sits on the U-Net's decoder only (`lora_layers` 'decoder'), so "
        "the blocks that place the flag are not trained. Compare `previous defaults`, `no large-t remember boost` and "
        "`LoRA on every layer`.",
        "- **Where λ(s) puts forgetting.** With the losses stated on the implied clean image (x0-space), λ(s) really "
        "decides where along t each term acts (in ε-space the forget gradient is SNR(t) times larger at small t, whatever λ says). "
        "The paper's direction, λ(s)=s^γ (forgetting at large t), is compared with the default's `timestep-late` "
        "(λ(s)=c·(1−s)^γ) in the paired table.",
        "- **Projection (the paper's Table IV).** Projecting g_f or not moved the numbers by less than their spread on these "
        "cases: the ordering is not reproduced here, and the projection stays on as the paper's default.",
        "",
        "### How the remember weight was chosen (training seed 0, eight cases, one run each)",
        "",
        "`python -m benchmarks.quality --variants <name> --cases <8> --ablation-cases <8> --train-seeds 0 --other-train-seeds 0 "
        "--no-extras --define '{\"<name>\": {\"remember_weight\": w}}'` with the pixel forget loss:",
        "",
        "| remember weight | mean r | lowest r | same prompt ≥ 0.9, mean | lowest | other prompts ≥ 0.9, mean | cases meeting all three bars |",
        "|---|---|---|---|---|---|---|",
        "| 1 | 0.81 | 0.75 | 13.8/16 | 5 | 15.5/16 | 6 of 8 |",
        "| **1.5 (the default)** | **0.79** | **0.71** | **14.5/16** | 8 | **16.0/16** | **7 of 8** |",
        "| 2 | 0.79 | 0.68 | 14.6/16 | 9 | 15.9/16 | 7 of 8 |",
        "",
        "(Cases: chad-40, italy-77, belgium-40, romania-79, japan-77, belgium-77, japan-61, russia-63. The bars: r ≥ 0.7, "
        "≥ 14/16 same-prompt and ≥ 15/16 other-prompt seeds at SSIM ≥ 0.9. belgium-77 misses the same-prompt bar at every weight; "
        "at 2 its r also falls below 0.7, so 1.5 is the weight that fixes every case.)",
        "",
        "## Settings of each variant", "", table(["variant", "changes from the default"], [[variant, json.dumps(VARIANTS.get(variant, {}), ensure_ascii=False) or "—"] for variant in variants]), ""]
    path.write_text("\n".join(lines))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names from VARIANTS")
    parser.add_argument("--cases", default=",".join(case.name for case in CASES))
    parser.add_argument("--ablation-cases", default="chad-40-stripe,italy-77-stripe,japan-61-disc-blue", help="cases of the ablations (the default and baselines run on --cases)")
    parser.add_argument("--few", default="", help="comma-separated variants (e.g. a slow baseline) that run on --ablation-cases only")
    parser.add_argument("--train-seeds", default="0,1,2", help="training seeds of the default variant")
    parser.add_argument("--other-train-seeds", default="0", help="training seeds of every other variant")
    parser.add_argument("--quick", action="store_true", help="default settings only, training seed 0")
    parser.add_argument("--define", default="{}", help='more variants as JSON, e.g. \'{"lr 1e-3": {"learning_rate": 0.001}}\'')
    parser.add_argument("--no-extras", action="store_true", help="skip robustness and the two-target job")
    parser.add_argument("--out", default=str(ROOT / "runs" / "quality"))
    parser.add_argument("--device", default="cpu", help="cpu (the study's machine) | cuda | auto: where the demo model runs, in fp32 (on a GPU the r and kept seeds repeat the CPU's; job times do not)")
    parser.add_argument("--shared-machine", action="store_true", help="say in the report that other work shared the machine, so job times are not timings")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from --out's results.csv and extras.json")
    parser.add_argument("--report", default=str(ROOT / "docs" / "QUALITY.md"))
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    if args.quick:
        args.variants, args.train_seeds = "default", "0"
    VARIANTS.update(json.loads(args.define))
    return args


def read_results(path: Path) -> list[Measured]:
    """The rows of a results.csv, typed as `Measured`."""
    numbers = {f for f in Measured.__dataclass_fields__ if f not in ("variant", "case", "kind", "train_seed", "extra")}
    with open(path, newline="") as handle:
        return [Measured(**{k: float(v) if k in numbers else int(v) if k == "train_seed" else v for k, v in row.items()}) for row in csv.DictReader(handle)]


def report_from_files(args) -> None:
    """Rewrite docs/QUALITY.md and the plot from a finished run's files (no training)."""
    out = Path(args.out)
    results = read_results(out / "results.csv")
    extras = json.loads((out / "extras.json").read_text())
    args.argv = extras["argv"]
    args.where = extras.get("where") or where_it_ran("cpu")
    report = Path(args.report)
    pareto_plot(results, report.parent / "quality" / "pareto.png")
    write_report(results, extras["robust"], extras["two"], args, report, extras["seconds"], extras.get("load"), extras.get("speed"))


def main(args) -> list[Measured]:
    if args.report_only:
        return report_from_files(args)
    torch.manual_seed(0)
    started = time.perf_counter()
    out = Path(args.out)
    cache = GenerationCache(out / "cache")
    model = load_model(DEMO_MODEL, device=args.device, dtype="fp32")  # full precision on every device
    args.where = where_it_ran(args.device)
    judge = load_classifier(JUDGE)
    chosen = [case for case in CASES if case.name in args.cases.split(",")]
    files = {case.name: prepare_case(model, case, cache, out / "cases" / case.name) for case in chosen}
    results, robust, pictures, loads = [], {}, {}, []
    csv_path = out / "results.csv"
    for variant in args.variants.split(","):
        seeds = args.train_seeds if variant == "default" else args.other_train_seeds
        few = variant in ABLATIONS or variant in args.few.split(",")
        own_cases = ABLATION_CASES.get(variant, args.ablation_cases.split(","))
        for case in [c for c in chosen if not few or c.name in own_cases]:
            for seed in [int(s) for s in seeds.split(",")]:
                measured, images = run_one(model, case, files[case.name], variant, VARIANTS[variant], seed, cache, judge, out)
                results.append(measured)
                loads.append(os.getloadavg()[0])
                if measured.extra:
                    robust[case.name] = measured.extra
                if variant == "default" and seed == 0:
                    pictures[case.name] = images
                print(f"{variant:>24} {case.name:>26} seed {seed}: r {measured.r:+.2f}  same≥0.9 {measured.same_09 * 16:4.1f}/16  other≥0.9 {measured.other_09 * 16:4.1f}/16  {measured.seconds:.0f} s", flush=True)
                with open(csv_path, "w", newline="") as handle:
                    writer = csv.DictWriter(handle, fieldnames=[f for f in Measured.__dataclass_fields__ if f != "extra"])
                    writer.writeheader()
                    writer.writerows({k: v for k, v in vars(row).items() if k != "extra"} for row in results)
    two = None
    if not args.no_extras and "default" in args.variants.split(",") and len(chosen) >= 2:
        two = two_target_job(model, chosen[:2], files, cache, judge, out)
    load = statistics.mean(loads) if loads else None
    speed = machine_speed(model)
    (out / "extras.json").write_text(json.dumps({"robust": robust, "two": two, "seconds": time.perf_counter() - started, "argv": args.argv, "load": load, "where": args.where, "speed": speed}, indent=2))
    report = Path(args.report)
    (report.parent / "quality").mkdir(parents=True, exist_ok=True)
    pareto_plot(results, report.parent / "quality" / "pareto.png")
    if pictures:
        cases_picture(pictures, report.parent / "quality" / "cases.png")
    write_report(results, robust, two, args, report, time.perf_counter() - started, load, speed)
    print(f"wrote {report}, {csv_path}")
    return results


if __name__ == "__main__":
    main(parse_args())
