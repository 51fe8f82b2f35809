"""Results: the verdict (did the fix work?), target / surrogate / after side by side, a before/after
slider, the integrity grid of every evaluated seed (worst first), the metrics, and one click to
re-run a fix that did not take with the 'strong' preset."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import pandas as pd
from PIL import Image

from ui.common import INTERNAL, OPERATOR_ERRORS, Services, anonymous_address, check_may_train, fail, job_choices, loss_frame, loss_plot, owner_of, served_copies
from unlearn_core.config import PRESETS, UnlearnConfig
from unlearn_core.errors import DamagedRunFile
from unlearn_core.images import open_image
from unlearn_core.store import progress

DISPLAY_SIDE = 256  # the 64 px demo images, enlarged with nearest-neighbour so their pixels stay sharp
STRONGER = "strong"
KEPT_SSIM = 0.9

COLUMNS = ["comparison", "SSCD", "LPIPS", "SSIM", "PSNR", "reading"]


def consolidation_note(timing: dict, trained: int) -> str:
    """How the run ended once the target was fixed: the steps consolidating the other seeds, and
    which step's weights were saved when the last ones no longer fixed the target."""
    since = timing.get("consolidated_from_step")
    if not since:
        return ""
    kept = timing.get("weights_of_step") or trained
    note = f" (fixed at step {since}, then {trained - since} steps pulling the other seeds back"
    return note + (f"; the last ones lost the fix, so the weights of step {kept} are saved)" if kept != trained else ")")


def neighbours_note(timing: dict) -> str:
    """What the neighbour checks did to the remember loss: lightened while the target's nearest
    other seeds stayed untouched, restored when they began to change."""
    checks = timing.get("neighbour_checks") or []
    if not checks:
        return ""
    scale, last = timing.get("remember_scale", 1.0), checks[-1]
    weight = f"lightened to {scale:.0%}" if scale < 1.0 else "kept at full weight"
    return f" · remember loss {weight} (the target's nearest other seeds: least SSIM {last['least_ssim']:.2f} at the last check, step {last['step']})"


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
        for key, text in (("toward_surrogate", "painted pixels toward the surrogate"), ("denoise_probe_toward_surrogate", "denoise probe toward the surrogate")):
            moved = target.get(key) or {}
            if moved.get("r") is not None:
                reading = (f"{moved['r']:.0%} of the way: {moved['verdict']}" if key == "toward_surrogate"
                           else f"{moved['r']:.0%} of the way (a stricter test, not the verdict: the target re-noised halfway, then denoised)")
                rows.append([f"{label}: {text}", "", "", "", "", reading])
    for prompt, scores in report.get("integrity", {}).items():
        seeds = scores.get("seeds", [])
        reading = f"{scores.get('ssim_at_least_0.9', 0)}/{len(seeds)} seeds with SSIM ≥ 0.9"
        rows.append([f"integrity: {prompt!r}, before vs after on {len(seeds)} other seeds", *(_value(scores, n) for n in ("sscd", "lpips", "ssim", "psnr")), reading])
    frame = pd.DataFrame(rows, columns=COLUMNS)
    unmeasured = [name for name in ("SSCD", "LPIPS") if frame[name].isin(["n/a", ""]).all()]  # no network: the availability note says why, once
    return frame.drop(columns=unmeasured)


ADVICE = {
    "partly fixed": f"Try the **'{STRONGER}'** preset (the button below: more steps, a higher learning rate); it also changes other seeds more, so check the integrity grid.",
    "not fixed": f"Check that the surrogate differs where the error is (r measures only the pixels you painted); then try the **'{STRONGER}'** preset (the button below).",
}


def changed_seeds(report: dict) -> list[str]:
    """Per integrity prompt, the seeds whose before/after SSIM fell below 0.9, worst first."""
    lines = []
    for prompt, scores in report.get("integrity", {}).items():
        pairs = sorted(zip(scores.get("seeds", []), (scores.get("ssim") or {}).get("per_pair") or []), key=lambda pair: pair[1])
        changed = [f"{seed} (SSIM {value:.2f})" for seed, value in pairs if value < KEPT_SSIM]
        if changed:
            lines.append(f"{prompt!r}: seed{'s' if len(changed) > 1 else ''} " + ", ".join(changed))
    return lines


def your_seeds_kept(report: dict) -> str:
    """How many of the seeds the operator generated (the Generate grid) kept their image."""
    for prompt, scores in report.get("integrity", {}).items():
        yours = set(scores.get("your_seeds") or [])
        if yours:
            values = [value for seed, value in zip(scores["seeds"], scores["ssim"]["per_pair"]) if seed in yours]
            return f"**{sum(v >= KEPT_SSIM for v in values)}/{len(values)} of the seeds you generated** ({', '.join(map(str, sorted(yours)))})"
    return ""


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
        f"(fixed at ≥ {forgetting.get('fixed_at', 0.7):.0%}; 0 % = unchanged).",
    ]
    if forgetting.get("rest_changed"):
        lines.append(f"**Careful:** the pixels you did not paint changed too (mean {forgetting['unpainted_change']:.0%}): check the image below before you use this adapter.")
    kept = [f"{scores.get('ssim_at_least_0.9', 0)}/{len(scores.get('seeds', []))} of {prompt!r}" for prompt, scores in report.get("integrity", {}).items()]
    yours = your_seeds_kept(report)
    if yours:
        kept.insert(0, yours)
    if kept:
        lines.append("Other images kept (SSIM ≥ 0.9 before/after on the same seeds): " + ", ".join(kept) + ".")
        changed = changed_seeds(report)
        lines.append("Changed visibly: " + "; ".join(changed) + " (first in the grid below)." if changed else "No other seed changed visibly.")
    if verdict in ADVICE:
        lines.append(ADVICE[verdict])
    return "\n\n".join(lines)


def availability_markdown(report: dict) -> str:
    lines = ["**Metrics on this server**"]
    for name, info in report.get("availability", {}).items():
        lines.append(f"- {name}: available" if info.get("available") else f"- {name}: unavailable: {info.get('reason', '')}")
    return "\n".join(lines)


def enlarged(path: Path, damaged: list[str] | None = None) -> Image.Image | None:
    """A run's image, enlarged by a whole factor to about DISPLAY_SIDE pixels (nearest-neighbour);
    None (its name added to `damaged`) for one that cannot be read."""
    if not path.is_file():
        return None
    try:
        image = open_image(path, path.name)
    except OPERATOR_ERRORS:
        if damaged is not None:
            damaged.append(path.name)
        return None
    factor = max(1, DISPLAY_SIDE // max(image.size))
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def render(services: Services, tab: gr.Tab) -> None:
    store = services.store
    with gr.Row():
        job = gr.Dropdown([], label="Job", allow_custom_value=True, elem_id="res-job", scale=4)
        refresh = gr.Button("Refresh list", elem_id="res-refresh", scale=1)
    summary = gr.Markdown("Pick a finished job.", elem_id="res-summary")
    verdict = gr.Markdown("", elem_id="res-verdict")
    with gr.Row():
        rerun = gr.Button(f"Re-run with the '{STRONGER}' preset", variant="primary", visible=False, elem_id="res-rerun", scale=1)
        rerun_note = gr.Markdown("", elem_id="res-rerun-note")
    with gr.Row(equal_height=True):
        shown = {"height": DISPLAY_SIDE + 40, "type": "pil", "format": "png", "interactive": False}
        target_image = gr.Image(label="Target: the flagged output", elem_id="res-target", **shown)
        surrogate_image = gr.Image(label="Surrogate: what you asked for", elem_id="res-surrogate", **shown)
        after_image = gr.Image(label="After: the same seed with the adapter", elem_id="res-after", **shown)
        slider = gr.ImageSlider(label="Target ↔ after (drag)", type="pil", format="png", interactive=False, max_height=DISPLAY_SIDE + 40, elem_id="res-slider")
    gr.Markdown("**Integrity grid**: before over after on the same seeds (same initial noise). The target seed comes first, then every "
                "other evaluated seed, worst SSIM first: a green frame means kept (SSIM ≥ 0.9), a red one changed.")
    grid = gr.Image(show_label=False, type="filepath", interactive=False, format="png", elem_id="res-grid")  # a label would cover the grid's heading
    table = gr.Dataframe(pd.DataFrame(columns=COLUMNS), label="Metrics", interactive=False, wrap=True, elem_id="res-metrics")
    availability = gr.Markdown("", elem_id="res-availability")
    curves = gr.LinePlot(loss_frame(None), x="step", y="loss", color="curve", title="Losses", height=240, elem_id="res-curves")

    def choices(current, request: gr.Request, profile: gr.OAuthProfile | None):
        owner = owner_of(request, profile)
        options = job_choices(store, owner)
        ids = [value for _, value in options]
        done = [job.id for job in store.list(owner=owner) if job.state == "done"]
        value = current if current in ids else (done[0] if done else (ids[0] if ids else None))
        return gr.update(choices=options, value=value)

    def show(job_id, request: gr.Request, profile: gr.OAuthProfile | None):
        found = store.get(job_id or "", owner_of(request, profile))
        if found is None:
            return "Pick a finished job.", "", gr.update(visible=False), "", None, None, None, None, None, pd.DataFrame(columns=COLUMNS), "", loss_frame(None)
        folder = found.folder
        info = progress(found)
        picture = folder.picture
        notes = []
        try:
            report = folder.read_metrics() or {}
        except DamagedRunFile as error:
            report = {}
            notes.append(str(error))
        if info.get("damaged"):
            notes.append(info["damaged"])
        timing = report.get("timing", {})
        trained = int(timing["steps_run"]) if timing.get("steps_run") is not None else info["step"]
        text = f"**Job `{found.id}`** — {found.state}, trained {trained} of up to {info['total']} steps{consolidation_note(timing, trained)}{neighbours_note(timing)}"
        if not report and not notes:
            text += " · no metrics yet (they are written when the job finishes)."
        else:
            text += f" · conflict rate {timing.get('conflict_rate', 0):.0%} · {timing.get('seconds_total', 0):.0f} s in all"
        if info.get("ran_on"):
            text += f" · ran on {info['ran_on']}"
        forgetting = report.get("forgetting") or {}
        retry = bool(forgetting) and forgetting.get("verdict") != "fixed"
        unreadable: list[str] = []
        target, after = enlarged(folder.training_image("target", 0), unreadable), enlarged(folder.after_image(0), unreadable)
        surrogate = enlarged(folder.training_image("surrogate", 0), unreadable)
        if unreadable:
            notes.append(f"{', '.join(unreadable)} of this run {'is' if len(unreadable) == 1 else 'are'} damaged: not shown")
        text += "".join(f"\n\n⚠ {note}" for note in notes)
        pair = (target, after) if target is not None and after is not None else None
        return (text, verdict_markdown(report), gr.update(visible=retry), "", target, surrogate, after, pair,
                served_copies([picture])[0] if picture.is_file() else None, metrics_frame(report), availability_markdown(report), loss_plot(found.run_dir, trained))

    def rerun_stronger(job_id, request: gr.Request, profile: gr.OAuthProfile | None):
        """The same targets and settings with the stronger preset's values on top, as a new job."""
        try:
            check_may_train(request, profile)
            found = store.require(job_id or "", owner_of(request, profile))
            config = UnlearnConfig.from_dict({**found.config, **PRESETS[STRONGER]})
            instances = [{"prompt": t["prompt"], "seed": t["seed"], "surrogate": open_image(store.resolve_path(t["surrogate_path"]), "surrogate"),
                          "target": open_image(store.resolve_path(t["target_path"]), "target") if t.get("target_path") else None} for t in found.targets]
            queued = store.create(found.model, config, instances, owner=found.owner, address=anonymous_address(request, profile))
        except OPERATOR_ERRORS as error:
            raise fail(error) from None
        services.worker.wake()
        gr.Info(f"job {queued.id} queued with the '{STRONGER}' preset")
        return (f"Queued job `{queued.id}` with the '{STRONGER}' preset ({config.steps} steps at most, learning rate {config.learning_rate:g}, stops at "
                f"{config.stop_at_r:.0%}). Follow it on the **Unlearn** tab (its row in the job table); pick it here when it is done.")

    outputs = [summary, verdict, rerun, rerun_note, target_image, surrogate_image, after_image, slider, grid, table, availability, curves]
    refresh.click(choices, [job], [job], **INTERNAL).then(show, [job], outputs, **INTERNAL)
    tab.select(choices, [job], [job], **INTERNAL).then(show, [job], outputs, **INTERNAL)
    job.input(show, [job], outputs, **INTERNAL)
    rerun.click(rerun_stronger, [job], [rerun_note], **INTERNAL)
