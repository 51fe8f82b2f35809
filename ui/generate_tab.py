"""Generate & flag: a seed grid with provenance; clicking an image flags it."""

from __future__ import annotations

import gradio as gr

from ui.common import INTERNAL, MODEL_QUEUE, OPERATOR_ERRORS, PIXELS, Services, fail, get_model, on_gpu
from unlearn_core.config import GenerationRequest, parse_seeds
from unlearn_core.grid_marks import FLAG_JUDGE, GridMarks, mark_grid
from unlearn_core.generate import generate_grid


def caption(provenance: dict, mark: str | None = None) -> str:
    """A thumbnail's caption: its seed (prompt, steps and guidance are the grid's, in its provenance),
    and the flag judge's mark when it thinks the image wrong."""
    return f"seed {provenance['seed']}" + (f" · ⚠ {mark}" if mark else "")


def marks_note(marks: GridMarks | None, wanted: bool) -> str:
    """What the marks mean, or why there are none."""
    if not wanted or marks is None:
        return ""
    if marks.marks is None:
        return f"No marks: {marks.reason}. Look for the odd one out yourself."
    wrong = sum(mark is not None for mark in marks.marks)
    if marks.judge == FLAG_JUDGE:
        return (f"The flag judge (a small classifier of the demo's flags) thinks {wrong} of {len(marks.marks)} wrong: "
                "⚠ on a caption says which flag it sees instead. It can be wrong; look at the image.")
    return (f"The {marks.judge} marks {wrong} of {len(marks.marks)} as unlike the rest of the grid (⚠ on a caption). "
            "Odd is not always wrong, and a wrong image the whole grid shares is not odd; look at the images.")


def describe_target(target: dict | None) -> str:
    if not target:
        return "No target yet: click an image of the grid to flag it as the undesired output."
    p = target["provenance"]
    return (f"**Target flagged** — seed **{p['seed']}**, prompt `{p['prompt']}`, {p['steps']} steps, guidance {p['guidance']:g}, "
            f"{p['scheduler']}, {p['width']}×{p['height']}, model `{p['model']}`. Next: make a surrogate.")


def render(services: Services, model_state: gr.State, target_state: gr.State) -> None:
    results_state = gr.State({})  # {"items": [{image, provenance}], "marks": GridMarks | None}
    with gr.Row():
        with gr.Column(scale=1):
            prompt = gr.Textbox("flag of ireland", label="Prompt", elem_id="gen-prompt")
            seeds = gr.Textbox("0-7", label="Seeds", info="'0-7', '1,5,9' or '3'", elem_id="gen-seeds")
            with gr.Row():
                steps = gr.Number(25, label="Steps", precision=0, minimum=1, maximum=200, elem_id="gen-steps")
                guidance = gr.Number(5.0, label="Guidance", minimum=0, maximum=50, elem_id="gen-guidance")
            judge = gr.Checkbox(True, label="Mark images that look wrong", elem_id="gen-judge",
                                info="demo model: the flag judge; other models: a CLIP outlier score, where CLIP's weights are on the server")
            run = gr.Button("Generate", variant="primary", elem_id="gen-run")
        with gr.Column(scale=3):
            gallery = gr.Gallery(label="Click the undesired output to flag it", columns=4, height="auto", allow_preview=False, format="png", elem_classes=PIXELS, elem_id="gen-gallery")
            note = gr.Markdown("", elem_id="gen-judge-note")
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
        items = [(image, caption(record)) for (image, _), record in zip(results, records)]  # the API's captions: the seed only
        return items, records, {"items": [{"image": image, "provenance": record} for (image, _), record in zip(results, records)], "marks": None}

    def show_marks(grid: dict, wanted: bool):
        """The grid again with the marks on its captions (or without, when the toggle is off), and what
        they mean. The marks are computed once per grid, the first time they are wanted."""
        if not grid or not grid["items"]:
            return gr.skip(), "", gr.skip()
        items = grid["items"]
        if wanted and grid["marks"] is None:
            first = items[0]["provenance"]
            grid = {**grid, "marks": mark_grid(first["prompt"], [item["image"] for item in items], first["model"])}
        marks = grid["marks"].marks if wanted and grid["marks"] is not None and grid["marks"].marks else [None] * len(items)
        shown = [(item["image"], caption(item["provenance"], mark)) for item, mark in zip(items, marks)]
        return shown, marks_note(grid["marks"], bool(wanted)), grid

    def flag(grid: dict, evt: gr.SelectData):
        results = grid["items"] if grid else []
        if not results or evt.index is None or not 0 <= int(evt.index) < len(results):
            raise gr.Error("generate a grid first, then click one of its images")
        target = {**results[int(evt.index)], "grid_seeds": [item["provenance"]["seed"] for item in results]}  # the grid the operator looked at
        return target, target["image"], describe_target(target)

    run.click(generate, [prompt, seeds, steps, guidance, model_state], [gallery, provenance, results_state], api_name="generate", **MODEL_QUEUE).success(
        show_marks, [results_state, judge], [gallery, note, results_state], **INTERNAL)
    judge.change(show_marks, [results_state, judge], [gallery, note, results_state], **INTERNAL)
    gallery.select(flag, [results_state], [target_state, target_image, target_info], **INTERNAL)
