"""The job store: unlearning jobs that outlive a browser tab.

One row per job in `runs/jobs.sqlite` (WAL mode, one connection per call, so any thread may use
it); the row is the job's state. A job's files live in its `RunFolder`, `runs/jobs/<job_id>/`:
`create` writes the uploaded images and `config.json` there once, and the worker
(`unlearn_core.worker`) runs that folder.

Each row names its owner (who may see and act on it) and, while it runs, the worker that runs it
(`runner`, for people to read) and that worker's lease (`lease_expires`, a time). The worker
renews the lease every few seconds (`renew`); a runner that stops renewing, because its server
died, lost its host or hung, loses the job: any server on any host, at start and periodically,
turns running jobs whose lease has expired into "interrupted" (`expire_leases`). Liveness is the
lease alone, never a hostname or pid (a container restarts on a new host, a pid is reused).
`resume()` queues an interrupted job again: the job process resumes from the folder's
checkpoint. Queued jobs stay queued across a restart. Every state change is one conditional
UPDATE, so two callers (or two servers) never both win.

Never imports gradio.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import sqlite3
import time
from contextlib import closing
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image

from unlearn_core.config import InstanceTarget, UnlearnConfig, check_job_size, check_prompt, check_seed, max_training_steps
from unlearn_core.errors import AccessDenied, DamagedRunFile, InvalidInput, JobNotFound, JobStateError, NotReady
from unlearn_core.files import save_image_atomic
from unlearn_core import settings
from unlearn_core.runfolder import RunFolder

STATES = ("queued", "running", "done", "failed", "cancelled", "interrupted")
RESUMABLE = ("interrupted", "failed", "cancelled")
JOB_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    model TEXT NOT NULL,
    targets TEXT NOT NULL,
    config TEXT NOT NULL,
    state TEXT NOT NULL,
    step INTEGER NOT NULL DEFAULT 0,
    total INTEGER NOT NULL DEFAULT 0,
    error TEXT NOT NULL DEFAULT '',
    run_dir TEXT NOT NULL,
    owner TEXT NOT NULL DEFAULT '',
    runner TEXT NOT NULL DEFAULT '',
    lease_expires REAL NOT NULL DEFAULT 0,
    address TEXT NOT NULL DEFAULT ''
)
"""
ADDED_COLUMNS = {"owner": "TEXT NOT NULL DEFAULT ''", "runner": "TEXT NOT NULL DEFAULT ''",  # stores written by older versions
                 "lease_expires": "REAL NOT NULL DEFAULT 0",  # 0: an old store's running job has no lease, so it is expired
                 "address": "TEXT NOT NULL DEFAULT ''"}
LEASE_LOST = "the server running this job stopped or lost contact with the job store; resume it"


@dataclass
class Job:
    """One row of the store."""

    id: str
    created: float
    updated: float
    model: str
    targets: list[dict]
    config: dict
    state: str
    step: int
    total: int
    error: str
    run_dir: str
    owner: str = ""
    runner: str = ""  # the worker that runs it (host:pid/worker), for people to read
    lease_expires: float = 0.0  # while running: when the job counts as abandoned unless its runner renews the lease
    address: str = ""  # the network address of an anonymous visitor who queued it ('' for an account), for its limit

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def folder(self) -> RunFolder:
        return RunFolder(self.run_dir)


class JobStore:
    """Jobs in SQLite under `runs_dir`; every method opens its own connection (thread-safe)."""

    def __init__(self, runs_dir: str | os.PathLike, max_job_work: int | None = None, max_pending_per_owner: int | None = None,
                 lease_s: float | None = None, max_queued: int | None = None, max_pending_per_address: int | None = None):
        """`max_job_work`, `max_pending_per_owner` (queued or running jobs of one owner),
        `max_pending_per_address` (of the anonymous visitors of one network address together) and
        `max_queued` (of everyone) bound what `create` accepts (None: no bound, as for the CLI and
        tests; the web app passes its settings). `lease_s`: how long a running job's lease lasts
        unrenewed (None: `HOTFIX_LEASE_S`, 30 s)."""
        self.max_job_work, self.max_pending_per_owner = max_job_work, max_pending_per_owner
        self.max_queued, self.max_pending_per_address = max_queued, max_pending_per_address
        self.lease_s = float(lease_s if lease_s is not None else settings.current().lease_s)
        self.runs_dir = Path(runs_dir).resolve()
        self.jobs_dir = self.runs_dir / "jobs"
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.db_path = self.runs_dir / "jobs.sqlite"
        with closing(self._connect()) as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(SCHEMA)
            present = {row["name"] for row in db.execute("PRAGMA table_info(jobs)")}
            for column, kind in ADDED_COLUMNS.items():
                if column not in present:
                    db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {kind}")

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.db_path, timeout=30, isolation_level=None)  # autocommit; explicit BEGIN where needed
        db.row_factory = sqlite3.Row
        return db

    # -- rows ------------------------------------------------------------------------------
    @staticmethod
    def _job(row: sqlite3.Row) -> Job:
        data = dict(row)
        data["targets"] = json.loads(data["targets"])
        data["config"] = json.loads(data["config"])
        return Job(**data)

    def create(self, model: str, config: UnlearnConfig, instances: list[dict], owner: str = "", address: str = "") -> Job:
        """Queue a job. Each instance: {prompt, seed, surrogate: PIL image, target: PIL image | None}.
        `address`: the network address of an anonymous caller (its jobs count toward
        `max_pending_per_address` with those of every other anonymous session from there).

        The images and the request (`config.json`) are written into the job's run folder first,
        so the job needs nothing from the caller's session afterwards. The limits are checked and
        the row inserted in one `BEGIN IMMEDIATE` transaction: simultaneous starts cannot all pass
        the check before any of them is counted (a refused job's folder is removed again).
        """
        if not instances:
            raise InvalidInput("give at least one target to unlearn")
        if len({instance.get("target") is None for instance in instances}) > 1:
            raise InvalidInput("give a target image for every instance or for none")
        for instance in instances:  # refuse bad values before anything is written to disk
            check_prompt(instance.get("prompt", ""))
            check_seed(instance.get("seed"))
        if self.max_job_work is not None:
            check_job_size(config, len(instances), self.max_job_work)
        with closing(self._connect()) as db:  # a quick refusal before anything is written (the transaction below decides)
            self._check_limits(db, owner, address)
        job_id = "j" + secrets.token_urlsafe(12)  # a letter first: never mistaken for an option
        folder = RunFolder(self.jobs_dir / job_id).create()
        try:
            targets = [vars(self._save_instance(folder, index, instance)) for index, instance in enumerate(instances)]
            folder.write_request(model, config.to_dict(), targets)
            with closing(self._connect()) as db:
                db.execute("BEGIN IMMEDIATE")  # one writer at a time, across threads and servers, from the count to the insert
                try:
                    self._check_limits(db, owner, address)
                    now = time.time()
                    db.execute(
                        "INSERT INTO jobs (id, created, updated, model, targets, config, state, step, total, error, run_dir, owner, address) "
                        "VALUES (?, ?, ?, ?, ?, ?, 'queued', 0, ?, '', ?, ?, ?)",
                        (job_id, now, now, model, json.dumps(targets), json.dumps(config.to_dict()), max_training_steps(config), str(folder.path), owner, address or ""),
                    )
                    db.execute("COMMIT")
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
        except BaseException:
            shutil.rmtree(folder.path, ignore_errors=True)  # a refused or failed job leaves no folder behind
            raise
        return self.get(job_id)

    def _check_limits(self, db: sqlite3.Connection, owner: str, address: str) -> None:
        """Refuse a new job over the owner's, the address's or the server's pending-job limit."""
        def pending(where: str = "", *args) -> int:
            return db.execute(f"SELECT COUNT(*) FROM jobs WHERE state IN ('queued', 'running'){where}", args).fetchone()[0]

        if self.max_pending_per_owner is not None and pending(" AND owner = ?", owner) >= self.max_pending_per_owner:
            raise InvalidInput(f"you already have {self.max_pending_per_owner} jobs queued or running; wait for one to finish or cancel one")
        if address and self.max_pending_per_address is not None and pending(" AND address = ?", address) >= self.max_pending_per_address:
            raise InvalidInput(f"{self.max_pending_per_address} jobs from your network address are already queued or running (the limit for "
                               "visitors without an account); wait for one to finish or cancel one")
        if self.max_queued is not None and pending() >= self.max_queued:
            raise InvalidInput(f"the server's queue is full ({self.max_queued} jobs queued or running); try again later")

    @staticmethod
    def _save_instance(folder: RunFolder, index: int, instance: dict) -> InstanceTarget:
        """Keep the instance's images, no larger than needed: the surrogate at the target's size
        (the model's), and neither over MAX_KEPT_SIDE pixels a side."""
        surrogate: Image.Image = instance["surrogate"]
        if instance.get("target") is not None:
            instance = {**instance, "target": _bounded(instance["target"])}
            surrogate = surrogate.resize(instance["target"].size, Image.Resampling.LANCZOS) if surrogate.size != instance["target"].size else surrogate
        surrogate = _bounded(surrogate)
        surrogate_path = save_image_atomic(surrogate, folder.input_image("surrogate", index))
        target_path = None
        if instance.get("target") is not None:
            target_path = str(save_image_atomic(instance["target"], folder.input_image("target", index)))
        return InstanceTarget(str(instance["prompt"]), int(instance["seed"]), str(surrogate_path), target_path)

    def get(self, job_id: str, owner: str | None = None) -> Job | None:
        """The job, if it exists and `owner` may see it (None: any owner, for the server's own use)."""
        if not isinstance(job_id, str) or not JOB_ID.match(job_id.strip()):
            return None
        with closing(self._connect()) as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id.strip(),)).fetchone()
        job = self._job(row) if row else None
        return job if job is not None and (owner is None or job.owner == owner) else None

    def require(self, job_id: str, owner: str | None = None) -> Job:
        """As `get`; another owner's job is refused exactly like a missing one (ids are not confirmed)."""
        job = self.get(job_id, owner)
        if job is None:
            raise JobNotFound(f"no job {job_id!r}")
        return job

    def list(self, owner: str | None = None, limit: int = 200) -> list[Job]:
        """Newest first; only `owner`'s jobs unless owner is None."""
        with closing(self._connect()) as db:
            if owner is None:
                rows = db.execute("SELECT * FROM jobs ORDER BY created DESC LIMIT ?", (limit,)).fetchall()
            else:
                rows = db.execute("SELECT * FROM jobs WHERE owner = ? ORDER BY created DESC LIMIT ?", (owner, limit)).fetchall()
        return [self._job(row) for row in rows]

    def pending(self, owner: str) -> int:
        """How many of the owner's jobs are queued or running (for per-owner queue limits)."""
        with closing(self._connect()) as db:
            return db.execute("SELECT COUNT(*) FROM jobs WHERE owner = ? AND state IN ('queued', 'running')", (owner,)).fetchone()[0]

    def update(self, job_id: str, runner: str | None = None, **values) -> bool:
        """Set step, total, state or error. With `runner`, only while that runner holds the job
        (running, or interrupted by a peer and not queued again since): whether it did."""
        allowed = {"state", "step", "total", "error"}
        if not values or set(values) - allowed:
            raise InvalidInput(f"can only update {', '.join(sorted(allowed))}")
        if "state" in values and values["state"] not in STATES:
            raise InvalidInput(f"unknown state {values['state']!r}")
        columns = ", ".join(f"{name} = ?" for name in values)
        held = "" if runner is None else " AND runner = ? AND state IN ('running', 'interrupted')"
        with closing(self._connect()) as db:
            cursor = db.execute(f"UPDATE jobs SET {columns}, updated = ? WHERE id = ?{held}", (*values.values(), time.time(), job_id, *([runner] if runner is not None else [])))
            return cursor.rowcount == 1

    def _switch(self, job_id: str, to: str, when: tuple[str, ...], error: str = "") -> bool:
        """Move a job to `to` only if it is in one of `when`, in one statement (no check-then-act race)."""
        marks = ", ".join("?" * len(when))
        with closing(self._connect()) as db:
            cursor = db.execute(f"UPDATE jobs SET state = ?, error = ?, updated = ? WHERE id = ? AND state IN ({marks})", (to, error, time.time(), job_id, *when))
            return cursor.rowcount == 1

    def claim_next(self, runner: str = "") -> Job | None:
        """The oldest queued job, atomically switched to running by `runner`, with a fresh lease
        (several workers may ask)."""
        with closing(self._connect()) as db:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute("SELECT * FROM jobs WHERE state = 'queued' ORDER BY created LIMIT 1").fetchone()
            if row is None:
                db.execute("COMMIT")
                return None
            now = time.time()
            db.execute("UPDATE jobs SET state = 'running', error = '', runner = ?, lease_expires = ?, updated = ? WHERE id = ?", (runner, now + self.lease_s, now, row["id"]))
            db.execute("COMMIT")
        return self.get(row["id"])

    # -- life cycle ------------------------------------------------------------------------
    def renew(self, job_id: str, runner: str) -> bool:
        """Extend the lease of a job `runner` runs; False when it no longer holds it (its lease
        expired and another server marked the job interrupted): the runner must then stop the job."""
        with closing(self._connect()) as db:
            cursor = db.execute("UPDATE jobs SET lease_expires = ? WHERE id = ? AND runner = ? AND state = 'running'", (time.time() + self.lease_s, job_id, runner))
            return cursor.rowcount == 1

    def expire_leases(self) -> list[str]:
        """Running jobs whose lease has expired become 'interrupted' (their runner is gone, on this
        host or another); called by every server at start and periodically. Returns their ids."""
        with closing(self._connect()) as db:
            db.execute("BEGIN IMMEDIATE")
            now = time.time()
            ids = [row["id"] for row in db.execute("SELECT id FROM jobs WHERE state = 'running' AND lease_expires < ?", (now,))]
            for job_id in ids:
                db.execute("UPDATE jobs SET state = 'interrupted', error = ?, updated = ? WHERE id = ?", (LEASE_LOST, now, job_id))
            db.execute("COMMIT")
        return ids

    def cancel(self, job_id: str, owner: str | None = None) -> Job:
        """Queued → cancelled now; running → ask the job's process to stop (its cancel flag)."""
        job = self.require(job_id, owner)
        self.expire_leases()  # a job whose runner is gone is interrupted, not waiting for a flag nobody reads
        if self._switch(job.id, "cancelled", ("queued",), "cancelled before it started"):
            return self.require(job_id)
        job = self.require(job_id)
        if job.state != "running":
            raise JobStateError(f"job {job.id} is {job.state}; only queued or running jobs can be cancelled")
        job.folder.request_cancel()
        return job

    def resume(self, job_id: str, owner: str | None = None) -> Job:
        """Queue an interrupted, failed or cancelled job again; it continues from its checkpoint."""
        job = self.require(job_id, owner)
        self.expire_leases()  # a job whose runner is gone may be resumed at once
        if not self._switch(job.id, "queued", RESUMABLE):
            raise JobStateError(f"job {job.id} is {self.require(job_id).state}; only {', '.join(RESUMABLE)} jobs can be resumed")
        try:
            job.folder.read_request()
        except NotReady:  # a damaged or missing config.json: the row holds the whole request
            job.folder.write_request(job.model, job.config, job.targets)
        job.folder.clear_cancel()
        return self.require(job_id)

    # -- files -----------------------------------------------------------------------------
    def resolve_path(self, path: str | os.PathLike) -> Path:
        """A path inside the runs folder (relative paths are taken from it); refuse anything else."""
        candidate = Path(path)
        if not candidate.is_absolute():
            candidate = self.runs_dir / candidate
        resolved = candidate.resolve()
        if resolved != self.runs_dir and self.runs_dir not in resolved.parents:
            raise AccessDenied(f"{path} is outside the runs folder")
        return resolved

    def adapter_files(self, job_id: str, owner: str | None = None) -> list[Path]:
        """The finished job's adapter weights and card (checked to lie in the runs folder)."""
        job = self.require(job_id, owner)
        folder = RunFolder(self.resolve_path(job.run_dir))
        files = folder.adapter_files()
        if not files or not folder.card_file.is_file():
            raise NotReady(f"job {job.id} has no adapter yet (state: {job.state})")
        return [self.resolve_path(path) for path in files]


MAX_KEPT_SIDE = 1024


def _bounded(image: Image.Image) -> Image.Image:
    if max(image.size) <= MAX_KEPT_SIDE:
        return image
    copy = image.copy()
    copy.thumbnail((MAX_KEPT_SIDE, MAX_KEPT_SIDE), Image.Resampling.LANCZOS)
    return copy


def this_runner() -> str:
    """This process's name in the `runner` column: host:pid (for people; the lease decides liveness)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def progress(job: Job) -> dict:
    """Step/total, latest losses, gradient-conflict rate and ETA, for display."""
    folder = job.folder
    damaged = ""
    try:
        rows = folder.read_loss_log()
    except DamagedRunFile as error:
        rows, damaged = [], str(error)
    step = max(job.step, int(rows[-1]["step"]) if rows else 0)
    total = job.total or job.config.get("steps", 0)
    info = {"id": job.id, "state": job.state, "step": step, "total": total, "error": job.error, "model": job.model,
            "loss_forget": None, "loss_remember": None, "conflict_rate": None, "seconds_per_step": None, "eta_s": None,
            "toward_surrogate": None, "stop_at_r": job.config.get("stop_at_r"), "damaged": damaged}
    if rows:
        recent = rows[-20:]
        seconds = sum(r["seconds_per_step"] for r in recent) / len(recent)
        info.update(loss_forget=rows[-1]["loss_forget"], loss_remember=rows[-1]["loss_remember"],
                    conflict_rate=sum(r["cosine"] < 0 for r in rows) / len(rows), seconds_per_step=seconds,
                    toward_surrogate=next((r["toward_surrogate"] for r in reversed(rows) if r.get("toward_surrogate") is not None), None))
        if job.state == "running":
            info["eta_s"] = max(0.0, (total - step) * seconds)
    status = folder.read_status()
    info["ran_on"] = status.get("ran_on", "")  # the device and host the job process reported
    if job.state != "running":
        status = {}
    info["phase"] = status.get("phase") or ("training" if rows and job.state == "running" else job.state)
    info["phase_started"] = status.get("phase_started", status.get("updated"))
    if info["phase"] == "remember set" and status.get("images_total"):
        info.update(images_done=int(status.get("images_done", 0)), images_total=int(status["images_total"]))
    return info
