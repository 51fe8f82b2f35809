"""Does the hotfix fix? Forgetting against integrity on a suite of flagged cases (demo model, CPU).

    python -m benchmarks.quality                       # the whole paired ablation (hours on 2 cores)
    python -m benchmarks.quality --quick               # default settings only, one training seed
    python -m benchmarks.quality --variants default,NegGrad --train-seeds 0,1,2 --cases chad-40-stripe

Each case (`benchmarks/cases.py`) is the model's own output for a prompt and seed with a correction:
a local paint, or a global surrogate (SDEdit, an uploaded reference). Every variant is trained on
every case with each training seed, through the same `run_unlearning` the CLI and the app use, and
measured on the same initial noise (`benchmarks.quality_measures`). Writes `runs/quality/results.csv`
and, through `benchmarks.quality_report`, `docs/QUALITY.md` with its pictures.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from PIL import Image

from benchmarks.cases import CASES, Case, paint, reference_photo
from benchmarks.quality_measures import measure, robustness
from unlearn_core.cache import GenerationCache
from unlearn_core.config import DEMO_MODEL, PRESETS, InstanceTarget, UnlearnConfig
from unlearn_core.demo.quality import load_classifier
from unlearn_core.evaluation import EvalTarget
from unlearn_core.files import save_image_atomic
from unlearn_core.models import DiffusionModel, load_model
from unlearn_core.run import run_unlearning, warm_remember_cache

ROOT = Path(__file__).resolve().parent.parent
JUDGE = ROOT / "assets" / "flag-classifier.safetensors"

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
    "random forget states (60 steps)": {"forget_states": "random", "steps": 60, "extend_until_fixed": 0},
    "whole-surrogate aim": {"forget_target": "surrogate"},
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
    # The lean candidate of 2026-12-07: every control knob off, one stop rule (docs/quality/lean-candidate.md; rejected).
    "lean candidate": {"neighbour_checks": 0, "extend_remember_factor": 1.0, "remember_renoised": 0, "remember_choice": "first", "consolidate_steps": 0,
                       "steps": 150, "extend_until_fixed": 0, "stop_at_r": 0.75},
}
VARIANTS: dict[str, dict] = {"default": {}, **BASELINES, **ABLATIONS}


@dataclass
class Measured:
    """One run's numbers (a row of results.csv). Shares are of the images measured (×16 in the report)."""

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
    r_noise05: float = float("nan")  # r from the target seed's noise perturbed 5 %, which the stop rule never sees
    r_noise10: float = float("nan")
    r_noise15: float = float("nan")
    spill: float = float("nan")  # mean colour change (grey levels) on the painted pixels of the nearest unseen seeds
    judge_before: float = float("nan")  # share of same-prompt seeds the flag judge names right, before
    judge_after: float = float("nan")  # ... and after
    extra: dict = field(default_factory=dict)


def case_surrogate(model: DiffusionModel, case: Case, target: Image.Image) -> Image.Image:
    """The case's correction: a shipped file, a local paint, SDEdit of the target, or a reference photo."""
    if case.surrogate_file:
        return Image.open(ROOT / case.surrogate_file).convert("RGB")
    if case.sdedit_strength is not None:
        return model.sdedit(target, case.prompt, case.sdedit_strength, case.seed, 25, 5.0)
    if case.reference:
        return reference_photo(case.reference).resize(target.size, Image.Resampling.LANCZOS)
    return paint(target, case.edits)


def prepare_case(model: DiffusionModel, case: Case, cache: GenerationCache, folder: Path) -> tuple[Path, Path]:
    """target.png (the model's own output) and surrogate.png of a case; the default job's recorded
    remember trajectories are put in the cache, so every job runs warm, as timed."""
    target = cache.get_or_generate(model, case.prompt, [case.seed], 25, 5.0)[0][0]
    surrogate = case_surrogate(model, case, target)
    warm_remember_cache(model, [EvalTarget(case.prompt, case.seed, target, surrogate)], UnlearnConfig(), cache)
    folder.mkdir(parents=True, exist_ok=True)
    return save_image_atomic(target, folder / "target.png"), save_image_atomic(surrogate, folder / "surrogate.png")


def run_one(model, case, files, variant, overrides, train_seed, cache, judge, out: Path, with_robustness: bool) -> tuple[Measured, dict]:
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
    extra = robustness(model, case, surrogate, config) if with_robustness else {}
    model.remove_lora()
    return Measured(variant, case.name, case.kind, train_seed, seconds=seconds, extra=extra, **numbers), {"target": target, "surrogate": surrogate, "after": after}


def two_target_job(model, cases: list[Case], files: dict, cache, judge, out: Path) -> dict:
    """Two flagged outputs fixed by one job (the paper's Table I, right half)."""
    config = UnlearnConfig(checkpoint_every=0)
    targets = [InstanceTarget(case.prompt, case.seed, str(files[case.name][1]), str(files[case.name][0])) for case in cases]
    model.remove_lora()
    started = time.perf_counter()
    run_unlearning(model, targets, config, out / "two-targets", cache=cache, evaluate_after=False)
    result = {"cases": [case.name for case in cases], "seconds": time.perf_counter() - started}
    for case in cases:
        target, surrogate = (Image.open(f).convert("RGB") for f in files[case.name])
        numbers = measure(model, case, target, surrogate, cache, judge, config)
        numbers.pop("after_target")
        result[case.name] = numbers
    model.remove_lora()
    return result


def machine_speed(model: DiffusionModel) -> float:
    """Seconds for `benchmarks`' generation row (8 images × 25 steps, median of 3) on this run's
    machine, so a reader can scale the job times to the idle machine's."""
    from benchmarks.__main__ import bench_generation

    return bench_generation(model, repeats=3)


def where_it_ran(device: str) -> str:
    """The machine a study's numbers come from: the CPU's threads, or the GPU's name."""
    if device != "cpu" and torch.cuda.is_available():
        return f"a {torch.cuda.get_device_name()} GPU (fp32; r and kept seeds as on the CPU, job times not)"
    return f"this machine ({torch.get_num_threads()} threads)"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names from VARIANTS")
    parser.add_argument("--cases", default=",".join(case.name for case in CASES))
    parser.add_argument("--few-cases", default="chad-40-stripe,italy-77-stripe,japan-61-disc-blue", help="cases of the --few variants")
    parser.add_argument("--few", default="paper preset", help="comma-separated variants (slow baselines) that run on --few-cases only")
    parser.add_argument("--train-seeds", default="0,1,2", help="training seeds of every variant")
    parser.add_argument("--quick", action="store_true", help="default settings only, training seed 0")
    parser.add_argument("--define", default="{}", help='more variants as JSON, e.g. \'{"lr 1e-3": {"learning_rate": 0.001}}\'')
    parser.add_argument("--no-extras", action="store_true", help="skip robustness and the two-target job")
    parser.add_argument("--out", default=str(ROOT / "runs" / "quality"))
    parser.add_argument("--device", default="cpu", help="cpu (the study's machine) | cuda | auto: where the demo model runs, in fp32")
    parser.add_argument("--shared-machine", action="store_true", help="say in the report that other work shared the machine, so job times are not timings")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from --out's results.csv and extras.json")
    parser.add_argument("--merge", default="[]", help='other runs whose rows join this report, as JSON [[results.csv, {variant: name in this report}], ...]; '
                        'variants a run does not name are dropped, e.g. \'[["runs/old/results.csv", {"default": "previous default"}]]\'')
    parser.add_argument("--pictures", default="[]", help='with --report-only: runs whose training seed 0 gives the cases picture, as JSON [[out folder, variant], ...]')
    parser.add_argument("--baseline", default="default", help="the variant every other is paired with in the report")
    parser.add_argument("--findings", default="", help="hand-written prose the report includes (default: docs/quality/findings.md beside docs/QUALITY.md)")
    parser.add_argument("--report", default=str(ROOT / "docs" / "QUALITY.md"))
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    if args.quick:
        args.variants, args.train_seeds = "default", "0"
    VARIANTS.update(json.loads(args.define))
    return args


def read_results(path: Path) -> list[Measured]:
    """The rows of a results.csv, typed as `Measured` (columns an older run lacks stay NaN)."""
    kinds = {f.name: f.type for f in fields(Measured)}
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    typed = lambda k, v: v if kinds[k] == "str" else int(v) if kinds[k] == "int" else float(v)  # noqa: E731
    return [Measured(**{k: typed(k, v) for k, v in row.items() if k in kinds and k != "extra"}) for row in rows]


def write_results(results: list[Measured], path: Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[f.name for f in fields(Measured) if f.name != "extra"])
        writer.writeheader()
        writer.writerows({k: v for k, v in vars(row).items() if k != "extra"} for row in results)


def merged(results: list[Measured], args) -> list[Measured]:
    """This run's rows plus --merge's, renamed (the same cases and training seeds pair up)."""
    rows = list(results)
    for path, names in json.loads(args.merge):
        for row in read_results(Path(path)):
            if row.variant in names:
                row.variant = names[row.variant]
                rows.append(row)
    return rows


def pictures_of_runs(runs: list) -> dict[str, dict]:
    """{case: target, surrogate, after} of training seed 0 of each [out folder, variant], from the files the runs wrote."""
    pictures = {}
    for folder, variant in runs:
        for case in sorted(Path(folder, "cases").iterdir()):
            after = Path(folder, variant.replace(" ", "_"), case.name, "seed0", "after_target.png")
            if after.is_file():
                pictures[case.name] = {name: Image.open(path).convert("RGB") for name, path in (("target", case / "target.png"), ("surrogate", case / "surrogate.png"), ("after", after))}
    return pictures


def main(args) -> list[Measured]:
    from benchmarks import quality_report

    out = Path(args.out)
    if args.report_only:
        extras = json.loads((out / "extras.json").read_text())
        rows = merged(read_results(out / "results.csv"), args)
        extras["argv"] = args.argv  # this report's command, which names the runs it merges
        extras["variants"] = {row.variant: VARIANTS.get(row.variant, extras.get("variants", {}).get(row.variant, {})) for row in rows}
        quality_report.write(rows, extras, pictures_of_runs(json.loads(args.pictures)), Path(args.report), args.baseline, Path(args.findings) if args.findings else None)
        return []
    torch.manual_seed(0)
    started = time.perf_counter()
    cache = GenerationCache(out / "cache")
    model = load_model(DEMO_MODEL, device=args.device, dtype="fp32")  # full precision on every device
    judge = load_classifier(JUDGE)
    chosen = [case for case in CASES if case.name in args.cases.split(",")]
    files = {case.name: prepare_case(model, case, cache, out / "cases" / case.name) for case in chosen}
    results, robust, pictures, loads = [], {}, {}, []
    for variant in args.variants.split(","):
        few = variant in args.few.split(",")
        for case in [c for c in chosen if not few or c.name in args.few_cases.split(",")]:
            for seed in [int(s) for s in args.train_seeds.split(",")]:
                first_default = variant == "default" and seed == 0 and not args.no_extras
                measured, images = run_one(model, case, files[case.name], variant, VARIANTS[variant], seed, cache, judge, out, first_default)
                results.append(measured)
                loads.append(os.getloadavg()[0])
                if measured.extra:
                    robust[case.name] = measured.extra
                if variant == "default" and seed == 0:
                    pictures[case.name] = images
                print(f"{variant:>28} {case.name:>26} seed {seed}: r {measured.r:+.2f} (noise 15 % {measured.r_noise15:+.2f})  same≥0.9 {measured.same_09 * 16:4.1f}/16  "
                      f"other≥0.9 {measured.other_09 * 16:4.1f}/16  spill {measured.spill:4.1f}  {measured.seconds:.0f} s", flush=True)
                write_results(results, out / "results.csv")
    two = None
    if not args.no_extras and "default" in args.variants.split(",") and len(chosen) >= 2:
        two = two_target_job(model, chosen[:2], files, cache, judge, out)
    extras = {"robust": robust, "two": two, "seconds": time.perf_counter() - started, "argv": args.argv, "load": statistics.mean(loads) if loads else None,
              "where": where_it_ran(args.device), "speed": machine_speed(model), "shared_machine": args.shared_machine, "variants": {v: VARIANTS.get(v, {}) for v in args.variants.split(",")}}
    (out / "extras.json").write_text(json.dumps(extras, indent=2))
    quality_report.write(merged(results, args), extras, pictures, Path(args.report))
    print(f"wrote {args.report}, {out / 'results.csv'}")
    return results


if __name__ == "__main__":
    main(parse_args())
