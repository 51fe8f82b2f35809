"""The job store and worker (no model: the worker runs stand-in subprocesses here)."""

from __future__ import annotations

import os
import sys
import threading
import time

import pytest
from PIL import Image

from unlearn_core import worker as worker_module
from unlearn_core.config import InstanceTarget, UnlearnConfig, max_training_steps
from unlearn_core.errors import JobNotFound, JobStateError, NotReady
from unlearn_core.store import JobStore, progress
from unlearn_core.worker import JobWorker, job_command


def instance(seed: int = 3, with_target: bool = True) -> dict:
    surrogate = Image.new("RGB", (16, 16), (10, 200, 30))
    target = Image.new("RGB", (16, 16), (200, 10, 30)) if with_target else None
    return {"prompt": "flag of ireland", "seed": seed, "surrogate": surrogate, "target": target}


@pytest.fixture()
def store(tmp_path) -> JobStore:
    return JobStore(tmp_path / "runs")


def test_create_list_get_update(store):
    config = UnlearnConfig(steps=7, remember_prompts=["flag of japan"])
    first = store.create("assets/demo-model", config, [instance()])
    time.sleep(0.01)
    second = store.create("assets/demo-model", UnlearnConfig(steps=3), [instance(5, with_target=False)])
    assert first.state == "queued" and first.total == max_training_steps(config) == 7 + 90 + 15 and first.id != second.id  # the most it may train: extended, then consolidated
    assert len(first.id) >= 16 and first.id[0].isalpha()
    assert [job.id for job in store.list()] == [second.id, first.id]  # newest first
    assert (store.jobs_dir / first.id / "inputs" / "surrogate_0.png").is_file()
    assert Image.open(first.targets[0]["target_path"]).size == (16, 16)
    assert second.targets[0]["target_path"] is None
    assert not first.folder.status_file.exists()  # status.json is the job process's own: the store's row is the state
    store.update(first.id, step=3, state="running")
    again = store.get(first.id)
    assert (again.state, again.step, again.config["remember_prompts"]) == ("running", 3, ["flag of japan"])
    assert UnlearnConfig.from_dict(again.config) == config
    with pytest.raises(ValueError):
        store.update(first.id, state="exploded")
    with pytest.raises(ValueError):
        store.update(first.id, run_dir="/etc")
    assert store.get("../../etc/passwd") is None and store.get("") is None and store.get("nope-nope-nope") is None


def test_create_refuses_mixed_or_missing_targets(store):
    with pytest.raises(ValueError):
        store.create("m", UnlearnConfig(), [])
    with pytest.raises(ValueError):
        store.create("m", UnlearnConfig(), [instance(1), instance(2, with_target=False)])


def test_claim_next_is_in_order_and_exclusive(store):
    ids = [store.create("m", UnlearnConfig(steps=1), [instance(i)]).id for i in range(6)]
    claimed, lock = [], threading.Lock()

    def claim():
        while (job := store.claim_next()) is not None:
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=claim) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(claimed) == sorted(ids) and len(set(claimed)) == 6
    assert all(store.get(i).state == "running" for i in ids)


def test_expired_leases_are_interrupted_on_any_host_live_ones_kept_and_resume_requeues(tmp_path):
    """A server starts on a runs folder whose jobs were run from hosts that no longer exist: the job
    whose lease expired becomes interrupted (and frees its owner's pending slot); the job whose
    runner, on another host, renewed its lease a moment ago stays running."""
    store = JobStore(tmp_path / "runs", lease_s=0.5)
    running = store.create("m", UnlearnConfig(), [instance(1)], owner="alice")
    live = store.create("m", UnlearnConfig(), [instance(2)])
    queued = store.create("m", UnlearnConfig(), [instance(3)])
    done = store.create("m", UnlearnConfig(), [instance(4)])
    assert store.claim_next("gone-host:7/auto").id == running.id and store.claim_next("other-host:7/auto").id == live.id  # in creation order
    store.update(running.id, step=12)
    store.update(done.id, state="done")
    assert store.expire_leases() == [] and store.pending("alice") == 1  # both leases are fresh
    time.sleep(0.6)
    assert store.renew(live.id, "other-host:7/auto") and not store.renew(live.id, "gone-host:7/auto")  # only its runner renews it
    reopened = JobStore(tmp_path / "runs", lease_s=30)  # a new server, on a new host, on the same folder
    assert reopened.expire_leases() == [running.id]
    assert reopened.get(running.id).state == "interrupted" and reopened.get(running.id).step == 12
    assert "resume" in reopened.get(running.id).error and reopened.pending("alice") == 0
    assert reopened.get(live.id).state == "running", "a live runner on another host keeps its job"
    assert reopened.get(queued.id).state == "queued", "a queued job stays queued across a restart"
    assert reopened.get(done.id).state == "done"
    assert not reopened.renew(running.id, "gone-host:7/auto"), "a runner whose lease expired has lost its job"
    running.folder.cancel_flag.write_text("old")
    assert reopened.resume(running.id).state == "queued"
    assert not running.folder.cancel_flag.exists()
    with pytest.raises(JobStateError, match="only"):
        reopened.resume(done.id)
    with pytest.raises(JobNotFound):
        reopened.resume("jDoesNotExist123")


def test_a_store_of_an_older_version_gets_leases_and_its_running_jobs_are_interrupted(tmp_path):
    """A jobs.sqlite written before leases (no lease_expires column) is migrated when opened; its
    running job has no lease, so a starting server marks it interrupted, and it can be resumed."""
    import sqlite3

    old = JobStore(tmp_path / "runs")
    job = old.create("m", UnlearnConfig(), [instance(1)])
    old.claim_next("old-host:1")
    with sqlite3.connect(old.db_path) as db:  # back to the older schema, as an older version left it
        db.execute("ALTER TABLE jobs DROP COLUMN lease_expires")
    store = JobStore(tmp_path / "runs")
    assert store.get(job.id).state == "running" and store.get(job.id).lease_expires == 0
    assert store.expire_leases() == [job.id]
    assert store.resume(job.id).state == "queued"


def test_cancel_queued_and_running(store):
    queued = store.create("m", UnlearnConfig(), [instance(1)])
    assert store.cancel(queued.id).state == "cancelled"
    running = store.create("m", UnlearnConfig(), [instance(2)])
    assert store.claim_next("here:1").id == running.id  # running, with a fresh lease
    store.cancel(running.id)
    assert running.folder.cancel_flag.is_file()
    with pytest.raises(JobStateError):
        store.cancel(queued.id)  # already cancelled


def test_download_paths_never_leave_the_runs_folder(store, tmp_path):
    job = store.create("m", UnlearnConfig(), [instance()])
    inside = store.resolve_path(job.folder.input_image("surrogate", 0))
    assert inside.is_file()
    assert store.resolve_path(f"jobs/{job.id}") == job.folder.path.resolve()
    outside = tmp_path / "secret.txt"
    outside.write_text("no")
    (job.folder.path / "link").symlink_to(outside)
    for path in ("/etc/passwd", "../secret.txt", f"jobs/{job.id}/../../../secret.txt", str(outside), job.folder.path / "link", str(tmp_path)):
        with pytest.raises(PermissionError):
            store.resolve_path(path)
    with pytest.raises(NotReady, match="no adapter"):
        store.adapter_files(job.id)
    (job.folder.path / "pytorch_lora_weights.safetensors").write_bytes(b"x")
    (job.folder.path / "adapter_card.json").write_text("{}")
    assert [p.name for p in store.adapter_files(job.id)] == ["pytorch_lora_weights.safetensors", "adapter_card.json"]


def test_the_run_folder_carries_the_whole_request(store):
    config = UnlearnConfig(steps=9, seed=4, method="siss", remember_prompts=["flag of japan", "-flag starting with a dash"],
                           eval_prompts=["flag of france"], gradient_checkpointing=True, lambda_schedule="constant")
    job = store.create("assets/demo-model", config, [instance(11)])
    assert job_command("cpu", None) == [sys.executable, "-m", "unlearn_core.worker", "--wait", "--device=cpu"]  # the run folder comes on stdin, nothing else is needed
    request = job.folder.read_request()
    assert UnlearnConfig.from_dict(request["config"]) == config  # the job process trains with exactly the stored settings
    assert request["model"] == "assets/demo-model"
    target = InstanceTarget(**request["targets"][0])
    assert (target.prompt, target.seed) == ("flag of ireland", 11)
    assert Image.open(target.target_path).size == (16, 16) and Image.open(target.surrogate_path).getpixel((0, 0)) == (10, 200, 30)


STAND_IN = """
import json, os, sys, time
out = sys.stdin.readline().strip()  # as the real job process, it learns its run folder once it is handed the job
for step in range(1, 1000):
    json.dump({"state": "running", "step": step, "total": 1000}, open(os.path.join(out, "status.tmp"), "w"))
    os.replace(os.path.join(out, "status.tmp"), os.path.join(out, "status.json"))
    if os.path.exists(os.path.join(out, "CANCEL")) and MODE == "obey":
        json.dump({"state": "cancelled", "step": step, "total": 1000}, open(os.path.join(out, "status.json"), "w"))
        sys.exit(1)
    if MODE == "finish" and step == 3:
        json.dump({"state": "done", "step": 3, "total": 3, "pid": os.getpid()}, open(os.path.join(out, "status.json"), "w"))
        sys.exit(0)
    if MODE == "crash" and step == 2:
        print("error: something broke", file=sys.stderr)
        sys.exit(2)
    time.sleep(0.05)
"""


@pytest.mark.parametrize("mode, cancel, expected", [("finish", False, "done"), ("crash", False, "failed"), ("obey", True, "cancelled"), ("ignore", True, "cancelled")])
def test_worker_runs_subprocesses_to_their_end(store, monkeypatch, mode, cancel, expected):
    monkeypatch.setattr(worker_module, "job_command", lambda device, preload: [sys.executable, "-c", f"MODE = {mode!r}\n" + STAND_IN])
    monkeypatch.setattr(worker_module, "CANCEL_GRACE_S", 0.5)
    worker = JobWorker(store, poll_s=0.05).start()
    try:
        job = store.create("m", UnlearnConfig(steps=3), [instance()])
        worker.wake()
        deadline = time.monotonic() + 60
        while store.get(job.id).state == "queued" and time.monotonic() < deadline:
            time.sleep(0.05)
        if cancel:
            while store.get(job.id).step < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            store.cancel(job.id)
        while store.get(job.id).state == "running" and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        worker.stop()
    final = store.get(job.id)
    assert final.state == expected, final
    if expected == "failed":
        assert "something broke" in final.error
    assert progress(final)["state"] == expected
    assert os.path.isfile(os.path.join(final.run_dir, "worker.log"))


def test_each_job_runs_in_the_process_that_waited_for_it(store, monkeypatch):
    """A warm worker starts the next job's process ahead (at start and after each job) and hands it
    the run folder when the job comes; every job still has a process of its own, and stopping the
    worker ends the one left waiting."""
    monkeypatch.setattr(worker_module, "job_command", lambda device, preload: [sys.executable, "-c", "MODE = 'finish'\n" + STAND_IN])
    worker = JobWorker(store, poll_s=0.05).start()
    handed = []
    try:
        for seed in (1, 2):
            deadline = time.monotonic() + 60
            while worker._waiting is None and time.monotonic() < deadline:
                time.sleep(0.05)
            waiting = worker._waiting
            assert waiting is not None and waiting.poll() is None, "no process was waiting for the next job"
            job = store.create("m", UnlearnConfig(steps=3), [instance(seed)])
            worker.wake()
            while store.get(job.id).state != "done" and time.monotonic() < deadline:
                time.sleep(0.05)
            assert store.get(job.id).state == "done"
            assert job.folder.read_status()["pid"] == waiting.pid
            handed.append(waiting.pid)
        deadline = time.monotonic() + 60
        while worker._waiting is None and time.monotonic() < deadline:
            time.sleep(0.05)
        last_waiting = worker._waiting
    finally:
        worker.stop()
    assert handed[0] != handed[1]
    assert last_waiting.poll() is not None, "the process waiting for a next job outlived the worker"


def test_a_preloaded_model_serves_one_job_of_its_name_and_device_under_the_web_rules(monkeypatch):
    from unlearn_core import settings
    from unlearn_core.errors import ModelLoadError

    from unlearn_core import job_process

    loaded, other = object(), object()
    monkeypatch.setitem(job_process._preloaded, ("assets/demo-model", "cpu"), loaded)
    monkeypatch.setitem(job_process._preloaded, ("/models/private", "cpu"), other)
    monkeypatch.setattr(settings, "_current", settings.Settings(host="0.0.0.0"))  # a server others reach
    assert job_process._take_preloaded("assets/demo-model", "cuda", web=True) is None  # another device: the job loads its own
    assert job_process._take_preloaded("assets/demo-model", "cpu", web=True) is loaded
    assert job_process._take_preloaded("assets/demo-model", "cpu", web=True) is None  # one job per process
    with pytest.raises(ModelLoadError, match="offers the demo model"):
        job_process._take_preloaded("/models/private", "cpu", web=True)  # preloaded or not, the web's rules hold


def test_another_owner_sees_nothing_and_can_do_nothing(store):
    mine = store.create("m", UnlearnConfig(), [instance(1)], owner="alice")
    store.create("m", UnlearnConfig(), [instance(2)], owner="bob")
    assert [job.id for job in store.list(owner="alice")] == [mine.id]
    assert store.get(mine.id, owner="bob") is None and store.get(mine.id, owner="alice").id == mine.id
    for act in (store.cancel, store.resume, store.adapter_files, store.require):
        with pytest.raises(JobNotFound, match="no job"):  # the same words as for a job that does not exist
            act(mine.id, owner="bob")
    assert store.pending("alice") == 1 and store.get(mine.id).state == "queued"
    assert store.cancel(mine.id, owner="alice").state == "cancelled"


def test_simultaneous_starts_pass_the_limit_once(tmp_path):
    """Four starts at once by an owner limited to 1: the count and the insert are one transaction,
    so exactly one job is created (it was 3 of 4: check, write the files, then insert); the refused
    ones leave no folder behind."""
    from unlearn_core.errors import InvalidInput

    store = JobStore(tmp_path / "runs", max_pending_per_owner=1)
    barrier, created, refused = threading.Barrier(4), [], []

    def start(seed: int):
        own = JobStore(tmp_path / "runs", max_pending_per_owner=1)  # as a second server would, with its own connection
        barrier.wait()
        try:
            created.append(own.create("m", UnlearnConfig(), [instance(seed)], owner="user:alice").id)
        except InvalidInput as error:
            refused.append(str(error))

    threads = [threading.Thread(target=start, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(created) == 1 and len(refused) == 3, (created, refused)
    assert all("already have 1 jobs queued or running" in message for message in refused)
    assert [job.id for job in store.list()] == created
    assert sorted(p.name for p in (tmp_path / "runs" / "jobs").iterdir()) == created


def test_anonymous_sessions_of_one_address_share_a_limit_and_the_queue_has_one(tmp_path):
    """New session hashes cost nothing: the anonymous sessions of one network address count together;
    accounts and other addresses do not; and the whole queue has a limit of its own."""
    from unlearn_core.errors import InvalidInput

    store = JobStore(tmp_path / "runs", max_pending_per_owner=8, max_pending_per_address=2, max_queued=3)
    store.create("m", UnlearnConfig(), [instance(1)], owner="session:a", address="203.0.113.7")
    store.create("m", UnlearnConfig(), [instance(2)], owner="session:b", address="203.0.113.7")
    with pytest.raises(InvalidInput, match="2 jobs from your network address"):
        store.create("m", UnlearnConfig(), [instance(3)], owner="session:c", address="203.0.113.7")
    store.create("m", UnlearnConfig(), [instance(4)], owner="session:d", address="198.51.100.1")
    first = store.list(owner="session:a")[0]
    store.cancel(first.id, owner="session:a")  # a finished or cancelled job frees its slot
    store.create("m", UnlearnConfig(), [instance(5)], owner="session:c", address="203.0.113.7")
    with pytest.raises(InvalidInput, match=r"queue is full \(3 jobs"):
        store.create("m", UnlearnConfig(), [instance(6)], owner="user:bob")
    assert len(list((tmp_path / "runs" / "jobs").iterdir())) == 4  # a refused job leaves no folder


def test_the_client_address_is_the_proxy_s_only_where_one_is_trusted(monkeypatch):
    import gradio as gr
    from starlette.requests import Request

    from ui.common import anonymous_address, client_address
    from unlearn_core import settings

    scope = {"type": "http", "method": "POST", "path": "/", "client": ("10.16.3.80", 5000),
             "headers": [(b"x-forwarded-for", b"203.0.113.7, 10.0.0.2")]}
    request = gr.Request(request=Request(scope))
    monkeypatch.setattr(settings, "_current", settings.Settings.from_env({}))
    assert client_address(request) == "10.16.3.80"  # not behind a proxy: a client may write the header itself
    monkeypatch.setattr(settings, "_current", settings.Settings.from_env({"SYSTEM": "spaces"}))
    assert client_address(request) == "203.0.113.7" == anonymous_address(request)
    monkeypatch.setattr(settings, "_current", settings.Settings.from_env({"HOTFIX_TRUST_PROXY": "0", "SYSTEM": "spaces"}))
    assert client_address(request) == "10.16.3.80"


def test_damaged_run_files_are_named_and_the_pages_keep_working(tmp_path):
    """Random bytes in loss_log.csv broke the job status, the poll and Results ('utf-8' codec
    error); a corrupt adapter_card.json gave a raw JSON error; a corrupt config.json blocked Resume.
    Now each damaged file is named in a plain message, the rest of the job is shown, and Resume
    rewrites config.json from the store's row (which holds the whole request)."""
    from app import build
    from ui.common import Services, loss_frame
    from unlearn_core.errors import DamagedRunFile

    store = JobStore(tmp_path / "runs")
    job = store.create("assets/demo-model", UnlearnConfig(steps=7), [instance(1)], owner="session:unknown")  # a handler called without a request acts as this owner
    store.update(job.id, state="done", step=7)
    folder = job.folder
    folder.loss_log.write_bytes(bytes(range(128, 256)) * 8)  # not UTF-8
    folder.metrics_file.write_text('{"timing": {"steps_run": 5}')  # cut short
    folder.card_file.write_bytes(b"\x00\xff" * 40)
    folder.after_image(0).write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    info = progress(store.get(job.id))
    assert info["state"] == "done" and "loss_log.csv" in info["damaged"]
    assert loss_frame(job.run_dir) is None
    with pytest.raises(DamagedRunFile, match="adapter_card.json"):
        folder.read_card()

    demo = build(Services(store, None, "cpu"))
    handlers = {fn.name: fn.fn for fn in demo.fns.values()}
    summary = handlers["show"](job.id, None, None)[0]  # job, request, signed-in profile
    assert all(name in summary for name in ("metrics.json", "loss_log.csv", "after_0.png")), summary
    assert str(tmp_path) not in summary and "Traceback" not in summary
    polled = handlers["poll"](job.id, "", None, None)[0]
    assert "metrics.json" in polled and "loss_log.csv" in polled, polled

    store.update(job.id, state="failed")
    folder.config_file.write_bytes(b"\xde\xad\xbe\xef")
    resumed = store.resume(job.id)
    assert resumed.state == "queued"
    assert folder.read_request() == {"model": "assets/demo-model", "config": job.config, "targets": job.targets}
