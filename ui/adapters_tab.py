"""Adapters: download a job's LoRA, its cards or the whole adapter folder as a zip; push it to the
Hub; load an adapter and compare base vs adapter."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import gradio as gr
from PIL import Image

from ui.common import INTERNAL, MODEL_QUEUE, OPERATOR_ERRORS, PIXELS, Services, done_jobs_dropdown, fail, get_model, on_gpu, owner_of, push_token, push_token_note, served_copies
from unlearn_core.config import parse_seeds
from unlearn_core.errors import AdapterError
from unlearn_core.export import REPO_ID_HELP, adapter_zip, push_to_hub
from unlearn_core.runfolder import ADAPTER_WEIGHT_NAMES, RunFolder

COMPARE_SIDE = 192  # the least width of a compared image on the page


def render(services: Services, model_state: gr.State, tab: gr.Tab) -> None:
    store = services.store
    gr.Markdown("### Download\nThe LoRA in diffusers format, its card (base model, target provenance, config, metrics), or the whole "
                "adapter folder as one zip: diffusers file, kohya file for ComfyUI / AUTOMATIC1111 (SD3: a file with alpha folded in, for ComfyUI), model card `README.md` and `adapter_card.json` "
                "(never the flagged target or its surrogate).")
    with gr.Row():
        job = gr.Dropdown([], label="Job", allow_custom_value=True, elem_id="ada-job", scale=4)
        prepare = gr.Button("Get adapter files", variant="primary", elem_id="ada-prepare", scale=1)
    with gr.Row():
        weights = gr.File(label="Adapter weights (.safetensors)", interactive=False, elem_id="ada-download")
        card_file = gr.File(label="Adapter card (JSON)", interactive=False, elem_id="ada-card")
        bundle = gr.File(label="Whole adapter folder (.zip)", interactive=False, elem_id="ada-zip")
    card = gr.JSON(label="Card", elem_id="ada-card-json")
    with gr.Accordion("Push to the Hugging Face Hub", open=False):
        with gr.Row():
            repo = gr.Textbox("", label="Model repository", placeholder=REPO_ID_HELP, elem_id="ada-repo", scale=3)
            token = gr.Textbox("", label="Your token with write access (empty: your Hugging Face sign-in's)", type="password", elem_id="ada-token", scale=3,
                               info=push_token_note())
        with_images = gr.Checkbox(False, label="Also upload the target and surrogate images (they show what is being removed)", elem_id="ada-push-images")
        push = gr.Button("Push (private repository)", elem_id="ada-push")
        pushed = gr.Markdown("", elem_id="ada-pushed")

    gr.Markdown("### Try an adapter\nBase model and adapter on the same seeds (same initial noise), side by side.")
    with gr.Row():
        upload = gr.File(label="…or an adapter file (.safetensors) instead of the job", file_types=[".safetensors"], elem_id="ada-upload")
        with gr.Column():
            prompt = gr.Textbox("", label="Prompt (empty: the adapter's target prompt)", elem_id="ada-prompt")
            seeds = gr.Textbox("", label="Seeds (empty: the target seed and the three after it)", placeholder="e.g. 40-43", elem_id="ada-seeds")
            steps = gr.Number(25, label="Steps", precision=0, minimum=1, maximum=200, elem_id="ada-steps")
            compare = gr.Button("Compare base vs adapter", elem_id="ada-compare")
    gallery = gr.Gallery(label="pairs of base | adapter, seed by seed", columns=4, height="auto", allow_preview=False, format="png", elem_classes=PIXELS, elem_id="ada-gallery")
    verdict = gr.Markdown("", elem_id="ada-info")

    def choices(current, request: gr.Request, profile: gr.OAuthProfile | None):
        return done_jobs_dropdown(store, owner_of(request, profile), current)

    def download(job_id, request: gr.Request, profile: gr.OAuthProfile | None):
        try:
            files = store.adapter_files(job_id or "", owner_of(request, profile))
            folder = RunFolder(files[0].parent)
            archive = adapter_zip(folder, folder.adapter_zip)
        except OPERATOR_ERRORS as error:
            raise fail(error) from None
        weights_copy, card_copy, archive_copy = served_copies([files[0], files[-1], archive])
        return weights_copy, card_copy, archive_copy

    def push_job(job_id, repo_id, token_text, images, request: gr.Request, profile: gr.OAuthProfile | None, signed_in: gr.OAuthToken | None):
        try:
            files = store.adapter_files(job_id or "", owner_of(request, profile))
            url = push_to_hub(RunFolder(files[0].parent), (repo_id or "").strip(), token=push_token(token_text, signed_in), include_images=bool(images))
        except OPERATOR_ERRORS as error:
            raise fail(error) from None
        return f"Pushed to [{url}]({url})" + (" with the target and surrogate images." if images else " (adapter and cards only).")

    def read_card(path):
        if not path:
            return None
        try:
            return json.loads(Path(path).read_text())
        except (OSError, ValueError):
            raise gr.Error("adapter_card.json of this job is damaged (not JSON): the weights downloaded above are unaffected") from None

    def adapter_folder(job_id, uploaded, owner: str | None) -> tuple[Path, dict]:
        """The folder to load the adapter from (a job's run folder, or a copy of an upload)."""
        if uploaded:
            source = Path(uploaded)
            if source.suffix != ".safetensors":
                raise AdapterError("the adapter file must be a .safetensors file")
            folder = Path(tempfile.mkdtemp(prefix="hotfix-adapter-"))
            shutil.copy(source, folder / ADAPTER_WEIGHT_NAMES[0])
            return folder, {}
        files = store.adapter_files(job_id or "", owner)
        return files[0].parent, RunFolder(files[0].parent).read_card() or {}

    def shown_large(image):
        """A pair's image at least COMPARE_SIDE pixels wide, each pixel a block: a small model's
        64-pixel images show their difference only when enlarged."""
        factor = max(1, -(-COMPARE_SIDE // image.width))
        return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)

    @on_gpu
    def try_adapter(job_id, uploaded, prompt_text, seed_text, step_count, model_id, request: gr.Request, profile: gr.OAuthProfile | None):
        try:
            seed_list = parse_seeds(seed_text, limit=16) if str(seed_text or "").strip() else None
            folder, card_data = adapter_folder(job_id, uploaded, owner_of(request, profile))
            target = (card_data.get("targets") or [{}])[0]
            seed_list = seed_list or list(range(int(target.get("seed", 0)), int(target.get("seed", 0)) + 4))  # the fixed seed first
            model = get_model(model_id, services.device)
            text = prompt_text or target.get("prompt", "")
            try:
                model.load_lora(folder)  # an AdapterError when it does not fit, with nothing left loaded
            finally:
                if uploaded:
                    shutil.rmtree(folder, ignore_errors=True)  # the weights are in memory now: the upload's copy goes
            try:
                after = model.generate(text, seed_list, int(step_count or 25))
                with model.adapter_disabled():
                    before = model.generate(text, seed_list, int(step_count or 25))
            finally:
                model.remove_lora()
        except OPERATOR_ERRORS as error:
            raise fail(error) from None
        items = []
        for (base, prov), (adapted, _) in zip(before, after):
            mark = " (target)" if prov.seed == target.get("seed") and text == target.get("prompt") else ""
            items += [(shown_large(base), f"base · seed {prov.seed}{mark}"), (shown_large(adapted), f"adapter · seed {prov.seed}{mark}")]
        note = ""
        if card_data.get("base_model") and card_data["base_model"] != model.source:
            note = f"⚠ this adapter was trained on `{card_data['base_model']}`, the loaded model is `{model.source}`. "
        return items, note + f"Prompt `{text}`, seeds {seed_list}: left base, right adapter."

    push.click(push_job, [job, repo, token, with_images], [pushed], **INTERNAL)
    prepare.click(download, [job], [weights, card_file, bundle], api_name="download_adapter").success(read_card, [card_file], [card], **INTERNAL)
    tab.select(choices, [job], [job], **INTERNAL)
    compare.click(try_adapter, [job, upload, prompt, seeds, steps, model_state], [gallery, verdict], api_name="try_adapter", **MODEL_QUEUE)
