"""Releases of 2, 4 and 8 fixes from the suite, two ways: merging the fix adapters (the default of
`hotfix-studio release`) and one joint training job on all the targets.

    python -m benchmarks.releases [--out DIR] [--sizes 2,4,8]

The fixes are the suite's local corrections (`benchmarks.cases.CORRECTIONS`, in order: the first N
for a release of N), each a default job. For each N, both ways are evaluated the same way
(`evaluation.evaluate` with every target: each fix's r and verdict, and the other seeds of every
touched prompt kept at SSIM ≥ 0.9) and timed (merge: the release alone, its fixes being already
made; joint: the whole job). Prints a markdown table; the run folders stay in --out, so a second
call reuses the fixes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks.cases import CORRECTIONS
from benchmarks.quality import prepare_case
from unlearn_core.cache import GenerationCache
from unlearn_core.config import DEMO_MODEL, InstanceTarget, UnlearnConfig
from unlearn_core.evaluation import EvalTarget, evaluate
from unlearn_core.images import load_for_model
from unlearn_core.models import load_model
from unlearn_core.release import make_release
from unlearn_core.run import run_unlearning


def fix_folder(model, case, cache, out: Path) -> Path:
    """The case's default job (made once)."""
    folder = out / "fixes" / case.name
    if (folder / "metrics.json").is_file():
        return folder
    target, surrogate = prepare_case(model, case, cache, out / "cases" / case.name)
    model.remove_lora()
    started = time.perf_counter()
    run_unlearning(model, [InstanceTarget(case.prompt, case.seed, str(surrogate), str(target))], UnlearnConfig(checkpoint_every=0), folder, cache=cache)
    model.remove_lora()
    (folder / "seconds.json").write_text(json.dumps(time.perf_counter() - started))
    return folder


def joint(model, cases, cache, out: Path) -> tuple[dict, float]:
    """One job on every target; its evaluation with all of them."""
    files = [(out / "cases" / case.name / "target.png", out / "cases" / case.name / "surrogate.png") for case in cases]
    model.remove_lora()
    started = time.perf_counter()
    folder = out / f"joint-{len(cases)}"
    config = UnlearnConfig(checkpoint_every=0)
    run_unlearning(model, [InstanceTarget(case.prompt, case.seed, str(s), str(t)) for case, (t, s) in zip(cases, files)], config, folder, cache=cache, evaluate_after=False)
    seconds = time.perf_counter() - started
    targets = [EvalTarget(case.prompt, case.seed, load_for_model(t, model.image_size), load_for_model(s, model.image_size)) for case, (t, s) in zip(cases, files)]
    report, _, _ = evaluate(model, targets, config, cache)
    model.remove_lora()
    return report, seconds


def row(way: str, size: int, rs_alone: list, rs: list, verdicts: list, integrity: dict, seconds: float) -> str:
    fixed = sum(verdict == "fixed" for verdict in verdicts)
    pairs = ", ".join(f"{a:.2f}→{b:.2f}" if a is not None else f"{b:.2f}" for a, b in zip(rs_alone, rs))
    kept = min(row["ssim_at_least_0.9"] for row in integrity.values())
    return f"| {size} | {way} | {fixed}/{size} | {pairs} | {kept}/16 | {seconds:.0f} s |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/releases-study"))
    parser.add_argument("--sizes", default="2,4,8")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    model, cache = load_model(DEMO_MODEL, "auto"), GenerationCache()
    cases = CORRECTIONS[: max(sizes)]
    folders = [fix_folder(model, case, cache, args.out) for case in cases]
    alone = [json.loads((folder / "metrics.json").read_text())["forgetting"]["toward_surrogate"] for folder in folders]
    lines = ["| fixes | way | fixed | r alone → in the release | least other seeds kept, per touched prompt | time |", "|---|---|---|---|---|---|"]
    for size in sizes:
        started = time.perf_counter()
        summary = make_release(folders[:size], args.out / f"merge-{size}", model=model)
        seconds = time.perf_counter() - started
        lines.append(row("merge", size, alone[:size], [f["r_release"] for f in summary["fixes"]], [f["verdict"] for f in summary["fixes"]],
                         {p: {"ssim_at_least_0.9": r["kept"]} for p, r in summary["integrity"].items()}, seconds))
        report, seconds = joint(model, cases[:size], cache, args.out)
        lines.append(row("joint", size, alone[:size], [t["toward_surrogate"]["r"] for t in report["targets"]], [t["toward_surrogate"]["verdict"] for t in report["targets"]],
                         report["integrity"], seconds))
        print("\n".join(lines), flush=True)
    fix_seconds = [json.loads((folder / "seconds.json").read_text()) for folder in folders if (folder / "seconds.json").is_file()]
    if fix_seconds:
        print(f"\nthe fixes alone: {len(fix_seconds)} default jobs, {sum(fix_seconds) / len(fix_seconds):.0f} s each on average")


if __name__ == "__main__":
    main()
