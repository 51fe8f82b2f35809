"""Hotfix Studio web app: composes the tabs and launches.

    python app.py            # http://127.0.0.1:7860  (or: hotfix-studio app)

Settings come from the environment once, at start-up (`unlearn_core.settings`). No model is
loaded until first used.
"""

from __future__ import annotations

import atexit
import signal
import sqlite3
import tempfile

from unlearn_core.settings import use_persistent_hub_cache

use_persistent_hub_cache()  # before gradio imports huggingface_hub, which reads HF_HOME once

import gradio as gr  # noqa: E402

from ui import adapters_tab, generate_tab, login, releases_tab, results_tab, surrogate_tab, unlearn_tab
from ui.common import PAGE_CSS, Services, guard_handlers, model_picker, refuse_non_finite
from unlearn_core import settings as settings_module
from unlearn_core.accounts import Accounts, LoginLimiter, read_users
from unlearn_core.store import JobStore
from unlearn_core.workers import build_pool

MAX_FILE_SIZE = "20mb"
QUEUE_MAX_SIZE = 64  # events waiting at once; more are refused with "the queue is full"
# Gradio keeps every upload and every file a handler returns in its temporary folder; every 10 minutes
# those older than an hour are deleted (all of them when the server stops). A job copies its images into
# its run folder when it is queued, so only an upload left unused for an hour is lost.
DELETE_CACHE = (600, 3600)  # (how often, how old) in seconds: gr.Blocks(delete_cache=...)
ZERO_GPU_NOTE = ("**On ZeroGPU** every part runs on the GPU inside `spaces.GPU` calls. An unlearning job runs as a chain of GPU "
                 "slots of {slot:.0f} s: each slot goes on from the last one's checkpoint, and a job may wait for a GPU between slots.")


def instruction_tab(model_state: gr.State) -> None:
    """The instruction-forgetting analysis, built by its own module on the page's model."""
    from ui import instruction_tab as module  # this function's name shadows the module at top level

    module.render(model_state)


def build(services: Services) -> gr.Blocks:
    with gr.Blocks(title="Hotfix Studio", delete_cache=DELETE_CACHE) as demo:
        gr.Markdown("# Hotfix Studio\nRemove one specific bad output of a diffusion model with a small LoRA: "
                    "generate → flag → surrogate → unlearn → inspect → export.")
        if settings_module.current().zero_gpu:
            gr.Markdown(ZERO_GPU_NOTE.format(slot=settings_module.current().gpu_slot_s), elem_id="zero-gpu-note")
        if settings_module.current().hf_oauth:  # a Space with hf_oauth: jobs belong to the signed-in account, across sessions
            gr.LoginButton(elem_id="hf-login")
        model_state = model_picker(services.device)
        target_state = gr.State(None)
        surrogate_state = gr.State(None)
        with gr.Tabs():
            with gr.Tab("Generate & flag", elem_id="tab-generate"):
                generate_tab.render(services, model_state, target_state)
            with gr.Tab("Surrogate", elem_id="tab-surrogate"):
                surrogate_tab.render(services, model_state, target_state, surrogate_state)
            with gr.Tab("Unlearn", elem_id="tab-unlearn"):
                unlearn_tab.render(services, model_state, target_state, surrogate_state)
            with gr.Tab("Results", elem_id="tab-results") as tab:
                results_tab.render(services, tab)
            with gr.Tab("Adapters", elem_id="tab-adapters") as tab:
                adapters_tab.render(services, model_state, tab)
            with gr.Tab("Releases", elem_id="tab-releases") as tab:
                releases_tab.render(services, tab)
            with gr.Tab("Instruction forgetting", elem_id="tab-instruction"):
                instruction_tab(model_state)
    refuse_non_finite(demo.blocks.values())
    guard_handlers(demo)  # every handler's error message leaves through ui.messages.fail: no server paths, no raw bug text
    return demo


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM shuts down like Ctrl-C: Gradio closes, then atexit stops the worker


def open_store(settings: settings_module.Settings) -> tuple[JobStore, list[str]]:
    """The job store in HOTFIX_RUNS_DIR, checked writable, and the jobs whose lease had expired
    (now interrupted); a folder that cannot be made or written ends the start with one line
    naming the variable to set, not a traceback."""
    try:
        store = JobStore(settings.runs_dir, max_job_work=settings.max_job_work, max_pending_per_owner=settings.max_pending_per_owner,
                         lease_s=settings.lease_s, max_queued=settings.max_queued, max_pending_per_address=settings.max_pending_per_address)
        with tempfile.TemporaryFile(dir=store.jobs_dir):  # job folders are written here
            pass
        interrupted = store.expire_leases()  # writes the database; the worker goes on sweeping: a job whose server dies later is marked too
    except (OSError, sqlite3.Error) as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise SystemExit(f"hotfix-studio: cannot write the runs folder {settings.runs_dir} ({reason}); "
                         "set HOTFIX_RUNS_DIR to a folder this server may write") from None
    return store, interrupted


def preload_for_zero_gpu(device: str) -> None:
    """ZeroGPU wants the weights loaded, and moved to "cuda", when the server starts, not inside a
    GPU call: the page's model and the jobs' copy (each GPU slot of a job starts from it, unchanged)."""
    from ui.common import get_model
    from unlearn_core.config import DEMO_MODEL
    from unlearn_core.job_process import warm_up

    get_model(DEMO_MODEL, device)
    warm_up(DEMO_MODEL, device)


def main() -> None:
    settings = settings_module.use(settings_module.Settings.from_env())
    if settings.zero_gpu:
        print(ZERO_GPU_NOTE.format(slot=settings.gpu_slot_s).replace("**", "").replace("`", ""))
        preload_for_zero_gpu(settings.device)
    accounts = Accounts(read_users(settings.users_file) if settings.users_file else {}, settings.admins, settings.login,
                        LoginLimiter(settings.login_failures, settings.login_window_s))
    store, interrupted = open_store(settings)
    if interrupted:
        print(f"marked {len(interrupted)} job(s) interrupted, their server stopped renewing its lease: {', '.join(interrupted)}")
    device = settings.device
    worker = build_pool(store, settings).start()
    atexit.register(worker.stop)  # a running job's process is stopped and its job marked interrupted
    signal.signal(signal.SIGTERM, _interrupt)
    demo = build(Services(store, worker, device))
    demo.queue(default_concurrency_limit=4, max_size=QUEUE_MAX_SIZE).launch(
        server_name=settings.host,
        server_port=settings.port,
        auth=login.auth_function(accounts) if accounts.required else None,  # the password check runs off the event loop, rate-limited
        app_kwargs={"middleware": login.MIDDLEWARE},
        max_file_size=MAX_FILE_SIZE,
        # No allowed_paths: nothing of the runs folder (flagged targets, logs) is served by its path.
        # A handler's file output reaches its caller through Gradio's cache, under an unguessable name.
        footer_links=["api"],
        css=PAGE_CSS,
        show_error=True,  # unexpected errors reach the operator as a message, not a bare "Error"
    )


def entry(argv: list[str] | None = None) -> int:
    """`hotfix-studio` (or `hotfix-studio app`) launches the app; `hotfix-studio VERB ...` runs the
    CLI verb (generate, surrogate, unlearn, evaluate, probe)."""
    import sys

    from unlearn_core import cli

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] == "app":
        main()
        return 0
    return cli.entry(argv)


if __name__ == "__main__":
    main()
