"""Hotfix Studio web app: composes the tabs and launches (DESIGN §1).

    python app.py            # http://127.0.0.1:7860

Environment: HOTFIX_HOST, HOTFIX_PORT, HOTFIX_RUNS_DIR (default ./runs), HOTFIX_DEVICE (auto),
HOTFIX_USERNAME + HOTFIX_PASSWORD (optional login). No model is loaded until first used.
"""

from __future__ import annotations

import atexit
import os
import signal
from pathlib import Path

import gradio as gr

from unlearn_core.jobs import JobStore, JobWorker
from ui import adapters_tab, generate_tab, results_tab, surrogate_tab, unlearn_tab
from ui.common import Services, model_picker, refuse_non_finite

ROOT = Path(__file__).resolve().parent
MAX_FILE_SIZE = "20mb"


def instruction_tab() -> None:
    """The instruction-forgetting analysis, built by its own module (with a fallback if it is missing)."""
    try:
        from ui import instruction_tab as module

        module.render()
    except Exception as error:  # the tab is optional: the rest of the app must still work
        gr.Markdown(f"The instruction-forgetting tab is not available on this server: `{type(error).__name__}: {error}`", elem_id="ins-unavailable")


def build(services: Services) -> gr.Blocks:
    with gr.Blocks(title="Hotfix Studio") as demo:
        gr.Markdown("# Hotfix Studio\nRemove one specific bad output of a diffusion model with a small LoRA: "
                    "generate → flag → surrogate → unlearn → inspect → export.")
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
            with gr.Tab("Instruction forgetting", elem_id="tab-instruction"):
                instruction_tab()
    refuse_non_finite(demo.blocks.values())
    return demo


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM shuts down like Ctrl-C: Gradio closes, then atexit stops the worker


def main() -> None:
    runs_dir = Path(os.environ.get("HOTFIX_RUNS_DIR", "runs")).resolve()
    os.chdir(ROOT)  # model ids like assets/demo-model are relative to the project
    store = JobStore(runs_dir)
    interrupted = store.mark_interrupted()
    if interrupted:
        print(f"marked {len(interrupted)} job(s) interrupted by the last shutdown: {', '.join(interrupted)}")
    device = os.environ.get("HOTFIX_DEVICE", "auto")
    worker = JobWorker(store, device).start()
    atexit.register(worker.stop)  # a running job's process is stopped and its job marked interrupted
    signal.signal(signal.SIGTERM, _interrupt)
    demo = build(Services(store, worker, device))
    user, password = os.environ.get("HOTFIX_USERNAME"), os.environ.get("HOTFIX_PASSWORD")
    demo.queue(default_concurrency_limit=4).launch(
        server_name=os.environ.get("HOTFIX_HOST", "127.0.0.1"),
        server_port=int(os.environ.get("HOTFIX_PORT", "7860")),
        auth=(user, password) if user and password else None,
        max_file_size=MAX_FILE_SIZE,
        allowed_paths=[str(store.jobs_dir)],
        footer_links=["api"],
        show_error=True,  # unexpected errors reach the operator as a message, not a bare "Error"
    )


if __name__ == "__main__":
    main()
