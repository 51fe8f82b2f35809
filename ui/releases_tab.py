"""Releases: the fix ledger (the fixed jobs to ship together) and a release that carries them,
every fix re-checked in it (`unlearn_core.ledger`, `unlearn_core.release`)."""

from __future__ import annotations

import secrets
import zipfile

import gradio as gr
import pandas as pd
from PIL import Image

from ui.common import INTERNAL, MODEL_QUEUE, OPERATOR_ERRORS, PIXELS, Services, done_jobs_dropdown, fail, get_model, identity_of, on_gpu, owner_of, push_token, push_token_note, served_copies
from unlearn_core.errors import InvalidInput
from unlearn_core.export import REPO_ID_HELP, push_to_hub
from unlearn_core.images import open_image
from unlearn_core.ledger import Ledger
from unlearn_core.release import make_release
from unlearn_core.runfolder import RunFolder

LEDGER_COLUMNS = ["fix", "prompt", "seed", "r", "other seeds kept", "added by"]
RELEASE_COLUMNS = ["prompt", "seed", "r alone", "r in the release", "verdict"]
THUMB = 96  # the ledger's thumbnails, enlarged from the model's size with sharp pixels


def percent(value) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def ledger_frame(fixes) -> pd.DataFrame:
    return pd.DataFrame([{"fix": fix.id, "prompt": fix.prompt, "seed": fix.seed, "r": percent(fix.r), "other seeds kept": fix.kept, "added by": fix.owner}
                         for fix in fixes], columns=LEDGER_COLUMNS)


def thumbnails(fixes) -> list[tuple[Image.Image, str]]:
    """Target → surrogate → after, fix by fix (what each fix changed)."""
    items = []
    for fix in fixes:
        folder = RunFolder(fix.run_dir)
        for label, path in (("target", folder.training_image("target", 0)), ("surrogate", folder.training_image("surrogate", 0)), ("after", folder.after_image(0))):
            try:
                image = open_image(str(path), label) if path.is_file() else None
            except OPERATOR_ERRORS:  # a damaged picture is left out, not the ledger
                image = None
            if image is None:
                continue
            factor = max(1, THUMB // image.width)
            items.append((image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST), f"{fix.id} · {label}"))
    return items


def release_frame(summary: dict) -> pd.DataFrame:
    return pd.DataFrame([{"prompt": fix["prompt"], "seed": fix["seed"], "r alone": percent(fix["r_alone"]), "r in the release": percent(fix["r_release"]),
                          "verdict": fix["verdict"]} for fix in summary["fixes"]], columns=RELEASE_COLUMNS)


def release_note(summary: dict) -> str:
    kept = ", ".join(f"`{prompt}` {row['kept']}/{row['seeds']}" for prompt, row in summary["integrity"].items())
    head = ("**Every fix holds in the release.**" if not summary["not_holding"]
            else "**Not every fix holds:** " + "; ".join(summary["not_holding"]) + ". Release fewer fixes, or fix that one again.")
    return f"{head} Other seeds kept (SSIM ≥ 0.9): {kept}."


class LazyLedger:
    """The ledger of the services' store, opened on first use (the page is built before it is served)."""

    def __init__(self, store):
        self.store, self.opened = store, None

    def __getattr__(self, name):
        if self.opened is None:
            self.opened = Ledger(self.store.runs_dir)
        return getattr(self.opened, name)


def render(services: Services, tab: gr.Tab) -> None:
    store = services.store
    ledger = LazyLedger(store)
    gr.Markdown("Fixes arrive over weeks. The **ledger** keeps the fixed jobs to ship together; a **release** is one adapter that carries "
                "the chosen fixes (their LoRAs side by side, so each one's change is kept exactly) and re-checks every fix in it, with the "
                "other seeds of each prompt a fix touched.")
    with gr.Row():
        job = gr.Dropdown([], label="A finished job whose verdict is fixed", allow_custom_value=True, elem_id="rel-job", scale=4)
        add = gr.Button("Add to the ledger", variant="primary", elem_id="rel-add", scale=1)
    table = gr.Dataframe(ledger_frame([]), label="The ledger", interactive=False, elem_id="rel-ledger")
    gallery = gr.Gallery(label="target → surrogate → after, fix by fix", columns=6, height="auto", allow_preview=False, format="png", elem_classes=PIXELS, elem_id="rel-thumbs")
    chosen = gr.CheckboxGroup([], label="Fixes in the release", elem_id="rel-chosen")
    with gr.Row():
        make = gr.Button("Make release", variant="primary", elem_id="rel-make")
        retire = gr.Button("Retire the checked fixes", elem_id="rel-retire")
    note = gr.Markdown("", elem_id="rel-note")
    result = gr.Dataframe(pd.DataFrame(columns=RELEASE_COLUMNS), label="Each fix in the release", interactive=False, elem_id="rel-result")
    bundle = gr.File(label="The release (zip: diffusers and kohya files, model card, release.json)", interactive=False, elem_id="rel-zip")
    made = gr.State(None)  # the last release's folder
    with gr.Accordion("Push the release to the Hugging Face Hub", open=False):
        with gr.Row():
            repo = gr.Textbox("", label="Model repository", placeholder=REPO_ID_HELP, elem_id="rel-repo", scale=3)
            token = gr.Textbox("", label="Your token with write access (empty: your Hugging Face sign-in's)", type="password", elem_id="rel-token", scale=3,
                               info=push_token_note())
        push = gr.Button("Push (private repository)", elem_id="rel-push")
        pushed = gr.Markdown("", elem_id="rel-pushed")

    def views(owner):
        fixes = ledger.list(owner)
        ids = [fix.id for fix in fixes]
        return ledger_frame(fixes), thumbnails(fixes), gr.update(choices=ids, value=ids)

    def refresh(current, request: gr.Request, profile: gr.OAuthProfile | None):
        owner = owner_of(request, profile)
        return (done_jobs_dropdown(store, owner, current), *views(owner))

    def add_fix(job_id, request: gr.Request, profile: gr.OAuthProfile | None):
        owner = owner_of(request, profile)
        try:
            files = store.adapter_files(job_id or "", owner)
            fix = ledger.add(files[0].parent, owner=identity_of(request, profile))
        except OPERATOR_ERRORS as error:
            raise fail(error) from None
        gr.Info(f"fix {fix.id} added: {fix.prompt!r} seed {fix.seed}")
        return views(owner)

    def retire_fixes(ids, request: gr.Request, profile: gr.OAuthProfile | None):
        owner = owner_of(request, profile)
        try:
            for fix_id in ids or []:
                ledger.retire(fix_id, owner)
        except OPERATOR_ERRORS as error:
            raise fail(error) from None
        return views(owner)

    @on_gpu
    def release(ids, request: gr.Request, profile: gr.OAuthProfile | None, progress=gr.Progress()):
        owner = owner_of(request, profile)
        try:
            if not ids:
                raise InvalidInput("check at least one fix of the ledger")
            fixes = [ledger.get(fix_id, owner) for fix_id in ids]
            progress(0.1, desc=f"merging {len(fixes)} fixes, then re-checking each")
            model = get_model(fixes[0].model, services.device)
            out = store.runs_dir / "releases" / secrets.token_urlsafe(8)
            summary = make_release([fix.run_dir for fix in fixes], out, model=model)
        except OPERATOR_ERRORS as error:
            raise fail(error) from None
        archive = out / "release.zip"
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zipped:
            for path in sorted(out.iterdir()):
                if path != archive:
                    zipped.write(path, arcname=path.name)
        return release_note(summary), release_frame(summary), served_copies([archive])[0], str(out)

    def push_release(folder, repo_id, token_text, request: gr.Request, profile: gr.OAuthProfile | None, signed_in: gr.OAuthToken | None):
        """The last release, as a job's adapter is pushed: with the visitor's token, never the server's."""
        try:
            if not folder:
                raise InvalidInput("make a release first")
            url = push_to_hub(RunFolder(folder), (repo_id or "").strip(), token=push_token(token_text, signed_in))
        except OPERATOR_ERRORS as error:
            raise fail(error) from None
        return f"Pushed to [{url}]({url})."

    tab.select(refresh, [job], [job, table, gallery, chosen], **INTERNAL)
    add.click(add_fix, [job], [table, gallery, chosen], **INTERNAL)
    retire.click(retire_fixes, [chosen], [table, gallery, chosen], **INTERNAL)
    make.click(release, [chosen], [note, result, bundle, made], api_name="make_release", **MODEL_QUEUE)
    push.click(push_release, [made, repo, token], [pushed], **INTERNAL)
