"""The server's workers: how many, on what, and how each runs a job.

- By default: one `JobWorker` per device, each running its jobs in job processes of this machine.
  The devices are HOTFIX_DEVICES (e.g. `cuda:0,cuda:1`); unset, every CUDA device, else the one
  HOTFIX_DEVICE names (`auto`: today's single worker).
- HOTFIX_EXECUTOR=ray: one worker per job the Ray cluster runs at once (its GPUs, else its CPUs),
  each running its jobs as Ray actors (`ray_executor`).
- On ZeroGPU: one worker, each job a chain of GPU slots in this process (`gpu_slots`).

Every worker claims queued jobs from the store on its own (atomically, in order), renews its
running job's lease and writes its end; the store stays the one source of a job's state.
"""

from __future__ import annotations

from dataclasses import dataclass

from unlearn_core.settings import Settings
from unlearn_core.store import JobStore
from unlearn_core.worker import JobWorker


@dataclass
class WorkerPool:
    """The workers of one server; `wake` and `stop` reach them all."""

    workers: list[JobWorker]

    def start(self) -> "WorkerPool":
        for worker in self.workers:
            worker.start()
        return self

    def wake(self) -> None:
        for worker in self.workers:
            worker.wake()

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()


def local_devices(settings: Settings) -> list[str]:
    """The devices of this machine that get a worker each."""
    if settings.devices:
        return list(settings.devices)
    if settings.device == "auto":
        import torch

        if torch.cuda.device_count() > 1:
            return [f"cuda:{index}" for index in range(torch.cuda.device_count())]
    return [settings.device]


def build_pool(store: JobStore, settings: Settings) -> WorkerPool:
    """The workers the settings ask for (not started)."""
    if settings.zero_gpu:
        from unlearn_core import gpu_slots

        return WorkerPool([JobWorker(store, settings.device, launch=gpu_slots.launcher(settings.gpu_slot_s))])
    if settings.executor == "ray":
        from unlearn_core import ray_executor

        slots = ray_executor.connect()
        return WorkerPool([JobWorker(store, f"ray-{index}", launch=ray_executor.launcher()) for index in range(slots)])
    return WorkerPool([JobWorker(store, device, warm=settings.warm_worker) for device in local_devices(settings)])
