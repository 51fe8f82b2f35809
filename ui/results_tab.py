"""Results: the verdict (did the fix work?), the before/after grid on the same seeds, forgetting and integrity metrics."""

from __future__ import annotations

import gradio as gr
import pandas as pd

from ui.common import INTERNAL, Services, job_choices, loss_frame
from unlearn_core.store import progress

COLUMNS = ["comparison", "SSCD", "LPIPS", "SSIM", "PSNR", "reading"]


def _value(scores: dict, name: str):
    result = scores.get(name) or {}
    return round(result["value"], 4) if result.get("available") and result.get("value") is not None else "n/a"


def metrics_frame(report: dict) -> pd.DataFrame:
    """One row per comparison; SSCD / LPIPS only where their networks computed them."""
    threshold = report.get("sscd_threshold", 0.4)
    rows = []
    for target in report.get("targets", []):
        label = f"target seed {target['seed']}"
        for key, text in (("after_vs_target", "after vs target (forgetting)"), ("after_vs_surrogate", "after vs surrogate"),
                          ("denoise_probe_before_vs_target", "denoise probe, before"), ("denoise_probe_after_vs_target", "denoise probe, after")):
            scores = target[key]
            reading = ""
            if key == "after_vs_target":
                if target.get("forgotten") is None:
                    reading = "SSCD unavailable: judge by the grid and SSIM"
                else:
                    reading = f"{'forgotten' if target['forgotten'] else 'NOT forgotten'} (SSCD {'<' if target['forgotten'] else '≥'} {threshold})"
            rows.append([f"{label}: {text}", *(_value(scores, n) for n in ("sscd", "lpips", "ssim", "psnr")), reading])
        for key, text in (("toward_surrogate", "painted pixels toward the surrogate (r)"), ("denoise_probe_toward_surrogate", "denoise probe toward the surrogate (r)")):
            moved = target.get(key) or {}
            if moved.get("r") is not None:
                rows.append([f"{label}: {text}", "", "", "", "", f"r = {moved['r']:.2f} ({moved['verdict']}), residual {moved['residual']:.2f}"])
    for prompt, scores in report.get("integrity", {}).items():
        seeds = scores.get("seeds", [])
        reading = f"{scores.get('ssim_at_least_0.9', 0)}/{len(seeds)} seeds with SSIM ≥ 0.9"
        rows.append([f"integrity: {prompt!r}, before vs after on {len(seeds)} other seeds", *(_value(scores, n) for n in ("sscd", "lpips", "ssim", "psnr")), reading])
    return pd.DataFrame(rows, columns=COLUMNS)


ADVICE = {
    "partly fixed": "Run it again with more steps or a higher learning rate (Settings); a larger change on the target also risks more change on other seeds, so check the grid.",
    "not fixed": "Check that the surrogate differs where the error is (r measures only the pixels you painted); then run it again with more steps or a higher learning rate.",
}


def verdict_markdown(report: dict) -> str:
    """The operator's answer in large text: did the fix work, the number behind it, and what next."""
    forgetting = report.get("forgetting")
    if not forgetting:
        return ""
    r = forgetting.get("toward_surrogate")
    if r is None:
        return "### No verdict\nThe surrogate equals the target, so nothing was painted to measure."
    verdict = forgetting["verdict"]
    lines = [
        f"## {verdict.capitalize()}",
        f"On the target seed (seed {forgetting.get('worst_target_seed')}), the pixels you painted moved **{r:.0%}** of the way to the surrogate "
        f"(fixed at ≥ {forgetting.get('fixed_at', 0.7):.0%}; 0 % = unchanged). Denoise probe: {forgetting.get('denoise_probe_toward_surrogate') or 0:.0%}.",
    ]
    if forgetting.get("rest_changed"):
        lines.append(f"**Careful:** the pixels you did not paint changed too (mean {forgetting['unpainted_change']:.0%}): check the image below before you use this adapter.")
    kept = [f"{scores.get('ssim_at_least_0.9', 0)}/{len(scores.get('seeds', []))} of {prompt!r}" for prompt, scores in report.get("integrity", {}).items()]
    if kept:
        lines.append("Other images kept (SSIM ≥ 0.9 before/after on the same seeds): " + ", ".join(kept) + ".")
    if verdict in ADVICE:
        lines.append(ADVICE[verdict])
    return "\n\n".join(lines)


def availability_markdown(report: dict) -> str:
    lines = ["**Metrics on this server**"]
    for name, info in report.get("availability", {}).items():
        lines.append(f"- {name}: available" if info.get("available") else f"- {name}: unavailable: {info.get('reason', '')}")
    return "\n".join(lines)


def render(services: Services, tab: gr.Tab) -> None:
    store = services.store
    with gr.Row():
        job = gr.Dropdown([], label="Job", allow_custom_value=True, elem_id="res-job", scale=4)
        refresh = gr.Button("Refresh list", elem_id="res-refresh", scale=1)
    summary = gr.Markdown("Pick a finished job.", elem_id="res-summary")
    verdict = gr.Markdown("", elem_id="res-verdict")
    grid = gr.Image(label="Before (top) / after (bottom): target seed first, then other seeds", type="filepath", interactive=False, format="png", elem_id="res-grid")
    table = gr.Dataframe(pd.DataFrame(columns=COLUMNS), label="Metrics", interactive=False, wrap=True, elem_id="res-metrics")
    availability = gr.Markdown("", elem_id="res-availability")
    curves = gr.LinePlot(loss_frame(None), x="step", y="loss", color="curve", title="Losses", height=240, elem_id="res-curves")

    def choices(current):
        options = job_choices(store)
        ids = [value for _, value in options]
        done = [job.id for job in store.list() if job.state == "done"]
        value = current if current in ids else (done[0] if done else (ids[0] if ids else None))
        return gr.update(choices=options, value=value)

    def show(job_id):
        found = store.get(job_id or "")
        if found is None:
            return "Pick a finished job.", "", None, pd.DataFrame(columns=COLUMNS), "", loss_frame(None)
        folder = found.folder
        info = progress(found)
        picture = folder.picture
        report = folder.read_metrics() or {}
        text = f"**Job `{found.id}`** — {found.state}, step {info['step']}/{info['total']}"
        if not report:
            text += " · no metrics yet (they are written when the job finishes)."
        else:
            timing = report.get("timing", {})
            text += f" · conflict rate {timing.get('conflict_rate', 0):.0%} · {timing.get('seconds_total', 0):.0f} s in all"
        return text, verdict_markdown(report), str(picture) if picture.is_file() else None, metrics_frame(report), availability_markdown(report), loss_frame(found.run_dir)

    outputs = [summary, verdict, grid, table, availability, curves]
    refresh.click(choices, [job], [job], **INTERNAL).then(show, [job], outputs, **INTERNAL)
    tab.select(choices, [job], [job], **INTERNAL).then(show, [job], outputs, **INTERNAL)
    job.input(show, [job], outputs, **INTERNAL)
