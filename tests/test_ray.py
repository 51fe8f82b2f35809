"""HOTFIX_EXECUTOR=ray with a real local Ray (started by the server, 2 CPUs): two jobs from the app
run side by side as Ray actors and give the adapters of single-process runs; killing one job's
actor mid-run leaves that job interrupted, resumable to the end, and the other job unaffected."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks.app_server import AppServer
from tests.test_api import wait_for_job

ROOT = Path(__file__).resolve().parents[1]
CONFIG = {"steps": 14, "stop_at_r": 0.0, "batch_size": 1, "checkpoint_every": 2, "remember_count": 2, "eval_seeds": 1, "generation_steps": 4}


def ray_cannot_start() -> str:
    """Why a local Ray cannot start on this machine ('' when it can)."""
    if (os.cpu_count() or 1) < 2:
        return "two jobs side by side need 2 CPUs"
    probe = "import ray; ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False); ray.shutdown()"
    try:
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"Ray did not start: {error}"
    return "" if done.returncode == 0 else f"Ray did not start: {(done.stderr.strip().splitlines() or ['?'])[-1]}"


class RayServer(AppServer):
    def environment(self) -> dict:
        return {**super().environment(), "HOTFIX_EXECUTOR": "ray", "RAY_ADDRESS": ""}


@pytest.fixture(scope="module")
def ray_server(tmp_path_factory):
    reason = ray_cannot_start()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("ray")
    server = RayServer(root / "runs", root / "cache").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(ray_server):
    from gradio_client import Client

    return Client(ray_server.url, verbose=False)


def start(client, seed: int, surrogate: Path) -> str:
    from gradio_client import handle_file

    job_id, _ = client.predict("flag of japan", seed, handle_file(str(surrogate)), None, json.dumps(CONFIG), api_name="/start_unlearning")
    return job_id


def both_running(client, jobs: list[str], server, timeout_s: float = 300) -> bool:
    """Whether the jobs were seen training at the same time, each past its first step."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        states = [client.predict(job, api_name="/job_status") for job in jobs]
        if all(status["state"] == "running" and status["step"] >= 1 for status in states):
            return True
        if any(status["state"] in ("done", "failed", "cancelled", "interrupted") for status in states):
            return False
        time.sleep(0.5)
    raise TimeoutError(f"{jobs} never ran together: {states}\n{server.tail()}")


def single_process_adapter(run_dir: Path, out: Path) -> dict:
    """The same request run straight in this process (`job_process.execute`): the adapter's weights."""
    from safetensors.torch import load_file

    from unlearn_core.job_process import execute
    from unlearn_core.runfolder import RunFolder

    shutil.copytree(run_dir, out, ignore=shutil.ignore_patterns("*.safetensors", "status.json", "loss_log.csv", "metrics.json", "checkpoint.pt", "CANCEL"))
    request = json.loads((out / "config.json").read_text())
    for target in request["targets"]:  # the copy's own images
        for key in ("surrogate_path", "target_path"):
            if target.get(key):
                target[key] = str(out / Path(target[key]).name)
    (out / "config.json").write_text(json.dumps(request))
    execute(RunFolder(out), "cpu", web=True)
    return load_file(out / "pytorch_lora_weights.safetensors")


def test_two_jobs_run_side_by_side_as_ray_actors_and_give_the_single_process_adapters(ray_server, client, tmp_path):
    from PIL import Image
    from safetensors.torch import load_file

    surrogate = tmp_path / "surrogate.png"
    Image.new("RGB", (64, 64), (0, 120, 60)).save(surrogate)
    jobs = [start(client, seed, surrogate) for seed in (2, 3)]
    assert both_running(client, jobs, ray_server), "the second job waited for the first: no side-by-side run"
    for job in jobs:
        assert wait_for_job(client, job, server=ray_server)["state"] == "done"
    runs = ray_server.runs_dir / "jobs"
    assert len({json.loads((runs / job / "status.json").read_text())["pid"] for job in jobs}) == 2, "both ran in one process"
    for job in jobs:
        on_ray = load_file(runs / job / "pytorch_lora_weights.safetensors")
        straight = single_process_adapter(runs / job, tmp_path / f"straight-{job}")
        for key in straight:
            torch.testing.assert_close(on_ray[key], straight[key], rtol=0, atol=1e-4)


def test_a_killed_actor_leaves_its_job_interrupted_and_resumable_and_the_other_job_unaffected(ray_server, client, tmp_path):
    from PIL import Image

    surrogate = tmp_path / "surrogate.png"
    Image.new("RGB", (64, 64), (200, 20, 40)).save(surrogate)
    victim, bystander = (start(client, seed, surrogate) for seed in (4, 5))
    run_dir = ray_server.runs_dir / "jobs" / victim
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # training, past a checkpoint
        status = json.loads((run_dir / "status.json").read_text()) if (run_dir / "status.json").is_file() else {}
        if status.get("step", 0) >= 4 and (run_dir / "checkpoint.pt").is_file():
            break
        time.sleep(0.2)
    else:
        raise TimeoutError(f"the job never passed a checkpoint\n{ray_server.tail()}")
    os.kill(status["pid"], signal.SIGKILL)  # the actor's process dies, as on a lost node
    interrupted = wait_for_job(client, victim, states=("interrupted",), timeout_s=120, server=ray_server)
    assert "Ray actor" in interrupted["error"]
    assert wait_for_job(client, bystander, server=ray_server)["state"] == "done"
    assert client.predict(victim, api_name="/resume_job")["state"] in ("queued", "running")
    done = wait_for_job(client, victim, server=ray_server)
    assert done["step"] == CONFIG["steps"]
    with open(run_dir / "loss_log.csv", newline="") as handle:
        steps = [int(row["step"]) for row in csv.DictReader(handle)]
    assert steps.count(1) == 1 and max(steps) == CONFIG["steps"], "the resumed job started over instead of continuing from its checkpoint"
