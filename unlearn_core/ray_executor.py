"""Jobs on a Ray cluster (HOTFIX_EXECUTOR=ray): each job in a Ray actor of its own.

- `connect()` joins the cluster at Ray's own `RAY_ADDRESS`, or starts a local Ray when it is unset,
  and says how many jobs the cluster runs at once: one per GPU, else one per CPU.
- `RayJob` is one job: an actor placed with `num_gpus=1` (`num_cpus=1` on a cluster without GPUs)
  that imports the stack and loads the server's default model, as the warm job process does, then
  runs `job_process.execute` on the job's run folder and is killed. The worker watches it with the
  `Popen` methods it watches a job process with; the job's state lives in the store and its run
  folder, so the run folders must be on storage every node reads (HOTFIX_RUNS_DIR).
- Cancel sets the run folder's cancel flag (the job checkpoints and stops); a job that ignores it is
  killed with `ray.kill`. An actor or node that dies leaves the job `interrupted` (`RayJob.lost`),
  resumable from its checkpoint.

Ray is imported only here, and only when this executor is chosen.
"""

from __future__ import annotations

import os
import subprocess

from unlearn_core.config import DEMO_MODEL
from unlearn_core.job_process import EXIT_CANCELLED, EXIT_FAILED
from unlearn_core.runfolder import RunFolder

NAMESPACE = "hotfix-studio"


def connect(local_cpus: int | None = None) -> int:
    """Join the Ray cluster at RAY_ADDRESS, or start a local one (this machine's CPUs, or
    `local_cpus`); returns how many jobs it runs at once: its GPUs, else its CPUs."""
    import ray

    if not ray.is_initialized():
        # A local Ray's object store holds nothing of ours (run folders carry the data): 256 MB, not Ray's 30 % of memory.
        local = {} if os.environ.get("RAY_ADDRESS") else {"num_cpus": local_cpus or os.cpu_count() or 1, "include_dashboard": False,
                                                          "object_store_memory": 256 * 1024**2}
        ray.init(namespace=NAMESPACE, log_to_driver=False, **local)
    resources = ray.cluster_resources()
    return int(resources.get("GPU", 0)) or int(resources.get("CPU", 1))


def uses_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) >= 1


class JobActor:
    """One job's process on the cluster: warmed up when placed, then given its run folder."""

    def __init__(self, preload: str | None):
        from unlearn_core.job_process import warm_up

        warm_up(preload, "auto")  # on a GPU node, Ray has set CUDA_VISIBLE_DEVICES to this actor's GPU

    def run(self, run_dir: str) -> int:
        """Run the job to its end; the exit code a job process would give."""
        from unlearn_core.errors import OperatorError
        from unlearn_core.job_process import execute, write_output_to
        from unlearn_core.trainer import TrainingCancelled, TrainingDiverged

        folder = RunFolder(run_dir)
        write_output_to(folder.worker_log)
        try:
            execute(folder, "auto", web=True)
        except TrainingCancelled:
            return EXIT_CANCELLED
        except (OperatorError, TrainingDiverged):
            return EXIT_FAILED
        except Exception:
            return EXIT_FAILED  # `execute` has written what happened into status.json
        return 0


class RayJob:
    """One job in its own Ray actor, watched as a job process is: `poll()`, `returncode`,
    `send_signal` (the cancel flag), `kill()` (`ray.kill`), `wait(timeout)`. `lost` says why, when
    the actor or its node died before the job ended."""

    def __init__(self, folder: RunFolder, preload: str | None = DEMO_MODEL):
        import ray

        self.folder = folder
        self.returncode: int | None = None
        self.lost = ""
        placement = {"num_gpus": 1} if uses_gpus() else {"num_cpus": 1}
        actor_class = ray.remote(max_restarts=0, **placement)(JobActor)
        self.actor = actor_class.options(name=f"job-{folder.path.name}", namespace=NAMESPACE).remote(preload)
        self.result = self.actor.run.remote(str(folder.path))

    def _collect(self) -> None:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError, WorkerCrashedError

        try:
            self.returncode = ray.get(self.result, timeout=0)
        except GetTimeoutError:
            return
        except (RayActorError, WorkerCrashedError) as error:  # before RayTaskError: some actor errors are both
            self.lost, self.returncode = f"the Ray actor running the job died ({type(error).__name__})", -9
        except RayTaskError:
            self.returncode = EXIT_FAILED
        ray.kill(self.actor)  # one job per actor: the next job gets a fresh process

    def poll(self) -> int | None:
        import ray

        if self.returncode is None and ray.wait([self.result], timeout=0)[0]:
            self._collect()
        return self.returncode

    def send_signal(self, signal_number: int) -> None:
        self.folder.request_cancel()

    def kill(self) -> None:
        import ray

        ray.kill(self.actor)

    def wait(self, timeout: float | None = None) -> int:
        import ray

        if self.returncode is None:
            if not ray.wait([self.result], timeout=timeout)[0]:
                raise subprocess.TimeoutExpired(f"job {self.folder.path.name} on Ray", timeout)
            self._collect()
        return self.returncode


def launcher(preload: str | None = DEMO_MODEL):
    """`JobWorker`'s `launch` for Ray: each job in an actor of its own."""
    return lambda folder, device: RayJob(folder, preload)
