"""Jobs per hour on this machine with the local executor and with a local Ray, and the time Ray
adds to each job.

    python -m benchmarks.scaling [--jobs 4] [--steps 20]

The same short jobs (the demo model's chad fix, `--steps` steps, remember set and evaluation cut
down so that a job takes a minute or less) go through the server's own workers (`workers.build_pool`,
a job store in a temporary folder, one shared generation cache warmed first):
- local: today's default, one worker, each job in its own warm job process;
- ray: HOTFIX_EXECUTOR=ray on a local Ray of this machine's CPUs, one worker per CPU, each job in an actor.
For each, after one job that warms the cache: one job alone (its wall time from queued to done), then `--jobs` queued at once (their
wall time, as jobs per hour). Ray's overhead per job is its lone job's time minus the local one's.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from PIL import Image

from benchmarks.__main__ import CHAD, ROOT
from unlearn_core.config import DEMO_MODEL, UnlearnConfig
from unlearn_core.settings import Settings
from unlearn_core.store import JobStore
from unlearn_core.workers import build_pool


def instance() -> dict:
    prompt, seed, surrogate = CHAD
    return {"prompt": prompt, "seed": seed, "surrogate": Image.open(surrogate), "target": Image.open(ROOT / "assets" / "examples" / "chad_seed40_target.png")}


def run_jobs(store: JobStore, pool, config: UnlearnConfig, count: int) -> float:
    """Queue `count` jobs at once and wait until every one has ended; the wall time."""
    started = time.time()
    jobs = [store.create(DEMO_MODEL, config, [instance()]) for _ in range(count)]
    pool.wake()
    while any(store.get(job.id).state in ("queued", "running") for job in jobs):
        time.sleep(0.2)
    states = [store.get(job.id).state for job in jobs]
    if set(states) != {"done"}:
        raise RuntimeError(f"jobs ended {states}: {[store.get(job.id).error for job in jobs]}")
    return time.time() - started


def measure(executor: str, config: UnlearnConfig, jobs: int, root: Path) -> dict:
    settings = Settings.from_env({"HOTFIX_EXECUTOR": executor, "HOTFIX_RUNS_DIR": str(root / executor), "RAY_ADDRESS": ""})
    store = JobStore(settings.runs_dir)
    pool = build_pool(store, settings).start()
    try:
        run_jobs(store, pool, config, 1)  # warms the generation cache (and Ray's workers), as a server's earlier jobs have
        alone = run_jobs(store, pool, config, 1)
        together = run_jobs(store, pool, config, jobs)
    finally:
        pool.stop()
    return {"executor": executor, "workers": len(pool.workers), "one_job_s": round(alone, 1), f"{jobs}_jobs_s": round(together, 1),
            "jobs_per_hour": round(3600 * jobs / together, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="scaling-"))
    os.environ["HOTFIX_CACHE"] = str(root / "cache")
    config = UnlearnConfig(steps=args.steps, stop_at_r=0.0, remember_count=4, eval_seeds=2, checkpoint_every=0)
    rows = [measure("local", config, args.jobs, root), measure("ray", config, args.jobs, root)]
    rows[1]["overhead_per_job_s"] = round(rows[1]["one_job_s"] - rows[0]["one_job_s"], 1)
    print(json.dumps({"cpus": os.cpu_count(), "steps": args.steps, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
