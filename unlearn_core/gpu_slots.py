"""Jobs on a Hugging Face ZeroGPU Space: a job as a chain of GPU slots.

On ZeroGPU the server has a GPU only inside calls of functions decorated `@spaces.GPU(duration=S)`.
Each call runs in a forked copy of the server for at most S seconds, and what it changes in memory is
gone when it returns; only files remain. A default job is longer than one slot, so it runs as a chain
(`SlotChain`):
- each slot runs the job from its run folder (`job_process.execute`), resuming from the checkpoint;
- it stops at a checkpoint once the slot's time nearly runs out (`SlotClock`), and the next slot
  goes on. The checkpoint holds all the trainer steers by, so a chained job gives the adapter of
  one straight run;
- every slot prepares its sets again (the remember set comes from the generation cache after the
  first) and trains at least one step, so a chain always advances.

The chain runs in a thread of the server and offers the `Popen` methods the worker watches a job
process with. Outside a Space the `spaces` decorator does nothing, and the chain runs on whatever
device there is (the tests run it here). Never imports gradio itself (`spaces` does, on a Space).
"""

from __future__ import annotations

import subprocess
import threading
import time

from unlearn_core.job_process import EXIT_CANCELLED, EXIT_FAILED, execute
from unlearn_core.runfolder import RunFolder


class SlotClock:
    """When a slot should stop at a checkpoint:
    - before a step, once less is left than twice the longest step so far (the step, then the
      checkpoint and the slot's return); never before the slot's first step, so each slot advances;
    - before evaluating, once less is left than this slot's preparation took (evaluating samples
      about as many images as the warm remember set), again only in a slot that trained.
    """

    def __init__(self, slot_s: float, clock=time.monotonic):
        self.slot_s, self.clock = slot_s, clock
        self.started = clock()
        self.steps, self.longest_step_s = 0, 0.0
        self.preparing_s = 0.0

    def left_s(self) -> float:
        return self.slot_s - (self.clock() - self.started)

    def on_phase(self, name: str) -> None:
        if name == "training":
            self.preparing_s = self.clock() - self.started

    def on_step(self, report) -> None:
        self.steps += 1
        self.longest_step_s = max(self.longest_step_s, report.seconds_per_step)

    def should_pause(self, before: str) -> bool:
        if self.steps == 0:
            return False
        need = 2 * self.longest_step_s if before == "step" else self.preparing_s
        return self.left_s() < need


def run_slot(run_dir: str, device: str, slot_s: float) -> str:
    """One GPU slot of a job: from its checkpoint until it ends ("done") or the slot is nearly
    spent ("paused"). Cancelled, failed and diverged jobs raise, as `execute` does."""
    from unlearn_core.run import RunCallbacks
    from unlearn_core.trainer import TrainingPaused

    clock = SlotClock(slot_s)
    watch = RunCallbacks(on_step=clock.on_step, on_phase=clock.on_phase, should_pause=clock.should_pause)
    try:
        execute(RunFolder(run_dir), device, display=watch, web=True, fresh_cancel=False)  # the worker cleared it when the job began
    except TrainingPaused:
        return "paused"
    return "done"


def _slot_duration(run_dir: str, device: str, slot_s: float) -> float:
    return slot_s  # ZeroGPU's duration of one call: the slot's own length


def _gpu_slot():
    """`run_slot` as a ZeroGPU function (`spaces.GPU` with the slot's length as its duration),
    decorated once; `run_slot` itself where the `spaces` package is not installed."""
    global _decorated
    if _decorated is None:
        try:
            import spaces
        except ImportError:
            _decorated = run_slot
        else:
            _decorated = spaces.GPU(duration=_slot_duration)(run_slot)
    return _decorated


_decorated = None


def launcher(slot_s: float):
    """`JobWorker`'s `launch` for ZeroGPU: each job as a chain of GPU slots of `slot_s` seconds."""
    return lambda folder, device: SlotChain(folder, device, slot_s)


class SlotChain:
    """A job run as a chain of GPU slots in a thread, watched as the worker watches a job process:
    `poll()` and `returncode` (0 done, `EXIT_CANCELLED`, `EXIT_FAILED`), `send_signal` and `kill`
    (both ask the job to stop at its next step: a thread cannot be killed), `wait(timeout)`."""

    def __init__(self, folder: RunFolder, device: str, slot_s: float):
        self.folder, self.device, self.slot_s = folder, device, slot_s
        self.slots = 0
        self.returncode: int | None = None
        self._thread = threading.Thread(target=self._run, name=f"gpu-slots-{folder.path.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from unlearn_core.trainer import TrainingCancelled

        code = EXIT_FAILED  # whatever else ends a slot: `execute` has recorded it in status.json
        try:
            while True:
                self.slots += 1
                if _gpu_slot()(str(self.folder.path), self.device, self.slot_s) == "done":
                    code = 0
                    break
                if self.folder.cancel_requested():
                    code = EXIT_CANCELLED  # paused at a checkpoint, and the operator cancelled meanwhile
                    self.folder.write_status("cancelled", **{k: v for k, v in self.folder.read_status().items() if k in ("step", "total")})
                    break
        except TrainingCancelled:
            code = EXIT_CANCELLED
        except Exception:
            code = EXIT_FAILED
        finally:
            self.returncode = code

    def poll(self) -> int | None:
        return self.returncode

    def send_signal(self, signal_number: int) -> None:
        self.folder.request_cancel()

    def kill(self) -> None:
        self.folder.request_cancel()

    def wait(self, timeout: float | None = None) -> int:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise subprocess.TimeoutExpired(f"job {self.folder.path.name} in GPU slots", timeout)
        return self.returncode
