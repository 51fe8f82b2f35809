"""The worker: runs queued jobs, each in its own process, on run folders.

- The job process, `python -m unlearn_core.worker RUN_DIR [--device D]`: reads the folder's
  `config.json`, loads the model, trains, saves and evaluates (`unlearn_core.run`), and records its
  state in the folder's `status.json` (it is the only writer of that file). The CLI's `unlearn`
  verb calls the same `execute`.
- `JobWorker`, in the server: one background thread per device. It claims queued jobs in order and
  runs each as a job process, so a crash or a hung model never takes the server down; it copies
  step/total into the store and turns the process's end into the job's state. Cancelling sets the
  folder's cancel flag (the process checkpoints and stops); a process that does not stop within
  `CANCEL_GRACE_S` is killed.

Never imports gradio.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import threading
import time

from unlearn_core.distributed import is_main_process
from unlearn_core.errors import OperatorError, without_server_paths
from unlearn_core.runfolder import RunFolder
from unlearn_core.store import Job, JobStore, this_runner

CANCEL_GRACE_S = 8.0
EXIT_FAILED, EXIT_CANCELLED = 2, 3


# -- the job process ------------------------------------------------------------------------------
def execute(folder: RunFolder, device: str = "auto", display=None, web: bool = False) -> dict:
    """Run the request in `folder` to its end; `status.json` follows every phase and step.

    `display` (a `RunCallbacks`) also sees each phase and step, e.g. the CLI's progress bar. `web`:
    the job came from the web, so its model name follows the web's rules (`models.check_web_model`).
    Raises what ended the run (after recording it): `TrainingCancelled`, `TrainingDiverged`, an
    `OperatorError`, or a bug.
    """
    from unlearn_core.config import InstanceTarget, UnlearnConfig
    from unlearn_core.models import load_model
    from unlearn_core.run import RunCallbacks, run_unlearning
    from unlearn_core.trainer import TrainingCancelled

    request = folder.read_request()
    config = UnlearnConfig.from_dict(request["config"])
    targets = [InstanceTarget(**target) for target in request["targets"]]
    steps = {"step": 0, "total": config.steps}
    main = is_main_process()  # under torchrun only the main process records the status

    def record(state, **extra):
        if main:
            folder.write_status(state, **extra)

    def on_step(report):
        steps.update(step=report.step, total=report.total)
        record("running", **steps)

    def on_phase(name):
        record("running", phase=name, **steps)

    if main:
        folder.clear_cancel()
    on_phase("loading")
    callbacks = RunCallbacks(on_step=on_step, on_phase=on_phase, should_stop=folder.cancel_requested).then(display)
    try:
        model = load_model(request["model"], device, web=web)
        result = run_unlearning(model, targets, config, folder, callbacks)
    except TrainingCancelled as error:
        record("cancelled", error=str(error), **steps)
        raise
    except Exception as error:
        record("failed", error=str(error) if isinstance(error, OperatorError) else without_server_paths(f"{type(error).__name__}: {error}"), **steps)
        raise
    record("done", step=int(result["summary"].get("steps_run", steps["step"])), total=config.steps)  # the steps trained: the early stop may end before the total
    return result


def main(argv=None) -> int:
    from unlearn_core.trainer import TrainingCancelled, TrainingDiverged

    parser = argparse.ArgumentParser(prog="python -m unlearn_core.worker", description="Run one job's run folder (written by the job store).")
    parser.add_argument("run_dir")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    try:
        execute(RunFolder(args.run_dir), args.device, web=True)  # the server's jobs: every one came from the web
    except TrainingCancelled as error:
        print(f"cancelled: {error}", file=sys.stderr)
        return EXIT_CANCELLED
    except (OperatorError, TrainingDiverged) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_FAILED
    return 0


# -- the server's worker thread -------------------------------------------------------------------
def job_command(job: Job, device: str) -> list[str]:
    """The job process for one job: everything else it reads from the run folder."""
    return [sys.executable, "-m", "unlearn_core.worker", job.run_dir, f"--device={device}"]


class JobWorker:
    """One background thread per device; runs queued jobs one at a time, each in a subprocess."""

    def __init__(self, store: JobStore, device: str = "auto", poll_s: float = 0.5, env: dict | None = None):
        self.store = store
        self.device = device
        self.poll_s = poll_s
        self.env = env
        self._die_with_parent = _parent_death_signal()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"job-worker-{device}", daemon=True)

    def start(self) -> "JobWorker":
        self._thread.start()
        return self

    def wake(self) -> None:
        """Look for queued jobs now (called after a submit or resume)."""
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            job = self.store.claim_next(this_runner())
            if job is None:
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            try:
                self.run_job(job)
            except Exception as error:  # keep the worker alive whatever one job does
                self.store.update(job.id, state="failed", error=f"worker error: {type(error).__name__}: {error}")

    def run_job(self, job: Job) -> str:
        """Run one claimed job to its end; return its final state."""
        folder = job.folder.create()
        folder.clear_cancel()
        command = job_command(job, self.device)
        with open(folder.worker_log, "ab") as log:  # an append-only stream: the one file not written atomically
            log.write(f"\n$ {' '.join(command)}\n".encode())
            log.flush()
            env = None if self.env is None else {**self.env, "PYTHONUNBUFFERED": "1"}
            process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=self._die_with_parent)
        cancel_seen = None
        last = (job.step, job.total)
        while process.poll() is None:
            if self._stop.wait(self.poll_s):
                _terminate(process)
                self.store.update(job.id, state="interrupted", error="the server stopped during the job; resume it")
                return "interrupted"
            step, total = _progress(folder, job)
            if (step, total) != last:
                self.store.update(job.id, step=step, total=total)
                last = (step, total)
            if folder.cancel_requested():
                cancel_seen = cancel_seen or time.monotonic()
                if time.monotonic() - cancel_seen > CANCEL_GRACE_S:
                    _terminate(process)
        return self._finish(job, process.returncode, cancel_seen is not None)

    def _finish(self, job: Job, returncode: int, cancelled: bool) -> str:
        folder = job.folder
        status = folder.read_status()
        step, _ = _progress(folder, job)
        if returncode == 0 and status.get("state") == "done":
            self.store.update(job.id, state="done", step=step, error="")
            return "done"
        if cancelled or status.get("state") == "cancelled":
            self.store.update(job.id, state="cancelled", step=step, error="cancelled by the operator; resume continues from the last checkpoint")
            return "cancelled"
        reason = status.get("error") or _killed_reason(returncode) or _log_tail(folder.worker_log) or f"exit code {returncode}"
        self.store.update(job.id, state="failed", step=step, error=without_server_paths(str(reason))[-2000:])
        return "failed"


def _progress(folder: RunFolder, job: Job) -> tuple[int, int]:
    """(step, total) as far as the job process has reported them."""
    status = folder.read_status()
    rows = folder.read_loss_log()
    step = max(int(status.get("step", 0) or 0), int(rows[-1]["step"]) if rows else 0)
    return step, int(status.get("total", job.total) or job.total)


def _killed_reason(returncode: int) -> str:
    """A clear reason for a job process ended by a signal (kill -9, the out-of-memory killer, ...)."""
    if returncode is None or returncode >= 0:
        return ""
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    return f"the job's process was killed ({name}; out of memory or killed by hand?); resume continues from the last checkpoint"


def _parent_death_signal():
    """On Linux, a function for `Popen(preexec_fn=...)` that has the kernel kill the child when the
    server dies (even by SIGKILL), so no orphaned job keeps writing into a run folder that a
    restarted server marks interrupted. libc is loaded here, in the parent, never after fork."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1
    return lambda: prctl(pr_set_pdeathsig, signal.SIGKILL)


def _terminate(process: subprocess.Popen, grace_s: float = 3.0) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _log_tail(path) -> str:
    """The subprocess's last error line (or last line), without progress-bar redraws."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    lines = [line.split("\r")[-1].strip() for line in text.split("\n")]
    lines = [line for line in lines if line]
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or [""])[-1]


if __name__ == "__main__":
    sys.exit(main())
