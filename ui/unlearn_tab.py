"""Unlearn: a preset and the few settings that change the result up front, the rest in "Advanced"
(all generated from `UnlearnConfig`'s field metadata), a job queue, live progress by phase."""

from __future__ import annotations

import json
import time
from dataclasses import MISSING, fields

import gradio as gr
import pandas as pd

from ui.common import INTERNAL, JOB_COLUMNS, OPERATOR_ERRORS, PIXELS, Services, anonymous_address, check_may_train, fail, identity_of, image_input, job_table, loss_frame, loss_plot, owner_of, pretty
from unlearn_core import settings
from unlearn_core.config import DEMO_MODEL, PRESET_DESCRIPTIONS, PRESETS, UnlearnConfig, check_seed, parse_seeds
from unlearn_core.errors import DamagedRunFile, InvalidInput, NotReady
from unlearn_core.images import open_image
from unlearn_core.metrics import FIXED_AT
from unlearn_core.models import check_web_model
from unlearn_core.store import RESUMABLE, progress
from unlearn_core.surrogate import surrogate_reach

LIST_FIELDS = ("remember_prompts", "eval_prompts")
SEED_FIELDS = ("review_seeds",)  # typed like the Generate tab's seeds: "36-43", "1,5,9"
# A server folder is not something a browser user may name; full fine-tuning is for benchmarks
# (both stay settable through the API's config JSON and the CLI).
WEB_EXCLUDED = ("remember_dir", "full_finetune")
POLL_S = 2.0
DEFAULT_PRESET = "balanced"
PHASES = ("preparing", "remember set", "training", "evaluating")
PHASE_OF = {"loading": "preparing"}  # the job process reports loading the model before preparing
CANCELLABLE = ("queued", "running")
PLAIN_LABELS = {  # the settings on the form's front, in words; the rest keep their config names (the API's and the CLI's)
    "steps": "planned steps", "stop_at_r": "stop once the flagged seed has moved this far (share of the way)",
    "remember_prompts": "other prompts to keep", "review_seeds": "your seeds to check after the job", "learning_rate": "learning rate",
}
CONFLICT_INFO = ("*Pulled apart: the share of steps where forgetting the target and remembering everything else pulled "
                 "the weights in opposite directions (negative cosine). A high share is normal for a local fix; with projection on, "
                 "the forget step is projected so that it does not undo the remember step.*")


def _default(spec):
    return spec.default_factory() if spec.default is MISSING else spec.default


def form_fields() -> list:
    return [spec for spec in fields(UnlearnConfig) if spec.name not in WEB_EXCLUDED]


def shown_for(spec, method: str) -> bool:
    """A method's own settings (metadata "method") are shown only while that method is chosen."""
    return spec.metadata.get("method") in (None, method)


def component_for(spec) -> gr.components.Component:
    """One form component per config field, from its type and metadata."""
    meta, label, value = spec.metadata, PLAIN_LABELS.get(spec.name, spec.name.replace("_", " ")), _default(spec)
    common = {"label": label, "info": meta.get("help"), "elem_id": f"cfg-{spec.name.replace('_', '-')}", "visible": shown_for(spec, UnlearnConfig.method)}
    if "choices" in meta:
        return gr.Dropdown(list(meta["choices"]), value=value, **common)
    if spec.type in ("bool", bool):
        return gr.Checkbox(value=value, **common)
    if spec.name in LIST_FIELDS:
        return gr.Textbox("\n".join(value), lines=2, placeholder="one prompt per line", **common)
    if spec.name in SEED_FIELDS:
        return gr.Textbox(seeds_text(value), placeholder="e.g. 36-43 (filled in when you flag a target)", **common)
    precision = 0 if spec.type in ("int", int) else None
    return gr.Number(value, minimum=meta.get("min"), maximum=meta.get("max"), precision=precision, **common)


def seeds_text(seeds: list[int]) -> str:
    return ", ".join(str(seed) for seed in seeds)


def form_value(spec, value):
    """A config value as its form component shows it."""
    if spec.name in LIST_FIELDS:
        return "\n".join(value)
    return seeds_text(value) if spec.name in SEED_FIELDS else value


def values_to_config(values: list) -> UnlearnConfig:
    data = {}
    for spec, value in zip(form_fields(), values):
        if spec.name in LIST_FIELDS:
            value = [line.strip() for line in (value or "").splitlines() if line.strip()]
        elif spec.name in SEED_FIELDS:
            value = parse_seeds(value or "")
        elif value is None:
            raise InvalidInput(f"{spec.name.replace('_', ' ')} is empty")
        elif spec.type in ("int", int):
            value = int(value)
        elif spec.type in ("float", float):
            value = float(value)
        data[spec.name] = value
    return UnlearnConfig.from_dict(data)


def config_from_json(text: str | None) -> UnlearnConfig:
    """A JSON object of config fields (missing ones take the defaults; "preset" applies one first)."""
    try:
        data = json.loads(text) if text and text.strip() else {}
    except json.JSONDecodeError as error:
        raise InvalidInput(f"config is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise InvalidInput("config must be a JSON object of settings")
    if data.get("remember_dir"):
        raise InvalidInput("remember_dir is not accepted from the web app; use the CLI for a folder of remember images")
    return UnlearnConfig.from_preset(data.pop("preset", DEFAULT_PRESET), **data)


def describe_preset(name: str) -> str:
    return f"**{name}**: {PRESET_DESCRIPTIONS.get(name, '')}"


def images_count(done: int, total: int, elapsed: float | None) -> str:
    """The remember set's progress: images sampled of those it needs, and the time left at the rate so far."""
    left = f", about {elapsed * (total - done) / done:.0f} s left" if elapsed and done else ""
    return f"{done} of {total} images of other seeds sampled{left}"


def phase_line(info: dict, elapsed: float | None = None) -> str:
    """preparing → remember set → training → evaluating, with the current phase's own progress."""
    state, step, total = info["state"], info["step"], info["total"]
    if state == "queued":
        return "queued: waiting for the worker (one job runs at a time)"
    phase = PHASE_OF.get(info.get("phase"), info.get("phase"))
    if state == "running" and phase not in PHASES:  # claimed, the job process not yet reporting
        phase = "preparing"
    current = len(PHASES) if state == "done" else PHASES.index(phase) if state == "running" and phase in PHASES else None
    if current is None:  # failed, cancelled, interrupted: where it stopped is the training step
        return f"stopped ({state}) at training step {step}/{total}"
    finished = current > PHASES.index("training")
    trained = f" {step} of up to {total} steps" + (" (stopped early: the target was fixed)" if finished and 0 < step < total else "" if finished else "; stops early once fixed")
    parts = []
    for index, name in enumerate(PHASES):
        detail = trained if name == "training" and index <= current else ""
        if index < current:
            parts.append(f"✓ {name}{detail}")
        elif index == current:
            if name == "training" and info.get("eta_s") is not None:
                detail += f", at most {info['eta_s']:.0f} s more"
            elif name != "training":
                doing = {"loading": "loading the model", "preparing": "the target and surrogate", "remember set": "what to keep: other seeds and prompts",
                         "evaluating": "the after images and metrics"}.get(info.get("phase"), "starting")
                clock = f"{elapsed:.0f} s so far" if elapsed is not None else ""
                if name == "remember set" and info.get("images_total"):
                    doing = images_count(info["images_done"], info["images_total"], elapsed)
                detail = f" ({', '.join(text for text in (doing, clock) if text)})" if doing or clock else ""
            parts.append(f"**▶ {name}{detail}**")
        else:
            parts.append(name)
    return " → ".join(parts)


def progress_markdown(info: dict | None, elapsed: float | None = None) -> str:
    """The job's phase line, its training numbers, and what they mean; `elapsed`: seconds in the
    current phase (preparing, remember set and evaluating report no steps)."""
    if not info:
        return "No job yet: flag a target, make a surrogate, then press **Start unlearning**."
    parts = [f"**Job `{info['id']}`** — {info['state']}", phase_line(info, elapsed)]
    if info.get("loss_forget") is not None:
        parts.append(f"{info['seconds_per_step']:.2f} s a step · forget loss {info['loss_forget']:.4f} · remember loss {info['loss_remember']:.4f} · "
                     f"the two pulled apart on {info['conflict_rate']:.0%} of the steps")
    if info.get("final_r") is not None:
        saved = f" (the weights of step {info['weights_of_step']}, the ones saved)" if info.get("weights_of_step") not in (None, info["step"]) else ""
        parts.append(f"the flagged seed moved {info['final_r']:.0%} of the way to the surrogate{saved}: **{info['verdict']}**")
    elif info.get("toward_surrogate") is not None:
        stop = f" (it stops once {info['stop_at_r']:.0%} of the way, or {FIXED_AT:.0%} after the planned steps)" if info.get("stop_at_r") else ""
        parts.append(f"the flagged seed is now {info['toward_surrogate']:.0%} of the way to the surrogate{stop}")
    if info.get("error"):
        parts.append(f"⚠ {info['error']}")
    if info.get("damaged"):
        parts.append(f"⚠ {info['damaged']}")
    if info["state"] == "done":
        parts.append("Done — see **Results** and **Adapters**.")
    if info.get("conflict_rate") is not None:
        parts.append(CONFLICT_INFO)
    return "  \n".join(parts)


def render(services: Services, model_state: gr.State, target_state: gr.State, surrogate_state: gr.State) -> None:
    store = services.store
    with gr.Row():
        prompt = gr.Textbox(label="Target prompt", elem_id="unl-prompt")
        seed = gr.Number(label="Target seed", precision=0, minimum=0, elem_id="unl-seed")
        target = image_input("Target: the flagged image (optional)", height=224, width=224, format="png", elem_classes=PIXELS, elem_id="unl-target")
        surrogate = image_input("Surrogate: the corrected image", height=224, width=224, format="png", elem_classes=PIXELS, elem_id="unl-surrogate")
    surrogate_in_use = gr.Markdown("", elem_id="unl-surrogate-in-use")
    gr.Markdown("*Flagging a target on the first tab fills these in; without a target image the job regenerates it from the prompt and seed.*")
    with gr.Row(equal_height=True):
        preset = gr.Radio(list(PRESET_DESCRIPTIONS), value=DEFAULT_PRESET, label="Preset", elem_id="unl-preset", scale=1)
        with gr.Column(scale=2):
            preset_info = gr.Markdown(describe_preset(DEFAULT_PRESET), elem_id="unl-preset-info")
    specs = form_fields()
    basic = [spec for spec in specs if spec.metadata.get("level") == "basic"]
    built = {}
    with gr.Row(elem_id="unl-basic"):  # the settings that change the result
        for spec in basic:
            if spec.name not in LIST_FIELDS:
                built[spec.name] = component_for(spec)
    for spec in basic:
        if spec.name in LIST_FIELDS:
            built[spec.name] = component_for(spec)
    with gr.Accordion("Advanced", open=False, elem_id="unl-advanced"):
        with gr.Row():
            columns = [gr.Column(), gr.Column(), gr.Column()]
        for index, spec in enumerate(spec for spec in specs if spec.name not in built):
            with columns[index % 3]:
                built[spec.name] = component_for(spec)
    components = [built[spec.name] for spec in specs]  # in field order: values_to_config reads them so
    method_specific = [(built[spec.name], spec) for spec in specs if "method" in spec.metadata]
    with gr.Accordion("Settings as JSON (what the API takes)", open=False):
        config_json = gr.Code(pretty(UnlearnConfig().to_dict()), language="json", label="config", elem_id="unl-config")
    with gr.Row():
        start = gr.Button("Start unlearning", variant="primary", elem_id="unl-start")
        cancel = gr.Button("Cancel", variant="stop", interactive=False, elem_id="unl-cancel")  # enabled by the poll when they apply
        resume = gr.Button("Resume", interactive=False, elem_id="unl-resume")
    if settings.current().requires_sign_in:
        gr.Markdown("Training on this server needs a sign-in: sign in first (anyone may generate and make surrogates).", elem_id="unl-sign-in-note")
    with gr.Row():
        job_id = gr.Textbox(label="Job", placeholder="job id (or click a row of the table)", elem_id="unl-job-id", scale=3)
        refresh = gr.Button("Status", elem_id="unl-refresh", scale=1)
    progress_text = gr.Markdown(progress_markdown(None), elem_id="unl-progress")
    curves = gr.LinePlot(loss_frame(None), x="step", y="loss", color="curve", title="Losses", height=260, elem_id="unl-curves")
    with gr.Accordion("Details (the job's raw status)", open=False, elem_id="unl-details"):
        status_json = gr.JSON(label="Job status", elem_id="unl-status")
    table = gr.Dataframe(pd.DataFrame(columns=JOB_COLUMNS), label="Jobs", interactive=False, elem_id="job-table")  # filled per caller by the poll timer
    timer = gr.Timer(POLL_S)
    shown = gr.State("")  # what the curve shows now ("job:step"), to skip redrawing an unchanged plot

    def apply_preset(name):
        values = UnlearnConfig.from_preset(name if name in PRESETS else DEFAULT_PRESET).to_dict()
        return [describe_preset(name), *(form_value(s, values[s.name]) for s in specs)]

    def show_method_fields(method):
        return [gr.update(visible=shown_for(spec, method)) for _, spec in method_specific]

    def form_to_json(*values):
        try:
            return pretty(values_to_config(list(values)).to_dict())
        except OPERATOR_ERRORS as error:
            raise fail(error) from None

    def start_job(prompt_text, seed_value, surrogate_image, target_image, config_text, model_id, request: gr.Request, profile: gr.OAuthProfile | None):
        try:
            check_may_train(request, profile)
            if surrogate_image is None:
                raise NotReady("no surrogate: make one in the Surrogate tab (or pass a surrogate image)")
            if seed_value is None:
                raise InvalidInput("the target seed is empty: flag a target or type its seed")
            config = config_from_json(config_text)
            check_web_model((model_id or DEMO_MODEL).strip())  # refuses what the web may not load, before anything is written
            instance = {"prompt": prompt_text or "", "seed": check_seed(seed_value, "target seed"), "surrogate": open_image(surrogate_image, "surrogate"),
                        "target": open_image(target_image, "target") if target_image is not None else None}
            job = store.create(model_id or DEMO_MODEL, config, [instance], owner=identity_of(request, profile), address=anonymous_address(request, profile))
        except OPERATOR_ERRORS as error:
            raise fail(error) from None
        services.worker.wake()
        gr.Info(f"job {job.id} queued")
        if instance["target"] is not None and (note := surrogate_reach(instance["target"], instance["surrogate"]).warning()):
            gr.Warning(note)
        return job.id, progress(job)

    def status(job, request: gr.Request, profile: gr.OAuthProfile | None):
        found = store.get(job or "", owner_of(request, profile))
        if found is None:
            raise gr.Error(f"no job {job!r}")
        return progress(found)

    def act(action, job, request, profile):
        try:
            found = action(job or "", owner=owner_of(request, profile))
        except OPERATOR_ERRORS as error:
            raise fail(error) from None
        services.worker.wake()
        return progress(found)

    def cancel_job(job, request: gr.Request, profile: gr.OAuthProfile | None):
        return act(store.cancel, job, request, profile)

    def resume_job(job, request: gr.Request, profile: gr.OAuthProfile | None):
        return act(store.resume, job, request, profile)

    def poll(job, last, request: gr.Request, profile: gr.OAuthProfile | None):
        owner = owner_of(request, profile)
        found = store.get(job or "", owner)
        info = progress(found) if found else None
        key = f"{job}:{info['step']}:{info['state']}" if info else ""
        plot = loss_plot(found.run_dir, info["total"]) if found and key != last else gr.skip()
        elapsed = None
        if info and info["state"] == "running" and info.get("phase") != "training":
            since = info.get("phase_started")
            elapsed = max(0.0, time.time() - since) if isinstance(since, (int, float)) else None
        state = info["state"] if info else ""
        shown_info = info
        if state == "done":  # the steps actually trained (training may stop early), not the planned total
            try:
                report = found.folder.read_metrics() or {}
            except DamagedRunFile as error:
                report, shown_info = {}, {**info, "damaged": f"{info.get('damaged') or ''} {error}".strip()}
            timing, forgetting = report.get("timing") or {}, report.get("forgetting") or {}
            if timing.get("steps_run") is not None:
                shown_info = {**shown_info, "step": int(timing["steps_run"])}
            if forgetting.get("toward_surrogate") is not None:  # the verdict's r, of the weights saved: the Results page's number
                shown_info = {**shown_info, "final_r": forgetting["toward_surrogate"], "verdict": forgetting.get("verdict"), "weights_of_step": timing.get("weights_of_step")}
        buttons = [gr.update(interactive=state in CANCELLABLE), gr.update(interactive=state in RESUMABLE)] if key != last else [gr.skip(), gr.skip()]
        return progress_markdown(shown_info, elapsed), plot, info if key != last else gr.skip(), job_table(store, owner), key, *buttons

    def pick_row(evt: gr.SelectData):
        row = evt.row_value if evt.row_value else None
        return row[0] if row else gr.skip()

    def on_target(value):
        """The flagged image fills the target; the rest of its grid becomes the seeds checked after the job."""
        if not value:
            return "", None, None, ""
        flagged = value["provenance"]["seed"]
        return value["provenance"]["prompt"], flagged, value["image"], seeds_text([s for s in value.get("grid_seeds", []) if s != flagged])

    preset.change(apply_preset, [preset], [preset_info, *components], **INTERNAL)
    built["method"].change(show_method_fields, [built["method"]], [component for component, _ in method_specific], **INTERNAL)
    start.click(form_to_json, components, [config_json], **INTERNAL).success(
        start_job, [prompt, seed, surrogate, target, config_json, model_state], [job_id, status_json], api_name="start_unlearning")
    refresh.click(status, [job_id], [status_json], api_name="job_status")
    cancel.click(cancel_job, [job_id], [status_json], **INTERNAL)
    resume.click(resume_job, [job_id], [status_json], api_name="resume_job")
    timer.tick(poll, [job_id, shown], [progress_text, curves, status_json, table, shown, cancel, resume], show_progress="hidden", **INTERNAL)
    table.select(pick_row, None, [job_id], **INTERNAL)
    target_state.change(on_target, [target_state], [prompt, seed, target, built["review_seeds"]], **INTERNAL)
    surrogate_state.change(lambda value: (value["image"], value["in_use"]) if value else (None, ""), [surrogate_state], [surrogate, surrogate_in_use], **INTERNAL)
