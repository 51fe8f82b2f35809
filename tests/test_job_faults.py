"""Jobs whose runner dies and a store whose disk fails, with real processes and a real file system
(no model: the workers run the stand-in job processes of test_jobs)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing, contextmanager
from pathlib import Path

import pytest

from tests.test_jobs import STAND_IN, instance
from unlearn_core import worker as worker_module
from unlearn_core.config import UnlearnConfig
from unlearn_core.store import JobStore
from unlearn_core.worker import JobWorker

ROOT = Path(__file__).resolve().parent.parent
LEASE_S = 1.5  # short for the test, long enough that a busy machine does not starve a live peer past it

PEER = f"""
import sys, time
from tests.test_jobs import STAND_IN
from unlearn_core import worker
from unlearn_core.store import JobStore
worker.job_command = lambda device, preload: [sys.executable, "-c", "MODE = 'ignore'\\n" + STAND_IN]  # runs until killed
worker.JobWorker(JobStore(sys.argv[1], lease_s={LEASE_S}), poll_s=0.05, warm=False).start()
time.sleep(600)
"""


def stand_in(mode: dict):
    """A `job_command` whose processes run the stand-in in `mode["now"]` (changed by the test between jobs)."""
    return lambda device, preload: [sys.executable, "-c", f"MODE = {mode['now']!r}\n" + STAND_IN]


def wait_until(condition, timeout_s: float = 20.0, what: str = "the condition") -> float:
    """Seconds until `condition()` held (polled every 50 ms)."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout_s, f"{what} did not happen within {timeout_s} s"
        time.sleep(0.05)
    return time.monotonic() - start


@contextmanager
def peer(runs: Path):
    """A second worker on the same store, in a process of its own (what another server would be)."""
    with open(runs.parent / "peer.log", "wb") as log:  # its worker's messages
        process = subprocess.Popen([sys.executable, "-c", PEER, str(runs)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=log)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def test_a_survivor_marks_the_job_of_a_killed_peer_interrupted_and_runs_it_again(tmp_path, monkeypatch):
    """Two workers on one store, the peer in its own process: while it lives it keeps its job (its
    lease is renewed); killed with SIGKILL, its lease expires and the survivor marks the job
    interrupted within the lease and one renewal period; resumed, the survivor runs it to the end."""
    store = JobStore(tmp_path / "runs", lease_s=LEASE_S)
    job = store.create("m", UnlearnConfig(steps=3), [instance()], owner="alice")
    monkeypatch.setattr(worker_module, "job_command", stand_in({"now": "finish"}))
    survivor = None
    with peer(store.runs_dir) as other:
        try:
            wait_until(lambda: store.get(job.id).state == "running", what="the peer's claim", timeout_s=90)  # the peer imports torch and diffusers first
            assert store.get(job.id).runner.split("/")[0].endswith(f":{other.pid}")
            survivor = JobWorker(store, poll_s=0.05, warm=False).start()
            first_lease = store.get(job.id).lease_expires
            time.sleep(2.5 * LEASE_S)
            assert store.get(job.id).state == "running", "a live peer's job was taken from it"
            assert store.get(job.id).lease_expires > first_lease, "the peer did not renew its lease"
            other.send_signal(signal.SIGKILL)
            other.wait(10)
            waited = wait_until(lambda: store.get(job.id).state == "interrupted", timeout_s=10, what="the dead peer's job marked interrupted")
            assert waited <= LEASE_S + survivor.renew_every_s + 1.0
            assert store.pending("alice") == 0, "an interrupted job still holds its owner's pending slot"
            store.resume(job.id, owner="alice")
            survivor.wake()
            wait_until(lambda: store.get(job.id).state == "done", what="the resumed job's end")
            assert store.get(job.id).runner == survivor.runner
        finally:
            if survivor:
                survivor.stop()


def stop_outside_a_transaction(process: subprocess.Popen, db_path: Path) -> None:
    """SIGSTOP `process` at a moment it holds no write lock on the store (a writer stopped in its
    transaction would block every other for SQLite's 30 s timeout)."""
    for _ in range(100):
        process.send_signal(signal.SIGSTOP)
        wait_until(lambda: Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T", what="the stop")
        with closing(sqlite3.connect(db_path, timeout=0.1, isolation_level=None)) as db:
            try:
                db.execute("BEGIN IMMEDIATE")
                db.execute("ROLLBACK")
                return
            except sqlite3.OperationalError:  # stopped in the middle of a write: let it finish
                process.send_signal(signal.SIGCONT)
                time.sleep(0.02)
    raise AssertionError("the peer was always in a transaction")


def test_a_runner_that_lost_its_lease_stops_its_job(tmp_path):
    """A peer that hangs longer than its lease (SIGSTOP) finds, when it wakes, that its job was marked
    interrupted (here by a starting server's sweep): it stops the job's process rather than run it
    beside whoever resumes it."""
    store = JobStore(tmp_path / "runs", lease_s=LEASE_S)
    job = store.create("m", UnlearnConfig(steps=3), [instance()])
    with peer(store.runs_dir) as other:
        wait_until(lambda: job.folder.read_status().get("step", 0) >= 2, what="the peer's job process at work", timeout_s=90)
        stop_outside_a_transaction(other, store.db_path)
        time.sleep(LEASE_S + 0.2)
        assert store.expire_leases() == [job.id]
        other.send_signal(signal.SIGCONT)
        log = store.runs_dir.parent / "peer.log"
        wait_until(lambda: "lost its lease" in log.read_text(), what="the peer's next renewal")
        step = job.folder.read_status()["step"]
        time.sleep(0.5)
        assert job.folder.read_status()["step"] == step, "the job's process went on after its runner lost the lease"
        assert other.poll() is None and store.get(job.id).state == "interrupted"


@contextmanager
def read_only(folder: Path):
    """`folder` read-only, a real file-system fault. As root (where permissions do not stop writes) a
    read-only bind mount over it; otherwise its write permission removed."""
    if os.geteuid() != 0:
        mode = folder.stat().st_mode
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(mode)
        return
    bound = subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True, text=True)
    if bound.returncode != 0:
        pytest.skip(f"root here may not mount (needed to make a folder read-only): {bound.stderr.strip()}")
    try:
        for _ in range(20):  # EBUSY while a file is open for writing through the new mount: try again
            if subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], capture_output=True).returncode == 0:
                break
            time.sleep(0.05)
        else:
            raise RuntimeError("could not remount the folder read-only")
        yield
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_the_worker_outlives_a_read_only_store_and_runs_the_next_job(tmp_path, monkeypatch, capsys):
    """The runs folder (the store and the run folders) turns read-only twice: while the worker waits
    for jobs, and in the middle of a job. The worker thread lives through both; the job it was
    running ends failed or interrupted with a message once the folder is writable again, and the
    next job runs to its end."""
    store = JobStore(tmp_path / "runs", lease_s=LEASE_S)
    mode = {"now": "ignore"}  # the first job runs until the fault stops it
    monkeypatch.setattr(worker_module, "job_command", stand_in(mode))
    worker = JobWorker(store, poll_s=0.05, warm=False).start()
    try:
        time.sleep(0.3)
        with read_only(store.runs_dir):  # idle: the worker's claims and sweeps fail
            time.sleep(1.5)
            assert worker._thread.is_alive()
        hit = store.create("m", UnlearnConfig(steps=3), [instance(1)])
        worker.wake()
        wait_until(lambda: store.get(hit.id).step >= 2, what="the first job's progress")
        with read_only(store.runs_dir):  # mid-job: the job's process and the worker's store writes fail
            time.sleep(1.5)
            assert worker._thread.is_alive()
        wait_until(lambda: store.get(hit.id).state != "running", what="the first job's end")
        ended = store.get(hit.id)
        assert ended.state in ("failed", "interrupted") and ended.error, ended
        assert str(tmp_path) not in ended.error and "Traceback" not in ended.error
        mode["now"] = "finish"
        after = store.create("m", UnlearnConfig(steps=3), [instance(2)])
        worker.wake()
        wait_until(lambda: store.get(after.id).state == "done", what="the next job's end")
        assert worker._thread.is_alive()
        store.resume(hit.id)  # the failed or interrupted job can be run again
        wait_until(lambda: store.get(hit.id).state == "done", what="the resumed job's end")
    finally:
        worker.stop()
    log = capsys.readouterr().err
    assert "could not look for jobs" in log and "job store failed" in log, log  # said, once a fault, not once a retry
    assert log.count("could not look for jobs") <= 2, log
