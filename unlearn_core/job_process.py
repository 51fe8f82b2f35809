"""The job process: `python -m unlearn_core.worker RUN_DIR [--device D]` (or `--wait [--preload
MODEL]`, warmed up before it is handed its run folder on stdin) runs one run folder: reads its
`config.json`, loads the model, trains, saves and evaluates (`unlearn_core.run`), and records its
state in the folder's `status.json`, of which it is the only writer. The CLI's `unlearn` verb calls
the same `execute`. `unlearn_core.worker` starts and watches these processes. Never imports gradio."""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time

from unlearn_core.distributed import is_main_process
from unlearn_core.errors import OperatorError, without_server_paths
from unlearn_core.runfolder import RunFolder

EXIT_FAILED, EXIT_CANCELLED = 2, 3


# -- the job process ------------------------------------------------------------------------------
def execute(folder: RunFolder, device: str = "auto", display=None, web: bool = False, fresh_cancel: bool = True) -> dict:
    """Run the request in `folder` to its end; `status.json` follows every phase and step.

    `display` (a `RunCallbacks`) also sees each phase and step, e.g. the CLI's progress bar. `web`:
    the job came from the web, so its model name follows the web's rules (`models.check_web_model`).
    Raises what ended the run (after recording it): `TrainingCancelled`, `TrainingDiverged`, an
    `OperatorError`, or a bug; `TrainingPaused` when `display` asked it to stop at a checkpoint.
    """
    from unlearn_core.config import InstanceTarget, UnlearnConfig, max_training_steps
    from unlearn_core.models import load_model
    from unlearn_core.run import RunCallbacks, run_unlearning
    from unlearn_core.trainer import TrainingCancelled, TrainingPaused

    request = folder.read_request()
    config = UnlearnConfig.from_dict(request["config"])
    targets = [InstanceTarget(**target) for target in request["targets"]]
    steps = {"step": 0, "total": max_training_steps(config)}  # one total, the most the job may train: it never changes; and where it runs, once known
    main = is_main_process()  # under torchrun only the main process records the status

    def record(state, **extra):
        if main:
            folder.write_status(state, pid=os.getpid(), **extra)  # the process running it (a job process, or a Ray actor's)

    phase = {}  # the phase now, when it began, and the remember set's count

    def on_step(report):
        steps.update(step=report.step)
        record("running", **phase, **steps)

    def on_phase(name):
        phase.clear()
        phase.update(phase=name, phase_started=time.time())
        record("running", **phase, **steps)

    def on_images(done, total):  # the remember set's count, so its phase never looks hung
        phase.update(images_done=done, images_total=total)
        record("running", **phase, **steps)

    if main and fresh_cancel:  # a GPU slot after the first keeps a cancel asked meanwhile
        folder.clear_cancel()
    on_phase("loading")
    callbacks = RunCallbacks(on_step=on_step, on_phase=on_phase, should_stop=folder.cancel_requested, on_images=on_images).then(display)
    try:
        model = _take_preloaded(request["model"], device, web) or load_model(request["model"], device, web=web)
        steps["ran_on"] = f"{model.device} on {socket.gethostname()}"  # a worker's device, or a Ray node's
        result = run_unlearning(model, targets, config, folder, callbacks)
    except TrainingCancelled as error:
        record("cancelled", error=str(error), **steps)
        raise
    except TrainingPaused:  # at a checkpoint, at the end of a GPU slot: the next slot goes on
        record("running", phase="waiting for a GPU slot", phase_started=time.time(), **steps)
        raise
    except Exception as error:
        record("failed", error=str(error) if isinstance(error, OperatorError) else without_server_paths(f"{type(error).__name__}: {error}"), **steps)
        raise
    record("done", **{**steps, "step": int(result["summary"].get("steps_run", steps["step"]))})  # the steps trained: the early stop may end before the total
    return result


_preloaded: dict[tuple[str, str], object] = {}  # (model name, device) → the model a waiting job process loaded


def _take_preloaded(name: str, device: str, web: bool):
    """The model this process loaded while it waited, if the job asks for that one (under the same
    web rules as `load_model`); None otherwise. Taken once: one job per process."""
    from unlearn_core.models import check_web_model

    model = _preloaded.pop((name, device), None)
    if model is not None and web:
        check_web_model(name)
    return model


def warm_up(preload: str | None, device: str) -> None:
    """What every job needs before its run folder is known: the heavy imports and, when given, the
    server's default model. A model that fails to load here is loaded (and its error reported) by the job."""
    import importlib

    from unlearn_core.models import ModelLoadError, load_model

    importlib.import_module("unlearn_core.run")  # torch, diffusers, peft, accelerate and the trainer
    if preload:
        try:
            _preloaded[(preload, device)] = load_model(preload, device)
        except ModelLoadError as error:
            print(f"not preloaded: {error}", file=sys.stderr, flush=True)


def write_output_to(path) -> None:
    """Send this process's stdout and stderr (file descriptors 1 and 2, so library output too) to the job's log."""
    sys.stdout.flush()
    sys.stderr.flush()
    with open(path, "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)


def main(argv=None) -> int:
    from unlearn_core.trainer import TrainingCancelled, TrainingDiverged

    parser = argparse.ArgumentParser(prog="python -m unlearn_core.worker", description="Run one job's run folder (written by the job store).")
    parser.add_argument("run_dir", nargs="?", help="the run folder (with --wait: read from stdin instead)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--wait", action="store_true", help="import and load the model first, then read the run folder from stdin")
    parser.add_argument("--preload", default=None, help="with --wait: the model to load while waiting")
    args = parser.parse_args(argv)
    if args.wait:
        warm_up(args.preload, args.device)
        args.run_dir = sys.stdin.readline().strip()
        if not args.run_dir:
            return 0  # the server stopped before it had a job for this process
        write_output_to(RunFolder(args.run_dir).worker_log)
    if not args.run_dir:
        parser.error("give the run folder")
    try:
        execute(RunFolder(args.run_dir), args.device, web=True)  # the server's jobs: every one came from the web
    except TrainingCancelled as error:
        print(f"cancelled: {error}", file=sys.stderr)
        return EXIT_CANCELLED
    except (OperatorError, TrainingDiverged) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_FAILED
    return 0
