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
    colour_at,
    keep_main_change,
    make_surrogate,
    recolour_region,
    surrogate_reach,
)

EDITOR_SIDE = 256  # the target is shown enlarged on the canvas so a brush stroke is not a blot
BRUSH_COLOURS = ["#d62728", "#2ca02c", "#1f77b4", "#ff7f0e", "#ffffff", "#000000", "#ffdd00"]


ORIGINS = {"sdedit": "SDEdit", "image": "your image", "canvas": "the canvas", "region": "the recoloured region", "flip": "the flip baseline",
           "noise": "the noise baseline", "main change": "its main change only"}
LOCAL_SSIM = 0.7  # below: the surrogate changes more than a region


def in_use_line(reach, origin: str) -> str:
    """Which surrogate is in use, where it came from and how far it is from the target (shown on
    the Surrogate and the Unlearn tabs)."""
    if not origin:
        return ""
    line = f"**Surrogate in use: from {ORIGINS.get(origin, origin)}**, SSIM {reach.ssim:.2f} to the target."
    if reach.ssim < LOCAL_SSIM and not reach.is_global:
        line += " This changes more than the region you meant; paint or recolour the region instead?"
    return line


def in_use(target: Image.Image, surrogate: Image.Image, origin: str) -> dict:
    """The shared surrogate state: the image and its in-use line."""
    return {"image": surrogate, "in_use": in_use_line(surrogate_reach(target, surrogate), origin)}


def similarity_markdown(target: Image.Image, surrogate: Image.Image, origin: str = "") -> str:
    """Which surrogate is in use and where it came from, then target vs surrogate under each
    metric's own name; unavailable networks say why."""
    reach = surrogate_reach(target, surrogate)
    lines = [in_use_line(reach, origin), ""]
    lines += ["**Surrogate vs target** (the surrogate should keep the structure and drop what is wrong)", ""]
    results = list(metrics.compare([surrogate], [target]).values())
    lines += [f"- **{result['name']}**: {result['value']:.4g}" for result in results if result["available"]]
    missing = [result["name"] for result in results if not result["available"]]
    if missing:  # the Results tab lists why, once
        lines.append(f"- {' and '.join(missing)}: not on this server (their networks' weights are missing; Results says more)")
    note = reach.warning()
    return "\n".join(lines + ([f"\n**Global surrogate.** {note}"] if note else []))


def enlarged(image: Image.Image) -> Image.Image:
    """The image at EDITOR_SIDE, each pixel a block, so a click or a stroke lands where it is aimed."""
    return image.convert("RGB").resize((EDITOR_SIDE, EDITOR_SIDE), Image.Resampling.NEAREST)


def editor_value(target: dict | None):
    if not target:
        return None
    return enlarged(target["image"])


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
        target_image = image_input("Target: the flagged image", interactive=False, height=256, width=256, format="png", elem_classes=PIXELS, elem_id="sur-target")
        surrogate_image = image_input("Surrogate: the corrected image", interactive=False, height=256, width=256, format="png", elem_classes=PIXELS, elem_id="sur-surrogate")
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
        with gr.Tab("Recolour region"):
            with gr.Row():
                region = gr.Image(label="Click a region of the target", type="pil", interactive=False, height=EDITOR_SIDE, width=EDITOR_SIDE,
                                  format="png", elem_classes=PIXELS, elem_id="sur-region")
                with gr.Column():
                    click_does = gr.Radio(["recolour", "pick its colour"], value="recolour", label="A click on the image…", elem_id="sur-click")
                    colour = gr.ColorPicker(BRUSH_COLOURS[0], label="New colour", elem_id="sur-colour")
                    tolerance = gr.Slider(0, 255, 80, step=5, label="Tolerance", elem_id="sur-tolerance",
                                          info="how far a pixel's colour (R+G+B) may be from the clicked one and still join the region")
                    with gr.Row():
                        undo = gr.Button("Undo", size="sm", elem_id="sur-undo")
                        region_button = gr.Button("Use recoloured image as surrogate", variant="primary", elem_id="sur-use-region")
            region_history = gr.State([])
        with gr.Tab("Paint"):
            editor = CheckedImageEditor(
                label="Paint the correction over the target", type="pil", image_mode="RGB", sources=("upload", "clipboard"),
                brush=gr.Brush(colors=BRUSH_COLOURS, default_color=BRUSH_COLOURS[0], default_size=12, color_mode="defaults"),  # the editor's own toolbar sizes the brush and undoes
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
    def build(target, options: SurrogateOptions, model_id, origin: str = ""):
        """Make the surrogate; returns it, its metrics and the state."""
        if target is None:
            raise NotReady("no target: flag an image in 'Generate & flag' first (or pass a target image)")
        model = get_model(model_id, services.device)
        target = open_image(target, "target").resize(model.image_size)
        surrogate = make_surrogate(model, target, options)
        if np.array_equal(np.asarray(surrogate), np.asarray(target)):
            gr.Warning("the surrogate is identical to the target: unlearning would change nothing")
        return surrogate, similarity_markdown(target, surrogate, origin or options.method), in_use(target, surrogate, origin or options.method)

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
            return build(target["image"], SurrogateOptions("image", image=painted), model_id, "canvas")
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
        return kept, similarity_markdown(target, kept, "main change"), in_use(target, kept, "main change")

    def on_target(target):
        if not target:
            return None, None, None, None, None, [], "Flag a target in *Generate & flag*, then make a surrogate here."
        image = target["image"].convert("RGB")
        return image, editor_value(target), None, None, enlarged(image), [image], "Now make a surrogate: recolour a region, paint, SDEdit or upload."

    def on_region_click(history, action, new_colour, tolerance_value, evt: gr.SelectData):
        """Recolour the clicked region (a new step of the history), or pick its colour."""
        if not history:
            gr.Warning("flag a target in 'Generate & flag' first")
            return gr.skip(), gr.skip(), gr.skip()
        current = history[-1]
        point = (int(evt.index[0]) * current.width // EDITOR_SIDE, int(evt.index[1]) * current.height // EDITOR_SIDE)
        if action == "pick its colour":
            return gr.skip(), gr.skip(), colour_at(current, point)
        try:
            recoloured = recolour_region(current, point, new_colour, int(tolerance_value))
        except OPERATOR_ERRORS as error:
            raise fail(error) from None
        return enlarged(recoloured), history + [recoloured], gr.skip()

    def undo_region(history):
        kept = history[:-1] if len(history) > 1 else history
        return (enlarged(kept[-1]) if kept else None), kept

    def use_region(history, target, model_id):
        if not target or len(history) < 2:
            gr.Warning("click a region of the target to recolour it first")
            return gr.skip(), gr.skip(), gr.skip()
        try:
            return build(target["image"], SurrogateOptions("image", image=history[-1]), model_id, "region")
        except OPERATOR_ERRORS as error:
            raise fail(error) from None

    inputs = [target_image, edit_prompt, strength, sigma, seed, steps, upload, model_state]
    outputs = [surrogate_image, similarity, surrogate_state]
    make_button.click(make, [method, *inputs], outputs, api_name="make_surrogate", **MODEL_QUEUE)
    for button, name in ((sdedit_button, "sdedit"), (upload_button, "image"), (flip_button, "flip"), (noise_button, "noise")):
        button.click(functools.partial(make, name), inputs, outputs, **MODEL_QUEUE, **INTERNAL)
    main_change_button.click(keep_main, [target_image, surrogate_image], outputs, **INTERNAL)
    canvas_button.click(use_canvas, [editor, target_state, model_state], outputs, **MODEL_QUEUE, **INTERNAL)
    region.select(on_region_click, [region_history, click_does, colour, tolerance], [region, region_history, colour], **INTERNAL)
    undo.click(undo_region, [region_history], [region, region_history], **INTERNAL)
    region_button.click(use_region, [region_history, target_state, model_state], outputs, **MODEL_QUEUE, **INTERNAL)
    target_state.change(on_target, [target_state], [target_image, editor, surrogate_image, surrogate_state, region, region_history, similarity], **INTERNAL)
