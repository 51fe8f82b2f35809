"""Generate & flag: a seed grid with provenance; clicking an image flags it."""

from __future__ import annotations

import gradio as gr

from ui.common import INTERNAL, MODEL_QUEUE, OPERATOR_ERRORS, PIXELS, Services, fail, get_model, on_gpu
from unlearn_core.config import DEMO_MODEL, GenerationRequest, parse_seeds
from unlearn_core.demo.quality import judge_marks
from unlearn_core.generate import generate_grid


def caption(provenance: dict, mark: str | None = None) -> str:
    """A thumbnail's caption: its seed (prompt, steps and guidance are the grid's, in its provenance),
    and the flag judge's mark when it thinks the image wrong."""
    return f"seed {provenance['seed']}" + (f" · ⚠ {mark}" if mark else "")


def judge_note(marks: list | None, wanted: bool) -> str:
    """What the marks mean, or why there are none."""
    if not wanted:
        return ""
    if marks is None:
        return ("No marks: the flag judge knows only the demo model's flags (flag of NAME); for other prompts and models, "
                "look for the odd one out yourself (an outlier score would need CLIP's weights, which this server does not have).")
    wrong = sum(mark is not None for mark in marks)
    return (f"The flag judge (a small classifier of the demo's flags) thinks {wrong} of {len(marks)} wrong: "
            "⚠ on a caption says which flag it sees instead. It can be wrong; look at the image.")


def describe_target(target: dict | None) -> str:
    if not target:
        return "No target yet: click an image of the grid to flag it as the undesired output."
    p = target["provenance"]
    return (f"**Target flagged** — seed **{p['seed']}**, prompt `{p['prompt']}`, {p['steps']} steps, guidance {p['guidance']:g}, "
            f"{p['scheduler']}, {p['width']}×{p['height']}, model `{p['model']}`. Next: make a surrogate.")


def render(services: Services, model_state: gr.State, target_state: gr.State) -> None:
    results_state = gr.State([])
    with gr.Row():
        with gr.Column(scale=1):
            prompt = gr.Textbox("flag of ireland", label="Prompt", elem_id="gen-prompt")
            seeds = gr.Textbox("0-7", label="Seeds", info="'0-7', '1,5,9' or '3'", elem_id="gen-seeds")
            with gr.Row():
                steps = gr.Number(25, label="Steps", precision=0, minimum=1, maximum=200, elem_id="gen-steps")
                guidance = gr.Number(5.0, label="Guidance", minimum=0, maximum=50, elem_id="gen-guidance")
            judge = gr.Checkbox(True, label="Mark images the flag judge thinks wrong", info="demo model, flag prompts only", elem_id="gen-judge")
            run = gr.Button("Generate", variant="primary", elem_id="gen-run")
        with gr.Column(scale=3):
            gallery = gr.Gallery(label="Click the undesired output to flag it", columns=4, height="auto", allow_preview=False, format="png", elem_classes=PIXELS, elem_id="gen-gallery")
            marks_note = gr.Markdown("", elem_id="gen-judge-note")
    with gr.Accordion("Provenance of the grid (JSON)", open=False):
        provenance = gr.JSON(label="Provenance", elem_id="gen-provenance")
    with gr.Row():
        target_image = gr.Image(label="Flagged target", type="pil", interactive=False, height=256, width=256, format="png", elem_classes=PIXELS, elem_id="target-image")
        target_info = gr.Markdown(describe_target(None), elem_id="target-info")

    @on_gpu
    def generate(prompt_text, seed_text, step_count, guidance_scale, model_id, progress=gr.Progress()):
        try:
            request = GenerationRequest(prompt_text or "", parse_seeds(seed_text), int(step_count or 0), float(guidance_scale if guidance_scale is not None else -1))
            model = get_model(model_id, services.device)
        except OPERATOR_ERRORS as error:
            raise fail(error) from None
        results = generate_grid(model, request, progress=lambda done, total: progress(done / total, desc=f"{done}/{total} images"))
        records = [prov.to_dict() for _, prov in results]
        marks = judge_marks(request.prompt, [image for image, _ in results]) if model.source == DEMO_MODEL else None
        items = [(image, caption(record)) for (image, _), record in zip(results, records)]  # the API's captions: the seed only
        kept = [{"image": image, "provenance": record, "mark": marks[index] if marks else None, "judged": marks is not None} for index, ((image, _), record) in enumerate(zip(results, records))]
        return items, records, kept

    def show_marks(results: list, wanted: bool):
        """The grid again with the judge's marks on its captions (or without, when the toggle is off), and what they mean."""
        if not results:
            return gr.skip(), ""
        judged = results[0].get("judged")
        items = [(item["image"], caption(item["provenance"], item["mark"] if wanted else None)) for item in results]
        return items, judge_note([item["mark"] for item in results] if judged else None, bool(wanted))

    def flag(results: list, evt: gr.SelectData):
        if not results or evt.index is None or not 0 <= int(evt.index) < len(results):
            raise gr.Error("generate a grid first, then click one of its images")
        target = {**results[int(evt.index)], "grid_seeds": [item["provenance"]["seed"] for item in results]}  # the grid the operator looked at
        return target, target["image"], describe_target(target)

    run.click(generate, [prompt, seeds, steps, guidance, model_state], [gallery, provenance, results_state], api_name="generate", **MODEL_QUEUE).success(
        show_marks, [results_state, judge], [gallery, marks_note], **INTERNAL)
    judge.change(show_marks, [results_state, judge], [gallery, marks_note], **INTERNAL)
    gallery.select(flag, [results_state], [target_state, target_image, target_info], **INTERNAL)
