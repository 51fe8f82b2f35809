"""The "Instruction forgetting" tab: why writing "forget X" in the prompt does not forget X.

`render()` builds the tab's components inside an enclosing `gr.Tab(...)` of a `gr.Blocks`;
all analysis lives in `unlearn_core.probe`. The model is the app's shared one
(`ui.common.get_model`, on the device of the app's settings) and the probe takes the model's
queue slot like every other event that runs it: the probe swaps the denoiser's attention
processors for the length of its run. Results are kept per session in `gr.State`.
"""

from __future__ import annotations

import tempfile

import gradio as gr

from ui.common import MODEL_QUEUE, get_model, on_gpu
from unlearn_core import probe, settings
from unlearn_core.config import DEMO_MODEL
from unlearn_core.errors import OperatorError

DEFAULT_CONCEPT = "the flag of japan"


def _load(model_path: str):
    """The shared `DiffusionModel` for this id; a load failure becomes the operator's message."""
    model_path = (model_path or "").strip() or DEMO_MODEL
    try:
        return get_model(model_path, settings.current().device)
    except OperatorError as error:  # ModelLoadError: not found, not a diffusers folder, not allowed
        raise gr.Error(f"Cannot load the model {model_path!r}: {error}") from None


def _config(concept, variants_text, seeds_text, steps, guidance) -> probe.ProbeConfig:
    if not (concept or "").strip():
        raise gr.Error("Enter a concept to forget, e.g. 'the flag of japan'.")
    try:
        return probe.ProbeConfig(concept=concept, variants=variants_text or "", seeds=seeds_text or "", steps=steps, guidance=guidance)
    except OperatorError as error:
        raise gr.Error(str(error)) from None


def _heatmap(result, variant, position, step):
    if result is None or variant not in getattr(result, "variants", {}) or position is None:
        return None
    try:
        last = int(result.config.steps) if hasattr(result, "config") else int(step)
        return probe.heatmap_image(result, variant, int(position), min(int(step), last) - 1)
    except (ValueError, IndexError, KeyError):
        return None


def _token_update(result, variant):
    choices = probe.token_choices(result, variant)
    v = result.variants[variant]
    candidates = v.concept_positions or v.instruction_positions or tuple(p for _, p in choices[:1])
    preferred = candidates[0] if candidates else None
    return gr.update(choices=choices, value=preferred), preferred


@on_gpu
def _run(model_path, concept, variants_text, seeds_text, steps, guidance, progress=gr.Progress()):
    config = _config(concept, variants_text, seeds_text, steps, guidance)
    model = _load(model_path)
    out_dir = tempfile.mkdtemp(prefix="hotfix-probe-")
    progress(0.0, desc="encoding prompts")
    try:
        result = probe.run_probe(model, config, out_dir=out_dir, progress=lambda done, total: progress(done / total, desc=f"denoising step {done}/{total}"))
    except OperatorError as error:  # e.g. a variant longer than the tokenizer's limit, an unconditional model
        raise gr.Error(str(error)) from None
    archive = probe.export_zip(result)
    gallery = [(image, f"{name} / seed {seed}") for name, v in result.variants.items() for seed, image in zip(v.seeds, v.images)]
    first = next(iter(result.variants))
    tokens, position = _token_update(result, first)
    steps_total = config.steps
    table = [[row[c] for c in probe.CSV_COLUMNS] for row in result.rows]
    status = f"**{probe.conclusion(result)}**\n\nDone in {result.seconds:.1f} s: {len(result.variants)} variants x {len(config.seeds)} seeds, {steps_total} steps."
    if result.image_similarity_reason:
        status += f" CLIP image similarity not computed: {result.image_similarity_reason}"
        gr.Warning("CLIP image similarity not computed (no CLIP model available); the other analyses are complete.")
    return (
        result,
        gallery,
        gr.update(choices=list(result.variants), value=first),
        tokens,
        # The range and value arrive in one update with the dropdowns'; the heat map also clamps
        # the step, so a change event carrying the old value cannot fail.
        gr.update(minimum=1, maximum=steps_total, value=steps_total, label=f"Denoising step (1–{steps_total})"),
        _heatmap(result, first, position, steps_total),
        str(result.figures["attention_mass"]),
        str(result.figures["similarity"]),
        gr.update(value=table, headers=list(probe.CSV_COLUMNS)),
        str(archive),
        status,
    )


def _on_variant(result, variant, step):
    if result is None or variant not in result.variants:
        return gr.update(), None
    tokens, position = _token_update(result, variant)
    return tokens, _heatmap(result, variant, position, step)


def render(model_state: gr.State) -> None:
    """Build the tab body on the page's model (the box at the top); call inside `with gr.Tab("Instruction forgetting"):`."""
    result_state = gr.State(None)
    gr.Markdown(
        "Ask the model to *forget* a concept in the prompt and watch it draw the concept anyway. "
        "Compares prompt variants on the same seeds: text-embedding similarity to `a photo of X`, "
        "token ablation, cross-attention mass on concept vs instruction tokens per step, and heat maps."
    )
    concept = gr.Textbox(value=DEFAULT_CONCEPT, label="Concept X", elem_id="instr-concept")
    variants = gr.Textbox(
        value=probe.default_variants_text(),
        lines=5,
        label="Prompt variants (one per line, optional 'name: ' prefix; {concept} is replaced by X)",
        elem_id="instr-variants",
    )
    with gr.Row():
        seeds = gr.Textbox(value="0-3", label="Seeds ('0-3', '0,2,5' or '7')", elem_id="instr-seeds")
        steps = gr.Slider(1, 100, value=25, step=1, label="Steps", elem_id="instr-steps")
        guidance = gr.Slider(0.0, 15.0, value=5.0, step=0.5, label="Guidance", elem_id="instr-guidance")
    run = gr.Button("Run probe", variant="primary", elem_id="instr-run")
    status = gr.Markdown(elem_id="instr-status")
    gallery = gr.Gallery(label="Images per variant (same seeds = same initial noise)", columns=4, height="auto", elem_id="instr-gallery")
    with gr.Row():
        with gr.Column(scale=1):
            heat_variant = gr.Dropdown(choices=[], label="Variant", elem_id="instr-heat-variant")
            token = gr.Dropdown(choices=[], label="Token", elem_id="instr-token")
            step = gr.Slider(1, 25, value=25, step=1, label="Denoising step", elem_id="instr-step")
            gr.Markdown("The map is the share of each image position's cross-attention that goes to the token, "
                        "averaged over the seeds and laid over the first seed's image; its colour bar runs over "
                        "that token's own range across the steps.")
        with gr.Column(scale=2):
            heatmap = gr.Image(label="Cross-attention heat map", type="pil", height=420, show_label=False, elem_id="instr-heatmap")
    # the figures carry their own titles: a label on top would cover them
    mass_plot = gr.Image(label="Attention mass on concept vs instruction tokens", show_label=False, type="filepath", height=420, elem_id="instr-mass-plot")
    similarity_plot = gr.Image(label="Text similarity to the anchor and token ablation", show_label=False, type="filepath", height=380, elem_id="instr-similarity-plot")
    table = gr.Dataframe(headers=list(probe.CSV_COLUMNS), label="Results (one row per variant and seed)", interactive=False, elem_id="instr-table")
    export = gr.File(label="Export (CSV + figures + images, zip)", elem_id="instr-export")

    run.click(
        _run,
        inputs=[model_state, concept, variants, seeds, steps, guidance],
        outputs=[result_state, gallery, heat_variant, token, step, heatmap, mass_plot, similarity_plot, table, export, status],
        **MODEL_QUEUE,
    )
    # .input, not .change: only the operator's own choices redraw the map. A run's own updates (a new
    # step range with its value, a variant, a token) already carry their map, and a change event
    # sent with the slider's old value against its new range was refused ("Value 25 is greater than maximum value 3").
    heat_variant.input(_on_variant, inputs=[result_state, heat_variant, step], outputs=[token, heatmap])
    token.input(_heatmap, inputs=[result_state, heat_variant, token, step], outputs=heatmap)
    step.input(_heatmap, inputs=[result_state, heat_variant, token, step], outputs=heatmap)
