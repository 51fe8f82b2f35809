"""Small helpers shared by the tabs: the model cache, error reporting, table shaping."""

from __future__ import annotations

import atexit
import base64
import binascii
import functools
import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import gradio.component_meta
import pandas as pd
from PIL import Image, UnidentifiedImageError

from ui.messages import UNEXPECTED, fail, guard_handlers, guarded, plain  # noqa: F401  (the tabs and app.py import them from here)
from unlearn_core import settings
from unlearn_core.config import DEMO_MODEL
from unlearn_core.errors import DamagedRunFile, ImageError, InvalidInput, OperatorError
from unlearn_core.images import check_header
from unlearn_core.models import DiffusionModel, load_model
from unlearn_core.runfolder import RunFolder
from unlearn_core.store import JobStore
from unlearn_core.worker import JobWorker
from unlearn_core.workers import WorkerPool

# Every event that runs the model shares one queue slot: a pipeline is not thread-safe, and the
# adapter tab attaches a LoRA for the length of its call.
MODEL_QUEUE = {"concurrency_id": "model", "concurrency_limit": 1}
INTERNAL = {"api_visibility": "undocumented"}
PIXELS = ["pixels"]  # elem_classes of components that show model images (see PAGE_CSS)
# Small model images (the demo's are 64 px) fill their frame with sharp pixels instead of sitting
# at native size in a large box; gallery captions sit under the thumbnail instead of over it.
PAGE_CSS = """
.pixels img { image-rendering: pixelated; }
.pixels .image-frame img { object-fit: contain; }
.pixels .thumbnail-item { flex-direction: column; justify-content: flex-start; }
.pixels .thumbnail-item img { height: calc(100% - 1.6em) !important; width: 100%; object-fit: contain; }
.pixels .thumbnail-item .caption-label { position: static; max-width: 100%; opacity: 1; border: none; background: none; padding: 2px 0 0 0; line-height: 1.4em; }
"""
OPERATOR_ERRORS = (OperatorError,)  # anything else is a bug: Gradio shows it as one


@dataclass(frozen=True)
class Services:
    """What the tabs share, built once by app.py: the job store, its worker and the device."""

    store: JobStore
    worker: JobWorker | WorkerPool  # wake() after a submit
    device: str = "auto"


@functools.lru_cache(maxsize=1)  # one model copy per server process (a second model id replaces the first)
def _load(model_id: str, device: str) -> DiffusionModel:
    return load_model(model_id, device, web=True)


def get_model(model_id: str | None, device: str = "auto") -> DiffusionModel:
    """Load lazily and keep the most recent model (raises `ModelLoadError`)."""
    return _load((model_id or DEMO_MODEL).strip(), device)


def _image_sources(component, payload) -> list:
    """The files (paths) and blobs (bytes) a payload of a `gr.Image` or `gr.ImageEditor` carries,
    before Gradio opens any of them: a FileData's path, a data: URL's bytes, the canvas's blobs."""
    if payload is None:
        return []
    if isinstance(component, gr.ImageEditor):
        blobs = component.blob_storage.get(payload.id) if getattr(payload, "id", None) is not None else None
        parts = blobs if blobs is not None else payload
        items = [parts.background, *(parts.layers or []), parts.composite]
    else:
        items = [payload]
    sources = []
    for item in items:
        if item is None:
            continue
        if isinstance(item, (bytes, bytearray, memoryview)):
            sources.append(bytes(item))
        elif isinstance(getattr(item, "url", None), str) and item.url.startswith("data:"):
            try:
                sources.append(base64.b64decode(item.url.split(",", 1)[-1], validate=False))
            except (ValueError, binascii.Error):
                raise ImageError("not an image: the data URL is not base64") from None
        elif getattr(item, "path", None):
            sources.append(item.path)
    return sources


def _checked_preprocess(component, payload, name: str, original):
    """Every image of the payload checked by `unlearn_core.images.check_header` before Gradio decodes
    anything: a decompression bomb (a small file declaring a huge picture) is refused with a plain
    message in milliseconds. What Gradio's own opening still refuses becomes an operator message
    instead of "could not preprocess"."""
    try:
        for source in _image_sources(component, payload):
            check_header(source, name)
    except ImageError as error:
        if isinstance(component, gr.ImageEditor) and getattr(payload, "id", None) is not None:
            component.blob_storage.pop(payload.id, None)  # the refused blobs are not kept in memory
        raise fail(error) from None
    try:
        return original(payload)
    except gr.Error:
        raise
    except Image.DecompressionBombError as error:
        raise fail(f"{name}: image is too large to open safely ({error})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise fail(f"{name}: not an image file PIL can read ({error})") from None


# Subclasses, not a patched instance: Gradio rebuilds a component of a session's state from its
# class and constructor arguments whenever a handler returns gr.update()/gr.skip() for it, and a
# patched `preprocess` would be lost there. `is_template` keeps the frontend component of the base.
# Gradio writes a type stub (ui/common.pyi) next to the module of every component class it sees
# defined; these two add no events, so that write is switched off while they are defined.
_write_stub, gradio.component_meta.create_or_modify_pyi = gradio.component_meta.create_or_modify_pyi, lambda *args: None
try:
    class CheckedImage(gr.Image):
        """A `gr.Image` input whose file's header is checked before Gradio opens it."""

        is_template = True

        def preprocess(self, payload):
            return _checked_preprocess(self, payload, (self.label or "image").split("(")[0].strip(), super().preprocess)

    class CheckedImageEditor(gr.ImageEditor):
        """A `gr.ImageEditor` (the paint canvas) whose background, layers and composite are header-checked
        before Gradio decodes them (it always decodes and converts a canvas image, whatever its `type`)."""

        is_template = True

        def preprocess(self, payload):
            return _checked_preprocess(self, payload, "canvas", super().preprocess)
finally:
    gradio.component_meta.create_or_modify_pyi = _write_stub


def image_input(label: str, **kwargs) -> gr.Image:
    """A `gr.Image` input handed to the handler as the uploaded file, untouched.

    `image_mode=None` stops Gradio from decoding and converting the upload itself (which would
    load a decompression bomb in full, clip 16-bit images and drop alpha); `unlearn_core.images`
    then checks and converts it. Its header is checked first (`CheckedImage`).
    """
    return CheckedImage(label=label, type="filepath", image_mode=None, **kwargs)


def refuse_non_finite(blocks) -> None:
    """Every Number and Slider input refuses NaN and ±inf with its label (the API accepts the JSON
    literals NaN/Infinity; Gradio's own rounding would fail with "could not preprocess")."""
    for block in blocks:
        if not isinstance(block, (gr.Number, gr.Slider)):
            continue
        original, label = block.preprocess, block.label or "number"

        def preprocess(payload, original=original, label=label):
            if isinstance(payload, float) and not math.isfinite(payload):
                raise gr.Error(f"{label}: must be a finite number, got {payload}")
            return original(payload)

        block.preprocess = preprocess


def loss_frame(run_dir: str | None) -> pd.DataFrame | None:
    """loss_log.csv in long form (step, loss, curve) for gr.LinePlot; None while there is no row
    (an empty DataFrame as a plot's value stops Gradio 6 from drawing later updates)."""
    try:
        rows = RunFolder(run_dir).read_loss_log() if run_dir else []
    except DamagedRunFile:  # progress() names the file; the plot stays empty
        rows = []
    if not rows:
        return None
    records = [{"step": int(r["step"]), "loss": r["loss_forget"], "curve": "forget loss"} for r in rows]
    records += [{"step": int(r["step"]), "loss": r["loss_remember"], "curve": "remember loss"} for r in rows]
    return pd.DataFrame(records, columns=["step", "loss", "curve"])


def loss_plot(run_dir: str | None, steps: int):
    """The loss chart's update: the log, on a step axis from 0 to `steps` (at least 10). A fixed
    axis does not jump as rows arrive, and a span of 10 or more keeps Vega's ticks on whole steps
    (gr.LinePlot has no integer-tick option; a 3-step log gets ticks at 0.5)."""
    return gr.update(value=loss_frame(run_dir), x_lim=[0, max(int(steps or 0), 10)])


def signed_in_user(profile: gr.OAuthProfile | None) -> str | None:
    """The Hugging Face account signed in with the Space's LoginButton, or None. Gradio passes the
    profile to any handler with a `profile: gr.OAuthProfile | None` parameter (None when nobody is
    signed in, or the sign-in has expired); every handler that asks who its caller is has one."""
    return getattr(profile, "username", None) or None


def identity_of(request: gr.Request | None, profile: gr.OAuthProfile | None = None) -> str:
    """Who the caller is: the logged-in user, else the Hugging Face account signed in on a Space,
    else this browser session or API client (its session hash). A job records it as its owner."""
    username = getattr(request, "username", None) if request is not None else None
    if username:
        return f"user:{username}"
    hf_user = signed_in_user(profile)
    if hf_user:
        return f"hf:{hf_user}"
    session = getattr(request, "session_hash", None) if request is not None else None
    return f"session:{session}" if session else "session:unknown"


def client_address(request: gr.Request | None) -> str:
    """The caller's network address: the first address of X-Forwarded-For where the server sits
    behind a proxy that sets it (a Hugging Face Space, or HOTFIX_TRUST_PROXY=1; elsewhere a
    client could write the header itself), else the connection's own address."""
    if request is None:
        return ""
    if settings.current().trust_proxy:
        forwarded = (request.headers.get("x-forwarded-for") or "").split(",")[0].strip()
        if forwarded:
            return forwarded[:64]
    client = getattr(request, "client", None)
    return str(getattr(client, "host", "") or "")


def check_may_train(request: gr.Request | None, profile: gr.OAuthProfile | None) -> None:
    """Refuse training to an anonymous visitor where sign-in is required (HOTFIX_REQUIRE_SIGN_IN, on
    by default on a Space with "Sign in with Hugging Face"): they may still generate and paint."""
    if settings.current().requires_sign_in and identity_of(request, profile).startswith("session:"):
        how = " with the Sign in with Hugging Face button at the top of the page" if settings.current().hf_oauth else ""
        raise InvalidInput(f"sign in{how} to train: on this server, visitors who have not signed in may generate and make surrogates, but not start jobs")


def anonymous_address(request: gr.Request | None, profile: gr.OAuthProfile | None = None) -> str:
    """The address a job of this caller counts toward (HOTFIX_MAX_PENDING_PER_ADDRESS): an
    anonymous visitor's, whose session hash it may renew at will; '' for a signed-in account."""
    return client_address(request) if identity_of(request, profile).startswith("session:") else ""


def owner_of(request: gr.Request | None, profile: gr.OAuthProfile | None = None) -> str | None:
    """Whose jobs this caller sees and acts on: their own, or None (every job) for a user (or a
    Hugging Face account) named in HOTFIX_ADMINS."""
    name = (getattr(request, "username", None) if request is not None else None) or signed_in_user(profile)
    return None if name and name in settings.current().admins else identity_of(request, profile)


def push_token(typed: str | None, signed_in: gr.OAuthToken | None) -> str | None:
    """The token a push from the web uses: the one the visitor typed, else their own Hugging Face
    sign-in's (a Space's "Sign in with Hugging Face", with the write scopes of its `hf_oauth_scopes`).
    The server's own token (HF_TOKEN, `hf auth login`) only on a server that listens on loopback and
    whose owner opted in (HOTFIX_PUSH_WITH_SERVER_TOKEN=1): None is returned then, and the Hub client
    finds it. Any other push without a token of the visitor's is refused: a visitor of a server others
    can reach never writes with its owner's token."""
    token = (typed or "").strip() or (signed_in.token if signed_in is not None else "")
    if token:
        return token
    if settings.current().web_pushes_with_server_token:
        return None
    raise InvalidInput("sign in with Hugging Face, or paste a token with write access: this server does not push with its own token")


def push_token_note() -> str:
    if settings.current().web_pushes_with_server_token:
        return "empty, without a sign-in: this server's own token (HOTFIX_PUSH_WITH_SERVER_TOKEN, on loopback only)"
    return "never the server's token: without a sign-in or a token of yours, nothing is pushed"


JOB_COLUMNS = ["job", "state", "step", "prompt", "seed", "method", "model", "worker", "error"]


def job_table(store: JobStore, owner: str | None) -> pd.DataFrame:
    """The owner's jobs (all for an admin), newest first, for gr.Dataframe."""
    rows = []
    for job in store.list(owner=owner):
        target = job.targets[0] if job.targets else {}
        rows.append({
            "job": job.id,
            "state": job.state,
            "step": f"{job.step}/{job.total}",
            "prompt": target.get("prompt", ""),
            "seed": target.get("seed", ""),
            "method": job.config.get("method", ""),
            "model": job.model,
            "worker": job.runner.rsplit("/", 1)[-1] if job.runner else "",  # the device (cpu, cuda:1) or Ray slot of the worker that took it
            "error": job.error[:120],
        })
    return pd.DataFrame(rows, columns=JOB_COLUMNS)


def job_choices(store: JobStore, owner: str | None, only_done: bool = False) -> list[tuple[str, str]]:
    """(label, id) pairs of the owner's jobs for a job dropdown."""
    choices = []
    for job in store.list(owner=owner):
        if only_done and job.state != "done":
            continue
        target = job.targets[0] if job.targets else {}
        choices.append((f"{job.id} · {job.state} · {target.get('prompt', '')!r} seed {target.get('seed', '')}", job.id))
    return choices


def done_jobs_dropdown(store: JobStore, owner: str | None, current: str | None):
    """A dropdown's update listing the owner's finished jobs, keeping `current` when it is one of them."""
    options = job_choices(store, owner, only_done=True)
    ids = [value for _, value in options]
    return gr.update(choices=options, value=current if current in ids else (ids[0] if ids else None))


SERVE_DIR = Path(tempfile.mkdtemp(prefix="hotfix-serve-"))  # this process's copies of run files for download
atexit.register(shutil.rmtree, SERVE_DIR, ignore_errors=True)
SERVED_FOR_S = 900


def served_copies(paths: list[Path]) -> list[str]:
    """Copies of run files for a handler to return (Gradio copies them on into its cache).

    The runs folder is never served by path (it holds the flagged targets), and it may lie where
    Gradio does not take outputs from (e.g. a /data volume): a copy under the system's temp folder
    works everywhere. Copies older than SERVED_FOR_S are removed as new ones are made, and the
    folder goes when the server stops."""
    now = time.time()
    for old in SERVE_DIR.iterdir():
        if now - old.stat().st_mtime > SERVED_FOR_S:
            shutil.rmtree(old, ignore_errors=True)
    folder = Path(tempfile.mkdtemp(dir=SERVE_DIR))
    return [str(shutil.copy2(path, folder / Path(path).name)) for path in paths]


def pretty(data) -> str:
    return json.dumps(data, indent=2, default=str)


def on_gpu(fn):
    """`spaces.GPU` where the `spaces` package exists (Hugging Face ZeroGPU), else unchanged."""
    try:
        import spaces
    except ImportError:
        return fn
    return spaces.GPU(fn)


def model_picker(device: str = "auto") -> gr.State:
    """The model box at the top of the page; returns the session's loaded-model id.

    No load button: the model loads on first use anyway. Enter in the box loads it now (to check
    an id and see its family and size); leaving the box with a new id does the same."""
    box = gr.Textbox(DEMO_MODEL, label="Model", info="Hugging Face model id (owner/name), or a local diffusers folder where this server allows it; press Enter to load and check it now, otherwise it loads on first use",
                     elem_id="model-id")
    status = gr.Markdown(f"Model: `{DEMO_MODEL}`.", elem_id="model-status")  # the box's info says when it loads; this line would go stale
    state = gr.State(DEMO_MODEL)

    @on_gpu
    def load(model_id: str, previous: str):
        try:
            model = get_model(model_id, device)
        except OPERATOR_ERRORS as error:
            gr.Warning(plain(f"{error} — still using {previous}."))
            return previous, plain(f"Could not load `{model_id}`: {error}\n\nStill using `{previous}`.")
        width, height = model.image_size
        return model.source, f"Model: `{model.source}` · {model.family} · {model.prediction_type} · {width}×{height}"

    def load_if_new(model_id: str, previous: str):
        if (model_id or DEMO_MODEL).strip() == previous:
            return gr.skip(), gr.skip()
        return load(model_id, previous)

    box.submit(load, [box, state], [state, status], **MODEL_QUEUE, **INTERNAL)
    box.blur(load_if_new, [box, state], [state, status], **MODEL_QUEUE, **INTERNAL)
    return state
