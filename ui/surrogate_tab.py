"""Surrogate: SDEdit, paint over the target, upload, or the flip / noise baselines."""

from __future__ import annotations

import functools

import gradio as gr
import numpy as np
from PIL import Image

from ui.common import (
    INTERNAL,
    MODEL_QUEUE,
    OPERATOR_ERRORS,
    PIXELS,
    CheckedImageEditor,
    Services,
    fail,
    get_model,
    image_input,
    on_gpu,
    plain,
)
from unlearn_core import metrics
from unlearn_core.errors import ImageError, NotReady
from unlearn_core.images import open_image
from unlearn_core.surrogate import (
    SURROGATE_METHODS,
    SurrogateOptions,
    keep_main_change,
    make_surrogate,
    surrogate_reach,
)

EDITOR_SIDE = 256  # the target is shown enlarged on the canvas so a brush stroke is not a blot
BRUSH_COLOURS = ["#d62728", "#2ca02c", "#1f77b4", "#ff7f0e", "#ffffff", "#000000", "#ffdd00"]


def similarity_markdown(target: Image.Image, surrogate: Image.Image) -> str:
    """Target vs surrogate under each metric's own name; unavailable networks say why."""
    lines = ["**Surrogate vs target** (the surrogate should keep the structure and drop what is wrong)", ""]
    for result in metrics.compare([surrogate], [target]).values():
        if result["available"]:
            lines.append(f"- **{result['name']}**: {result['value']:.4g}")
        else:
            lines.append(f"- {result['name']}: unavailable: {result['reason']}")
    note = surrogate_reach(target, surrogate).warning()
    return "\n".join(lines + ([f"\n**Global surrogate.** {note}"] if note else []))


def editor_value(target: dict | None):
    if not target:
        return None
    return target["image"].convert("RGB").resize((EDITOR_SIDE, EDITOR_SIDE), Image.Resampling.NEAREST)


def canvas_image(value) -> Image.Image:
    """The painted canvas (background + strokes) or a clear error for an empty or untouched one."""
    empty = "the canvas is empty: flag a target (it starts the canvas) and paint the correction"
    if not isinstance(value, dict):
        raise ImageError(empty)
    background, composite = value.get("background"), value.get("composite")
    layers = [layer for layer in value.get("layers") or [] if layer is not None]
    image = composite or background or (layers[-1] if layers else None)
    if image is None:
        raise ImageError(empty)
    if background is not None and composite is not None:
        strokes = any(layer.mode in ("RGBA", "LA") and layer.getchannel("A").getbbox() for layer in layers)
        same = background.size == composite.size and np.abs(np.asarray(composite.convert("RGB"), dtype=np.int16) - np.asarray(background.convert("RGB"), dtype=np.int16)).max() <= 2
        if not strokes and same:
            raise ImageError("the canvas is unchanged: paint the correction over the target first")
    return open_image(image, "canvas")


def render(services: Services, model_state: gr.State, target_state: gr.State, surrogate_state: gr.State) -> None:
    with gr.Row():
        target_image = image_input("Target x_f", interactive=False, height=256, width=256, format="png", elem_classes=PIXELS, elem_id="sur-target")
        surrogate_image = image_input("Surrogate x_s", interactive=False, height=256, width=256, format="png", elem_classes=PIXELS, elem_id="sur-surrogate")
        with gr.Column():
            similarity = gr.Markdown("Flag a target in *Generate & flag*, then make a surrogate here.", label="similarity", elem_id="sur-metrics")
            main_change_button = gr.Button("Keep only the main change", size="sm", elem_id="sur-main-change")
    with gr.Tabs():
        with gr.Tab("SDEdit"):
            with gr.Row():
                strength = gr.Slider(0.05, 1.0, 0.6, step=0.05, label="Strength", info="0 keeps the target, 1 starts from pure noise", elem_id="sur-strength")
                edit_prompt = gr.Textbox("", label="Edit prompt (optional)", info="e.g. the prompt of what should be there instead", elem_id="sur-prompt")
                seed = gr.Number(0, label="Seed", precision=0, minimum=0, elem_id="sur-seed")
                steps = gr.Number(25, label="Steps", precision=0, minimum=1, maximum=200, elem_id="sur-steps")
            sdedit_button = gr.Button("Preview SDEdit", variant="primary", elem_id="sur-sdedit")
        with gr.Tab("Paint"):
            editor = CheckedImageEditor(
                label="Paint the correction over the target", type="pil", image_mode="RGB", sources=("upload", "clipboard"),
                brush=gr.Brush(colors=BRUSH_COLOURS, default_color=BRUSH_COLOURS[0], default_size=12, color_mode="defaults"),
                layers=False, format="png", canvas_size=(EDITOR_SIDE, EDITOR_SIDE), height=420, elem_id="sur-editor",
            )
            canvas_button = gr.Button("Use canvas as surrogate", variant="primary", elem_id="sur-use-canvas")
        with gr.Tab("Upload"):
            upload = image_input("Edited image", sources=("upload", "clipboard"), height=256, format="png", elem_classes=PIXELS, elem_id="sur-upload")
            upload_button = gr.Button("Use upload as surrogate", variant="primary", elem_id="sur-use-upload")
        with gr.Tab("Baselines"):
            sigma = gr.Slider(0.0, 1.0, 0.2, step=0.05, label="Noise σ (pixel units)", elem_id="sur-sigma")
            with gr.Row():
                flip_button = gr.Button("Flip", elem_id="sur-flip")
                noise_button = gr.Button("Add noise", elem_id="sur-noise")
        with gr.Tab("Any method (API)"):
            method = gr.Dropdown(list(SURROGATE_METHODS), value="sdedit", label="Method", info="'image' uses the Upload tab's image", elem_id="sur-method")
            make_button = gr.Button("Make surrogate", elem_id="sur-make")

    @on_gpu
    def build(target, options: SurrogateOptions, model_id):
        """Make the surrogate; returns it, its metrics and the state."""
        if target is None:
            raise NotReady("no target: flag an image in 'Generate & flag' first (or pass a target image)")
        model = get_model(model_id, services.device)
        target = open_image(target, "target").resize(model.image_size)
        surrogate = make_surrogate(model, target, options)
        if np.array_equal(np.asarray(surrogate), np.asarray(target)):
            gr.Warning("the surrogate is identical to the target: unlearning would change nothing")
        return surrogate, similarity_markdown(target, surrogate), surrogate

    def make(method_name, target, prompt, strength_value, sigma_value, seed_value, step_count, image, model_id):
        """The one handler behind every button (and the API's make_surrogate)."""
        try:
            options = SurrogateOptions(method_name, prompt=prompt or "", strength=float(strength_value), sigma=float(sigma_value),
                                       seed=seed_value or 0, steps=int(step_count or 25), image=image)
            return build(target, options, model_id)
        except OPERATOR_ERRORS as error:
            raise fail(error) from None

    def use_canvas(value, target, model_id):
        try:
            if not target:
                raise NotReady("no target: flag an image in 'Generate & flag' first")
            painted = canvas_image(value)
        except OPERATOR_ERRORS as error:
            gr.Warning(plain(error))
            return gr.skip(), gr.skip(), gr.skip()
        try:
            return build(target["image"], SurrogateOptions("image", image=painted), model_id)
        except OPERATOR_ERRORS as error:
            raise fail(error) from None

    def keep_main(target, surrogate):
        """The surrogate restricted to the region it mainly changed (the target elsewhere)."""
        try:
            if target is None or surrogate is None:
                raise NotReady("make a surrogate first")
            target = open_image(target, "target")
            kept = keep_main_change(target, open_image(surrogate, "surrogate"))
        except OPERATOR_ERRORS as error:
            raise fail(error) from None
        return kept, similarity_markdown(target, kept), kept

    def on_target(target):
        if not target:
            return None, None, None, None
        return target["image"], editor_value(target), None, None

    inputs = [target_image, edit_prompt, strength, sigma, seed, steps, upload, model_state]
    outputs = [surrogate_image, similarity, surrogate_state]
    make_button.click(make, [method, *inputs], outputs, api_name="make_surrogate", **MODEL_QUEUE)
    for button, name in ((sdedit_button, "sdedit"), (upload_button, "image"), (flip_button, "flip"), (noise_button, "noise")):
        button.click(functools.partial(make, name), inputs, outputs, **MODEL_QUEUE, **INTERNAL)
    main_change_button.click(keep_main, [target_image, surrogate_image], outputs, **INTERNAL)
    canvas_button.click(use_canvas, [editor, target_state, model_state], outputs, **MODEL_QUEUE, **INTERNAL)
    target_state.change(on_target, [target_state], [target_image, editor, surrogate_image, surrogate_state], **INTERNAL)
