"""The worker: runs queued jobs, each in its own process, on run folders.

- The job process (`unlearn_core.job_process`), `python -m unlearn_core.worker RUN_DIR [--device D]`:
  reads the folder's `config.json`, loads the model, trains, saves and evaluates, and records its
  state in the folder's `status.json`. The CLI's `unlearn` verb calls the same `execute`.
- The warm job process, `python -m unlearn_core.worker --wait [--preload MODEL]`: the same, but it
  imports torch/diffusers and loads the model *before* it is given a job, then reads the run folder
  from stdin. The server keeps one waiting between jobs, so a job from the browser does not pay
  start-up and model loading (28 % of a default job), and every job still has a process of its own:
  nothing of one user's job (its adapter, its images) can stay in memory for the next one's.
- `JobWorker`, in the server: one background thread per device. It claims queued jobs in order and
  hands each to the waiting job process (or starts one), so a crash or a hung model never takes
  the server down; it copies step/total into the store and turns the process's end into the job's
  state. Cancelling sets the folder's cancel flag (the process checkpoints and stops); a process
  that does not stop within `CANCEL_GRACE_S` is killed. After each job it starts the next waiting
  process, while the device is idle. It renews the running job's lease and marks other workers'
  expired leases interrupted (`JobStore.expire_leases`); a job whose lease it lost is stopped. A
  failing store (disk full, read-only) never ends the thread: it backs off and retries, and the
  job's end is written once the store works again.

Never imports gradio.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

from unlearn_core.config import DEMO_MODEL
from unlearn_core.errors import without_server_paths
from unlearn_core.runfolder import RunFolder
from unlearn_core.job_process import main  # `python -m unlearn_core.worker` runs the job process
from unlearn_core.store import Job, JobStore, this_runner

CANCEL_GRACE_S = 8.0


# -- the server's worker thread -------------------------------------------------------------------
def job_command(device: str, preload: str | None) -> list[str]:
    """A job process that warms up, then reads its run folder from stdin (nothing else on argv)."""
    return [sys.executable, "-m", "unlearn_core.worker", "--wait", f"--device={device}"] + ([f"--preload={preload}"] if preload else [])


class JobWorker:
    """One background thread per device; runs queued jobs one at a time, each in a job process of
    its own, started ahead and waiting (`job_command`). `warm=False` starts each at its job instead."""

    def __init__(self, store: JobStore, device: str = "auto", poll_s: float = 0.5, env: dict | None = None, warm: bool = True, preload: str | None = DEMO_MODEL,
                 launch=None):
        self.store = store
        # How a job runs elsewhere than in a job process of this machine: launch(folder, device) returns
        # what runs it, with the Popen methods `_watch` uses (ZeroGPU's `gpu_slots.SlotChain`, Ray's
        # `ray_executor.RayJob`). None: a job process here, started ahead when `warm`.
        self.launch = launch
        self.device = device
        self.poll_s = poll_s
        self.env = env
        self.warm = warm
        self.preload = preload
        self._die_with_parent = _parent_death_signal()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.runner = f"{this_runner()}/{device}"  # the `runner` column of the jobs it holds; their leases say whether it lives
        self._thread = threading.Thread(target=self._loop, name=f"job-worker-{device}", daemon=True)
        self._sweep_at = 0.0  # when to look for expired leases next
        self._store_error = ""  # the store's last failure during the current job
        self._said = ""  # the last line logged, not repeated
        self._waiting: subprocess.Popen | None = None  # the next job's process, warming up or ready
        # Output of a job process before it has a job (import warnings, a failed start-up); one file per worker thread.
        self._waiting_log = store.runs_dir / "workers" / f"{os.getpid()}-{device.replace('/', '_')}.log"

    def start(self) -> "JobWorker":
        if self.warm and self.launch is None:
            self._start_waiting()
        self._thread.start()
        return self

    def _start_waiting(self) -> None:
        self._waiting_log.parent.mkdir(parents=True, exist_ok=True)
        env = None if self.env is None else {**self.env, "PYTHONUNBUFFERED": "1"}
        with open(self._waiting_log, "wb") as log:
            self._waiting = subprocess.Popen(job_command(self.device, self.preload), env=env, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, preexec_fn=self._die_with_parent)

    def _hand_over(self, folder: RunFolder) -> subprocess.Popen:
        """Give the run folder to the waiting job process (starting one if none waits); that process
        is now the job's. If it died while waiting, the job's end reports why (`_finish`). With a
        `launch`, what it starts instead."""
        if self.launch is not None:
            return self.launch(folder, self.device)
        if self._waiting is None:
            self._start_waiting()
        process, self._waiting = self._waiting, None
        try:
            process.stdin.write(f"{folder.path}\n".encode())
            process.stdin.close()
        except OSError:  # BrokenPipeError: it died while waiting
            process.wait()
        return process

    def wake(self) -> None:
        """Look for queued jobs now (called after a submit or resume)."""
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
        waiting, self._waiting = self._waiting, None
        if waiting is not None and waiting.poll() is None:
            _terminate(waiting)

    def _loop(self) -> None:
        """Claim and run jobs until stopped. Nothing kills this thread: when the store fails (disk
        full, read-only, I/O error) it says so, waits longer each time and tries again."""
        failures = 0
        while not self._stop.is_set():
            try:
                self._next()
                failures, self._said = 0, ""
            except Exception as error:
                failures += 1
                self._say(f"could not look for jobs ({_plain(error)}); trying again")
                self._stop.wait(self._backoff(failures))

    def _next(self) -> None:
        """Sweep expired leases when due, then run the oldest queued job, or wait for one."""
        self._sweep_when_due()
        job = self.store.claim_next(self.runner)
        if job is None:
            self._wake.wait(1.0)
            self._wake.clear()
            return
        self._run(job)
        if self.warm and self.launch is None and not self._stop.is_set():
            self._start_waiting()  # the next job's process warms up while the device is idle

    def _run(self, job: Job) -> None:
        """Run a claimed job; whatever goes wrong, its row says how it ended."""
        try:
            self.run_job(job)
        except Exception as error:  # keep the worker alive whatever one job does
            self._settle(job, state="failed", error=f"worker error: {_plain(error)}")

    def run_job(self, job: Job) -> str:
        """Run one claimed job to its end; return its final state. Its process never outlives this call."""
        folder = job.folder.create()
        folder.clear_cancel()
        with open(folder.worker_log, "ab") as log:  # an append-only stream: the one file not written atomically
            log.write(f"\n$ {' '.join(job_command(self.device, self.preload))} < {folder.path}\n".encode())
        process = self._hand_over(folder)
        try:
            return self._watch(job, folder, process)
        finally:
            if process.poll() is None:
                _terminate(process)

    def _watch(self, job: Job, folder: RunFolder, process: subprocess.Popen) -> str:
        """Follow the job's process: renew the lease, copy its progress, pass on a cancel."""
        self._store_error = ""
        cancel_seen = None
        last = (job.step, job.total)
        renew_at = time.monotonic() + self.renew_every_s
        while process.poll() is None:
            if self._stop.wait(self.poll_s):
                _terminate(process)
                self._tolerant(self.store.update, job.id, runner=self.runner, state="interrupted", error="the server stopped during the job; resume it")
                return "interrupted"
            if time.monotonic() >= renew_at:
                held = self._tolerant(self.store.renew, job.id, self.runner)
                if held is False:  # its lease expired and another server marked it interrupted: the job is no longer ours
                    _terminate(process)
                    self._say(f"job {job.id} lost its lease; stopped its process")
                    return "interrupted"
                if held:
                    renew_at = time.monotonic() + self.renew_every_s
                    self._tolerant(self._sweep_when_due)  # after our own renewal: a survivor cleans up after a dead peer
            step, total = _progress(folder, job)
            if (step, total) != last and self._tolerant(self.store.update, job.id, runner=self.runner, step=step, total=total) is not None:
                last = (step, total)
            if folder.cancel_requested():
                cancel_seen = cancel_seen or time.monotonic()
                if time.monotonic() - cancel_seen > CANCEL_GRACE_S:
                    _terminate(process)
        return self._finish(job, process.returncode, cancel_seen is not None, lost=getattr(process, "lost", ""))

    def _finish(self, job: Job, returncode: int, cancelled: bool, lost: str = "") -> str:
        """The job's state from how its process ended; `lost`: why what ran it is gone (a Ray actor or node)."""
        folder = job.folder
        status = folder.read_status()
        step, _ = _progress(folder, job)
        if returncode == 0 and status.get("state") == "done":
            self._settle(job, state="done", step=step, error="")
            return "done"
        if cancelled or status.get("state") == "cancelled":
            self._settle(job, state="cancelled", step=step, error="cancelled by the operator; resume continues from the last checkpoint")
            return "cancelled"
        if lost:  # the machine or actor that ran it is gone (not by a cancel); its checkpoint is not
            self._settle(job, state="interrupted", step=step, error=f"{lost}; resume continues from the last checkpoint")
            return "interrupted"
        if self._store_error and not status.get("error"):  # the disk under the store failed, not the job
            self._settle(job, state="interrupted", step=step, error=f"the job store stopped working during the job ({self._store_error}); resume it")
            return "interrupted"
        reason = status.get("error") or _killed_reason(returncode) or _log_tail(folder.worker_log) or _log_tail(self._waiting_log) or f"exit code {returncode}"
        self._settle(job, state="failed", step=step, error=without_server_paths(str(reason))[-2000:])
        return "failed"

    # -- leases and store faults -------------------------------------------------------------------
    @property
    def renew_every_s(self) -> float:
        return self.store.lease_s / LEASE_RENEWALS

    def _sweep_when_due(self) -> None:
        """Mark jobs whose lease expired interrupted (any server's), every `renew_every_s`."""
        if time.monotonic() < self._sweep_at:
            return
        expired = self.store.expire_leases()
        self._sweep_at = time.monotonic() + self.renew_every_s
        if expired:
            self._say(f"marked {len(expired)} job(s) interrupted, their worker stopped renewing its lease: {', '.join(expired)}")

    def _tolerant(self, action, *args, **kwargs):
        """`action(...)`, or None when the store fails (remembered for the job's end, and said once)."""
        try:
            result = action(*args, **kwargs)
        except STORE_ERRORS as error:
            self._store_error = _plain(error)
            self._say(f"the job store failed ({self._store_error}); the job goes on")
            return None
        self._said = ""
        return result

    def _settle(self, job: Job, **values) -> None:
        """Write how the job ended, retrying with backoff while the store fails. A stopping server
        gives up: the lease expires and any server marks the job interrupted."""
        failures = 0
        while True:
            try:
                self.store.update(job.id, runner=self.runner, **values)
                self._said = ""
                return
            except STORE_ERRORS as error:
                failures += 1
                self._say(f"the job store failed ({_plain(error)}); job {job.id} ends {values.get('state')} once it works again")
                if self._stop.wait(self._backoff(failures)):
                    return

    def _backoff(self, failures: int) -> float:
        return min(BACKOFF_MAX_S, self.poll_s * 2 ** min(failures, 16))

    def _say(self, text: str) -> None:
        """One line in the server's log, not repeated while nothing changes."""
        if text != self._said:
            self._said = text
            print(f"job worker ({self.device}): {text}", file=sys.stderr, flush=True)


STORE_ERRORS = (sqlite3.Error, OSError)  # what a failing disk under the store raises
LEASE_RENEWALS = 3  # renewals per lease: two may fail before the job counts as abandoned
BACKOFF_MAX_S = 5.0


def _plain(error: BaseException) -> str:
    """An error in words, without server paths."""
    return without_server_paths(f"{type(error).__name__}: {error}" if not isinstance(error, sqlite3.Error) else str(error))


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
    lines = [line for line in lines if line and not line.startswith("$ ")]  # not the server's own header lines
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or [""])[-1]


if __name__ == "__main__":
    sys.exit(main())
