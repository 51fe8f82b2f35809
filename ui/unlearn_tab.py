"""Unlearn: a settings form generated from `UnlearnConfig`, a job queue, live progress."""

from __future__ import annotations

import json
from dataclasses import MISSING, fields

import gradio as gr

from ui.common import INTERNAL, OPERATOR_ERRORS, Services, fail, image_input, job_table, loss_frame, pretty
from unlearn_core.config import DEMO_MODEL, PRESETS, UnlearnConfig, check_seed
from unlearn_core.errors import InvalidInput, NotReady
from unlearn_core.images import open_image
from unlearn_core.store import progress

LIST_FIELDS = ("remember_prompts", "eval_prompts")
WEB_EXCLUDED = ("remember_dir",)  # a server folder is not something a browser user may name
POLL_S = 2.0


def _default(spec):
    return spec.default_factory() if spec.default is MISSING else spec.default


def form_fields() -> list:
    return [spec for spec in fields(UnlearnConfig) if spec.name not in WEB_EXCLUDED]


def component_for(spec) -> gr.components.Component:
    """One form component per config field, from its type and metadata."""
    meta, label, value = spec.metadata, spec.name.replace("_", " "), _default(spec)
    common = {"label": label, "info": meta.get("help"), "elem_id": f"cfg-{spec.name.replace('_', '-')}"}
    if "choices" in meta:
        return gr.Dropdown(list(meta["choices"]), value=value, **common)
    if spec.type in ("bool", bool):
        return gr.Checkbox(value=value, **common)
    if spec.name in LIST_FIELDS:
        return gr.Textbox("\n".join(value), lines=2, placeholder="one prompt per line", **common)
    precision = 0 if spec.type in ("int", int) else None
    return gr.Number(value, minimum=meta.get("min"), maximum=meta.get("max"), precision=precision, **common)


def values_to_config(values: list) -> UnlearnConfig:
    data = {}
    for spec, value in zip(form_fields(), values):
        if spec.name in LIST_FIELDS:
            value = [line.strip() for line in (value or "").splitlines() if line.strip()]
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
    return UnlearnConfig.from_preset(data.pop("preset", "quick"), **data)


def progress_markdown(info: dict | None) -> str:
    if not info:
        return "No job yet: flag a target, make a surrogate, then press **Start unlearning**."
    parts = [f"**Job `{info['id']}`** — {info['state']} · step **{info['step']}/{info['total']}**"]
    if info.get("loss_forget") is not None:
        parts.append(f"L_f {info['loss_forget']:.4f} · L_r {info['loss_remember']:.4f} · gradient conflicts {info['conflict_rate']:.0%} · {info['seconds_per_step']:.2f} s/step")
    if info.get("toward_surrogate") is not None:
        stop = f" (training stops at {info['stop_at_r']:.0%})" if info.get("stop_at_r") else ""
        parts.append(f"target seed now {info['toward_surrogate']:.0%} of the way to the surrogate{stop}")
    if info.get("eta_s") is not None:
        parts.append(f"ETA {info['eta_s']:.0f} s (then evaluation)")
    elif info["state"] == "running":
        parts.append("preparing (target, remember set)…")
    if info.get("error"):
        parts.append(f"⚠ {info['error']}")
    if info["state"] == "done":
        parts.append("Done — see **Results** and **Adapters**.")
    return "  \n".join(parts)


def render(services: Services, model_state: gr.State, target_state: gr.State, surrogate_state: gr.State) -> None:
    store = services.store
    with gr.Row():
        prompt = gr.Textbox(label="Target prompt", elem_id="unl-prompt")
        seed = gr.Number(label="Target seed", precision=0, minimum=0, elem_id="unl-seed")
        target = image_input("Target x_f (optional: else regenerated from prompt + seed)", height=160, width=160, format="png", elem_id="unl-target")
        surrogate = image_input("Surrogate x_s", height=160, width=160, format="png", elem_id="unl-surrogate")
    with gr.Row():
        preset = gr.Dropdown(list(PRESETS), value="quick", label="Preset", elem_id="unl-preset")
    specs = form_fields()
    with gr.Accordion("Settings", open=False, elem_id="unl-settings"):
        components = []
        with gr.Row():
            columns = [gr.Column(), gr.Column(), gr.Column()]
        for index, spec in enumerate(specs):
            with columns[index % 3]:
                components.append(component_for(spec))
    with gr.Accordion("Settings as JSON (what the API takes)", open=False):
        config_json = gr.Code(pretty(UnlearnConfig().to_dict()), language="json", label="config", elem_id="unl-config")
    with gr.Row():
        start = gr.Button("Start unlearning", variant="primary", elem_id="unl-start")
        cancel = gr.Button("Cancel", variant="stop", elem_id="unl-cancel")
        resume = gr.Button("Resume", elem_id="unl-resume")
    with gr.Row():
        job_id = gr.Textbox(label="Job", placeholder="job id (or click a row of the table)", elem_id="unl-job-id", scale=3)
        refresh = gr.Button("Status", elem_id="unl-refresh", scale=1)
    progress_text = gr.Markdown(progress_markdown(None), elem_id="unl-progress")
    curves = gr.LinePlot(loss_frame(None), x="step", y="loss", color="curve", title="Losses", height=260, elem_id="unl-curves")
    status_json = gr.JSON(label="Job status", elem_id="unl-status")
    table = gr.Dataframe(job_table(store), label="Jobs", interactive=False, elem_id="job-table")
    timer = gr.Timer(POLL_S)
    shown = gr.State("")  # what the curve shows now ("job:step"), to skip redrawing an unchanged plot

    def apply_preset(name):
        values = UnlearnConfig.from_preset(name if name in PRESETS else "quick").to_dict()
        return [("\n".join(values[s.name]) if s.name in LIST_FIELDS else values[s.name]) for s in specs]

    def form_to_json(*values):
        try:
            return pretty(values_to_config(list(values)).to_dict())
        except OPERATOR_ERRORS as error:
            raise fail(error) from None

    def start_job(prompt_text, seed_value, surrogate_image, target_image, config_text, model_id):
        try:
            if surrogate_image is None:
                raise NotReady("no surrogate: make one in the Surrogate tab (or pass a surrogate image)")
            if seed_value is None:
                raise InvalidInput("the target seed is empty: flag a target or type its seed")
            config = config_from_json(config_text)
            instance = {"prompt": prompt_text or "", "seed": check_seed(seed_value, "target seed"), "surrogate": open_image(surrogate_image, "surrogate"),
                        "target": open_image(target_image, "target") if target_image is not None else None}
            job = store.create(model_id or DEMO_MODEL, config, [instance])
        except OPERATOR_ERRORS as error:
            raise fail(error) from None
        services.worker.wake()
        gr.Info(f"job {job.id} queued")
        return job.id, progress(job)

    def status(job):
        found = store.get(job or "")
        if found is None:
            raise gr.Error(f"no job {job!r}")
        return progress(found)

    def act(action, job):
        try:
            found = action(job or "")
        except OPERATOR_ERRORS as error:
            raise fail(error) from None
        services.worker.wake()
        return progress(found)

    def poll(job, last):
        found = store.get(job or "")
        info = progress(found) if found else None
        key = f"{job}:{info['step']}:{info['state']}" if info else ""
        plot = loss_frame(found.run_dir) if found and key != last else gr.skip()
        return progress_markdown(info), plot, info if key != last else gr.skip(), job_table(store), key

    def pick_row(evt: gr.SelectData):
        row = evt.row_value if evt.row_value else None
        return row[0] if row else gr.skip()

    def on_target(value):
        if not value:
            return "", None, None
        return value["provenance"]["prompt"], value["provenance"]["seed"], value["image"]

    preset.change(apply_preset, [preset], components, **INTERNAL)
    start.click(form_to_json, components, [config_json], **INTERNAL).success(
        start_job, [prompt, seed, surrogate, target, config_json, model_state], [job_id, status_json], api_name="start_unlearning")
    refresh.click(status, [job_id], [status_json], api_name="job_status")
    cancel.click(lambda job: act(store.cancel, job), [job_id], [status_json], **INTERNAL)
    resume.click(lambda job: act(store.resume, job), [job_id], [status_json], api_name="resume_job")
    timer.tick(poll, [job_id, shown], [progress_text, curves, status_json, table, shown], show_progress="hidden", **INTERNAL)
    table.select(pick_row, None, [job_id], **INTERNAL)
    target_state.change(on_target, [target_state], [prompt, seed, target], **INTERNAL)
    surrogate_state.change(lambda image: image, [surrogate_state], [surrogate], **INTERNAL)
