"""docs/QUALITY.md from a quality study's rows: every variant, the default per case, and the paired
ablation (each variant minus the default on the same case and training seed, with a 95 % bootstrap
interval over those pairs). The prose of what was kept and removed, and why, is docs/quality/findings.md,
included as it stands (written by hand from the numbers, not generated)."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import stats

from benchmarks.cases import CORRECTIONS, EDITS
from unlearn_core import metrics
from unlearn_core.images import grid

SHARES = ("same_09", "other_09", "judge_before", "judge_after")  # shown ×16 (of 16 images)
COLUMNS = {  # column → header, for the tables of every variant and of the default per case
    "r": "r (target seed)", "r_noise05": "r, noise 5 %", "r_noise10": "r, noise 10 %", "r_noise15": "r, noise 15 %", "probe_r": "r (denoise probe)",
    "same_09": "same prompt SSIM ≥ 0.9", "other_09": "other prompts SSIM ≥ 0.9", "spill": "spill (grey levels)",
    "judge_before": "judge right, before", "judge_after": "after", "seconds": "job s",
}
PAIRED = {"r": "Δ r", "r_noise15": "Δ r, noise 15 %", "same_09": "Δ same prompt ≥ 0.9 (of 16)", "other_09": "Δ other prompts ≥ 0.9 (of 16)", "spill": "Δ spill", "seconds": "Δ job s"}


def _values(rows, column: str) -> list[float]:
    scale = 16 if column in SHARES else 1
    return [getattr(row, column) * scale for row in rows if not math.isnan(getattr(row, column))]


def mean_spread(values: list[float]) -> str:
    if not values:
        return "—"
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.2f}"


def interval(values: list[float]) -> str:
    """Mean and its 95 % percentile-bootstrap interval (scipy), over cases × training seeds."""
    if not values:
        return "—"
    mean = statistics.fmean(values)
    if len(values) < 3 or max(values) == min(values):
        return f"{mean:+.2f}"
    low, high = stats.bootstrap((np.asarray(values),), np.mean, n_resamples=2000, method="percentile", random_state=0).confidence_interval
    return f"{mean:+.2f} [{low:+.2f}, {high:+.2f}]"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def group_of(case: str) -> str:
    if case in {c.name for c in CORRECTIONS}:
        return "corrections of real errors"
    return "edits against the prompt's concept" if case in {c.name for c in EDITS} else "global surrogates"


def paired(results, variant: str, baseline: str = "default") -> list[str]:
    """The variant minus the baseline on the same case and training seed, per PAIRED column."""
    default = {(r.case, r.train_seed): r for r in results if r.variant == baseline}
    pairs = [(row, default[(row.case, row.train_seed)]) for row in results if row.variant == variant and (row.case, row.train_seed) in default]
    cells = [interval(_values([a for a, _ in pairs], column) and [x - y for x, y in zip(_values([a for a, _ in pairs], column), _values([b for _, b in pairs], column))]) for column in PAIRED]
    return [variant, str(len(pairs)), *cells]


def bars_met(rows) -> str:
    """Runs meeting every bar: r ≥ 0.7, ≥ 14/16 same-prompt and ≥ 15/16 other-prompt seeds at SSIM ≥ 0.9."""
    met = sum(row.r >= metrics.FIXED_AT and row.same_09 * 16 >= 14 and row.other_09 * 16 >= 15 for row in rows)
    return f"{met}/{len(rows)}"


def pareto_plot(results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(10, 5))
    colours = plt.get_cmap("tab20").colors
    for number, variant in enumerate(dict.fromkeys(row.variant for row in results)):
        rows = [row for row in results if row.variant == variant]
        x, y = _values(rows, "same_09"), _values(rows, "r")
        axis.errorbar(statistics.fmean(x), statistics.fmean(y), xerr=statistics.stdev(x) if len(x) > 1 else 0, yerr=statistics.stdev(y) if len(y) > 1 else 0,
                      fmt="osD^vPX*"[number % 8], color=colours[number % len(colours)], capsize=3, label=variant, markersize=9 if variant == "default" else 6)
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
    cells = [image for images in pictures.values() for image in (images["target"], images["surrogate"], images["after"])]
    picture = grid(cells, 3)
    picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST).save(path)


def write(results, extras: dict, pictures: dict, path: Path, baseline: str = "default", findings: Path | None = None) -> None:
    """docs/QUALITY.md (or another report) and its pictures, each variant paired with `baseline`;
    `findings` (default docs/quality/findings.md) is the hand-written prose included."""
    figures = path.parent / "quality" if path.name == "QUALITY.md" else path.parent / f"{path.stem}-figures"
    link = figures.relative_to(path.parent).as_posix()
    pareto_plot(results, figures / "pareto.png")
    if pictures:
        cases_picture(pictures, figures / "cases.png")
    variants = list(dict.fromkeys(row.variant for row in results))
    default = [r for r in results if r.variant == baseline]
    speed = extras.get("speed")
    lines = [
        "# Quality: does the hotfix fix, and what does it cost?", "",
        f"Written by `python -m benchmarks.quality {' '.join(extras.get('argv', []))}`".rstrip() + f" in {extras['seconds'] / 60:.0f} min on {extras.get('where', 'this machine')}. "
        "Every number is mean ± standard deviation over the runs of a row (cases × training seeds); shares are of 16 images. "
        f"r is how far the painted pixels moved toward the surrogate (1 fixed, 0 unchanged; verdict `fixed` at r ≥ {metrics.FIXED_AT}). "
        "The stop rule sees only r of the target seed; r from the seed's noise perturbed 5–15 %, the spill onto the nearest evaluation seeds "
        "and the flag judge are measured where it cannot steer."
        + (f" The machine's speed at the end of the run: the generation row of `python -m benchmarks` took {speed:.2f} s (1.05 s idle), so job times scale with it." if speed else "")
        + (" Other work shared the machine, so job times are not timings." if extras.get("shared_machine") else ""), "",
    ]
    findings = findings or path.parent / "quality" / "findings.md"
    if findings.is_file():
        lines += [findings.read_text().strip(), ""]
    lines += [
        f"## The paired ablation: each variant minus the {baseline} (same case and training seed; mean [95 % bootstrap interval])", "",
        table(["variant", "pairs", *PAIRED.values()], [paired(results, variant, baseline) for variant in variants if variant != baseline]), "",
        "## Every variant on the suite", "",
        table(["variant", "runs", "meets every bar", *COLUMNS.values()], [[v, str(len(rows)), bars_met(rows), *[mean_spread(_values(rows, c)) for c in COLUMNS]] for v in variants if (rows := [r for r in results if r.variant == v])]), "",
        f"![forgetting against integrity]({link}/pareto.png)", "",
        f"## {baseline[0].upper() + baseline[1:]}, per case", "",
        table(["case", "kind", "meets every bar", *COLUMNS.values()],
              [[case, next(r.kind for r in default if r.case == case), bars_met(rows), *[mean_spread(_values(rows, c)) for c in COLUMNS]] for case in dict.fromkeys(r.case for r in default) if (rows := [r for r in default if r.case == case])]
              + [[f"**all {group}**", "", bars_met(rows), *[mean_spread(_values(rows, c)) for c in COLUMNS]] for group in ("corrections of real errors", "edits against the prompt's concept", "global surrogates") if (rows := [r for r in default if group_of(r.case) == group])]), "",
        f"![target | surrogate | after, {baseline}, training seed 0]({link}/cases.png)", "",
    ]
    if extras.get("robust"):
        checks = list(next(iter(extras["robust"].values())))
        lines += ["## Paraphrased prompts (default, training seed 0; r against the base model's image for that prompt)", "",
                  table(["case", *checks], [[case, *[f"{values[c]:.2f}" for c in checks]] for case, values in extras["robust"].items()]), ""]
    if extras.get("two"):
        two = extras["two"]
        lines += ["## Two targets in one job (default settings)", "", table(["case", "r", "same ≥ 0.9", "other ≥ 0.9"], [[name, f"{two[name]['r']:.2f}", f"{two[name]['same_09'] * 16:.0f}/16", f"{two[name]['other_09'] * 16:.0f}/16"] for name in two["cases"]]), f"\nJob: {two['seconds']:.0f} s.", ""]
    settings = extras.get("variants", {})
    lines += ["## Settings of each variant", "", table(["variant", "changes from the default"], [[v, json.dumps(settings[v], ensure_ascii=False) if settings.get(v) else "—"] for v in variants]), ""]
    path.write_text("\n".join(lines))
