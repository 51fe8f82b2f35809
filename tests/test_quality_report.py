"""The quality study's report: paired differences with bootstrap intervals, the bars, the file."""

import math

from benchmarks.quality import Measured, read_results, write_results
from benchmarks.quality_report import bars_met, interval, paired, write


def _row(variant, case, seed, r, same, seconds=10.0, **more):
    numbers = dict(residual=0.1, probe_r=0.3, target_ssim=0.8, same_095=same, same_mean=0.97, other_09=1.0, other_095=1.0, other_mean=0.98, judge_kept=1.0)
    return Measured(variant, case, "stripe colour", seed, r=r, same_09=same, seconds=seconds, **{**numbers, **more})


def _study():
    rows = []
    for case_index, case in enumerate(("chad-40-stripe", "italy-77-stripe")):
        for seed in range(3):
            r = 0.75 + 0.01 * seed + 0.02 * case_index
            rows.append(_row("default", case, seed, r, 15 / 16, r_noise15=r - 0.1, spill=3.0))
            rows.append(_row("no projection", case, seed, r - 0.05, 14 / 16, seconds=8.0, r_noise15=r - 0.2, spill=4.0))
    return rows


def test_paired_differences_are_means_over_the_same_case_and_seed_with_an_interval_around_them():
    cells = paired(_study(), "no projection")
    assert cells[:2] == ["no projection", "6"]
    delta_r, delta_r15, delta_same, _, delta_spill, delta_seconds = cells[2:]
    assert delta_r == "-0.05" and delta_r15 == "-0.10" and delta_same == "-1.00" and delta_spill == "+1.00" and delta_seconds == "-2.00", cells
    low_high = interval([0.1, -0.3, 0.2, 0.05, -0.1, 0.4]).split("[")[1].rstrip("]").split(", ")
    assert float(low_high[0]) < 0.058 < float(low_high[1])


def test_the_bars_count_runs_that_fix_and_keep_enough_seeds():
    rows = [_row("default", "a", 0, 0.72, 14 / 16), _row("default", "a", 1, 0.69, 16 / 16), _row("default", "a", 2, 0.8, 13 / 16)]
    assert bars_met(rows) == "1/3"


def test_results_round_trip_and_the_report_is_written(tmp_path):
    rows = _study()
    write_results(rows, tmp_path / "results.csv")
    again = read_results(tmp_path / "results.csv")
    assert [(r.variant, r.case, r.train_seed, r.r) for r in again] == [(r.variant, r.case, r.train_seed, r.r) for r in rows]
    assert math.isnan(again[0].judge_before), "a column never measured stays NaN"
    report = tmp_path / "QUALITY.md"
    write(again, {"seconds": 120, "argv": ["--quick"], "variants": {"default": {}, "no projection": {"projection": "none"}}}, {}, report)
    text = report.read_text()
    assert "## The paired ablation" in text and "| no projection | 6 | -0.05 | -0.10 | -1.00 |" in text, "a constant difference has no interval to show"
    assert (tmp_path / "quality" / "pareto.png").is_file()
