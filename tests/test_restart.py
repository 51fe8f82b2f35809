"""A server killed hard in the middle of a job: after a restart the job is listed as interrupted
(once the dead server's lease has expired), and resuming it continues from its checkpoint to the end."""

from __future__ import annotations

import csv
import json
import os
import signal
import time
from pathlib import Path

from benchmarks.app_server import AppServer
from tests.test_api import wait_for_job

LOGIN = ("operator", "s3cret-Pa55")
LONG_CONFIG = {"steps": 40, "stop_at_r": 0.0, "batch_size": 1, "checkpoint_every": 5, "remember_count": 2, "eval_seeds": 1, "generation_steps": 4}
LONGER_CONFIG = {**LONG_CONFIG, "checkpoint_every": 50, "trajectory_refresh": 0}  # SIGSTOP holds it mid-training, however fast it trains


def test_kill_restart_resume(tmp_path, monkeypatch):
    """With a login, the job stays its owner's across the restart (without one, a job belongs to the
    browser session or API client that started it)."""
    from gradio_client import Client, handle_file

    monkeypatch.setenv("HOTFIX_USERNAME", "operator")
    monkeypatch.setenv("HOTFIX_PASSWORD", "s3cret-Pa55")
    monkeypatch.setenv("HOTFIX_LEASE_S", "3")  # the dead server's lease expires 3 s after its last renewal
    from PIL import Image

    runs, cache = tmp_path / "runs", tmp_path / "cache"
    surrogate = tmp_path / "surrogate.png"
    Image.new("RGB", (64, 64), (0, 120, 60)).save(surrogate)

    first = AppServer(runs, cache).start()
    try:
        client = Client(first.url, auth=LOGIN, verbose=False)
        job_id, _ = client.predict("flag of japan", 2, handle_file(str(surrogate)), None, json.dumps(LONG_CONFIG), api_name="/start_unlearning")
        run_dir = runs / "jobs" / job_id
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline:  # training, past its first checkpoint
            status = client.predict(job_id, api_name="/job_status")
            if status["state"] == "running" and status["step"] >= 7 and (run_dir / "checkpoint.pt").is_file():
                break
            assert status["state"] in ("queued", "running"), status
            time.sleep(0.5)
        else:
            raise TimeoutError(f"the job never passed its first checkpoint: {status}\n{first.tail()}")
        first.kill()  # SIGKILL to the server's process group: server and job die at once
    finally:
        first.stop()

    second = AppServer(runs, cache).start()
    try:
        client = Client(second.url, auth=LOGIN, verbose=False)
        wait_for_job(client, job_id, states=("interrupted",), timeout_s=30, server=second)  # once its lease expires
        resumed = client.predict(job_id, api_name="/resume_job")
        assert resumed["state"] in ("queued", "running")
        done = wait_for_job(client, job_id, server=second)
        assert done["step"] == LONG_CONFIG["steps"]
    finally:
        second.stop()

    for name in ("pytorch_lora_weights.safetensors", "adapter_card.json", "metrics.json", "before_after.png", "loss_log.csv", "config.json"):
        assert (run_dir / name).is_file(), name
    assert not (run_dir / "checkpoint.pt").exists()
    with open(run_dir / "loss_log.csv", newline="") as handle:
        steps = [int(row["step"]) for row in csv.DictReader(handle)]
    assert steps.count(1) == 1, "the resumed run started over instead of continuing from its checkpoint"
    assert max(steps) == LONG_CONFIG["steps"]
    assert json.loads(Path(run_dir / "status.json").read_text())["state"] == "done"


def test_a_second_server_on_the_same_runs_folder_leaves_the_first_ones_job_alone(tmp_path, monkeypatch):
    """Two live servers share one runs folder: the second neither marks the first one's running job
    interrupted nor runs it too; the job ends `done` once, under the first server's worker."""
    from gradio_client import Client, handle_file
    from PIL import Image

    monkeypatch.setenv("HOTFIX_USERNAME", "operator")  # one owner for both servers' clients
    monkeypatch.setenv("HOTFIX_PASSWORD", "s3cret-Pa55")
    runs, cache = tmp_path / "runs", tmp_path / "cache"
    surrogate = tmp_path / "surrogate.png"
    Image.new("RGB", (64, 64), (0, 120, 60)).save(surrogate)
    first = AppServer(runs, cache).start()
    second = None
    try:
        client = Client(first.url, auth=LOGIN, verbose=False)
        job_id, _ = client.predict("flag of japan", 2, handle_file(str(surrogate)), None, json.dumps(LONGER_CONFIG), api_name="/start_unlearning")
        deadline = time.monotonic() + 400
        while (status := client.predict(job_id, api_name="/job_status"))["state"] != "running" or status["step"] < 2:
            assert status["state"] in ("queued", "running") and time.monotonic() < deadline, status
            time.sleep(0.5)
        paused = first.job_process(job_id)
        assert paused, first.tail()
        os.kill(paused, signal.SIGSTOP)  # the job waits (alive, mid-training) while the second server starts, however fast it trains
        try:
            second = AppServer(runs, cache).start()
            other = Client(second.url, auth=LOGIN, verbose=False)
            assert other.predict(job_id, api_name="/job_status")["state"] == "running"  # not "interrupted"
        finally:
            os.kill(paused, signal.SIGCONT)
        done = wait_for_job(client, job_id, server=first)
        assert done["step"] == LONGER_CONFIG["steps"]
        assert other.predict(job_id, api_name="/job_status")["state"] == "done"
    finally:
        first.stop()
        if second:
            second.stop()
    with open(runs / "jobs" / job_id / "loss_log.csv", newline="") as handle:
        steps = [int(row["step"]) for row in csv.DictReader(handle)]
    assert steps == list(range(1, LONGER_CONFIG["steps"] + 1)), "the job ran twice or restarted"
    log = (runs / "jobs" / job_id / "worker.log").read_text()
    assert log.count("$ ") == 1, "more than one job process ran the job"
