"""Unlearning jobs that outlive a browser tab: a SQLite store and a worker (DESIGN §1.4, §6 floor 5).

- `JobStore`: one row per job in `runs/jobs.sqlite` (WAL mode, one connection per call, so any
  thread may use it). A job's run folder is `runs/jobs/<job_id>/`.
- `JobWorker`: one background thread per device. It takes queued jobs in order and runs each as
  a subprocess, `python -m unlearn_core unlearn ... --out run_dir`, so a crash or a hung model
  never takes the server down. It polls the run folder's `status.json` and `loss_log.csv`.
  Cancelling writes `run_dir/CANCEL` (the CLI checkpoints and stops); a process that does not
  stop within `CANCEL_GRACE_S` is killed.
- A server that dies leaves jobs "running"; `mark_interrupted()` (called at start-up) turns them
  into "interrupted", and `resume()` queues them again — the subprocess resumes from
  `run_dir/checkpoint.pt`.

Never imports gradio.
"""

from __future__ import annotations

import csv
import json
import os
import re
import secrets
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import closing
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from PIL import Image

from unlearn_core.config import InstanceTarget, UnlearnConfig, check_prompt, check_seed
from unlearn_core.images import save_atomic
from unlearn_core.run import read_status, write_status

STATES = ("queued", "running", "done", "failed", "cancelled", "interrupted")
RESUMABLE = ("interrupted", "failed", "cancelled")
FINISHED = ("done", "failed", "cancelled", "interrupted")
JOB_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
CANCEL_GRACE_S = 8.0
ROOT = Path(__file__).resolve().parent.parent  # the project folder: `python -m unlearn_core` runs from here
# Config fields whose CLI option has another name (the instance option `--seed` is the target's seed).
RENAMED_OPTIONS = {"seed": "train_seed"}

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
    run_dir TEXT NOT NULL
)
"""


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

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def folder(self) -> Path:
        return Path(self.run_dir)


class JobStore:
    """Jobs in SQLite under `runs_dir`; every method opens its own connection (thread-safe)."""

    def __init__(self, runs_dir: str | os.PathLike = "runs"):
        self.runs_dir = Path(runs_dir).resolve()
        self.jobs_dir = self.runs_dir / "jobs"
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.db_path = self.runs_dir / "jobs.sqlite"
        with closing(self._connect()) as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(SCHEMA)

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

    def create(self, model: str, config: UnlearnConfig, instances: list[dict]) -> Job:
        """Queue a job. Each instance: {prompt, seed, surrogate: PIL image, target: PIL image | None}.

        The images are written as PNG into the job's folder first, so the job needs nothing
        from the caller's session afterwards.
        """
        if not instances:
            raise ValueError("give at least one target to unlearn")
        if len({instance.get("target") is None for instance in instances}) > 1:
            raise ValueError("give a target image for every instance or for none")
        for instance in instances:  # refuse bad values before anything is written to disk
            check_prompt(instance.get("prompt", ""))
            check_seed(instance.get("seed"))
        job_id = "j" + secrets.token_urlsafe(12)  # a letter first: never mistaken for an option
        run_dir = self.jobs_dir / job_id
        inputs = run_dir / "inputs"
        targets = []
        for index, instance in enumerate(instances):
            surrogate: Image.Image = instance["surrogate"]
            surrogate_path = save_atomic(surrogate, inputs / f"surrogate_{index}.png")
            target_path = None
            if instance.get("target") is not None:
                target_path = str(save_atomic(instance["target"], inputs / f"target_{index}.png"))
            targets.append(vars(InstanceTarget(str(instance["prompt"]), int(instance["seed"]), str(surrogate_path), target_path)))
        now = time.time()
        with closing(self._connect()) as db:
            db.execute(
                "INSERT INTO jobs (id, created, updated, model, targets, config, state, step, total, error, run_dir) VALUES (?, ?, ?, ?, ?, ?, 'queued', 0, ?, '', ?)",
                (job_id, now, now, model, json.dumps(targets), json.dumps(config.to_dict()), config.steps, str(run_dir)),
            )
        write_status(run_dir, "queued", step=0, total=config.steps)
        return self.get(job_id)

    def get(self, job_id: str) -> Job | None:
        if not isinstance(job_id, str) or not JOB_ID.match(job_id.strip()):
            return None
        with closing(self._connect()) as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id.strip(),)).fetchone()
        return self._job(row) if row else None

    def require(self, job_id: str) -> Job:
        job = self.get(job_id)
        if job is None:
            raise KeyError(f"no job {job_id!r}")
        return job

    def list(self, limit: int = 200) -> list[Job]:
        """Newest first."""
        with closing(self._connect()) as db:
            rows = db.execute("SELECT * FROM jobs ORDER BY created DESC LIMIT ?", (limit,)).fetchall()
        return [self._job(row) for row in rows]

    def update(self, job_id: str, **values) -> None:
        allowed = {"state", "step", "total", "error"}
        if not values or set(values) - allowed:
            raise ValueError(f"can only update {', '.join(sorted(allowed))}")
        if "state" in values and values["state"] not in STATES:
            raise ValueError(f"unknown state {values['state']!r}")
        columns = ", ".join(f"{name} = ?" for name in values)
        with closing(self._connect()) as db:
            db.execute(f"UPDATE jobs SET {columns}, updated = ? WHERE id = ?", (*values.values(), time.time(), job_id))

    def claim_next(self) -> Job | None:
        """The oldest queued job, atomically switched to running (several workers may ask)."""
        with closing(self._connect()) as db:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute("SELECT * FROM jobs WHERE state = 'queued' ORDER BY created LIMIT 1").fetchone()
            if row is None:
                db.execute("COMMIT")
                return None
            db.execute("UPDATE jobs SET state = 'running', error = '', updated = ? WHERE id = ?", (time.time(), row["id"]))
            db.execute("COMMIT")
        return self.get(row["id"])

    # -- life cycle ------------------------------------------------------------------------
    def mark_interrupted(self) -> list[str]:
        """At start-up: jobs a dead server left running or queued become 'interrupted'."""
        with closing(self._connect()) as db:
            db.execute("BEGIN IMMEDIATE")
            ids = [row["id"] for row in db.execute("SELECT id FROM jobs WHERE state IN ('running', 'queued')")]
            db.execute("UPDATE jobs SET state = 'interrupted', error = 'the server stopped while the job was pending; resume it', updated = ? WHERE state IN ('running', 'queued')", (time.time(),))
            db.execute("COMMIT")
        for job_id in ids:
            job = self.get(job_id)
            write_status(job.folder, "interrupted", step=job.step, total=job.total)
        return ids

    def cancel(self, job_id: str) -> Job:
        """Queued → cancelled now; running → ask the worker's process to stop (CANCEL file)."""
        job = self.require(job_id)
        if job.state == "queued":
            self.update(job.id, state="cancelled", error="cancelled before it started")
        elif job.state == "running":
            _write_text_atomic(job.folder / "CANCEL", "cancel requested\n")
        else:
            raise ValueError(f"job {job.id} is {job.state}; only queued or running jobs can be cancelled")
        return self.require(job_id)

    def resume(self, job_id: str) -> Job:
        """Queue an interrupted, failed or cancelled job again; it continues from its checkpoint."""
        job = self.require(job_id)
        if job.state not in RESUMABLE:
            raise ValueError(f"job {job.id} is {job.state}; only {', '.join(RESUMABLE)} jobs can be resumed")
        (job.folder / "CANCEL").unlink(missing_ok=True)
        self.update(job.id, state="queued", error="")
        write_status(job.folder, "queued", step=job.step, total=job.total)
        return self.require(job_id)

    # -- files -----------------------------------------------------------------------------
    def resolve_path(self, path: str | os.PathLike) -> Path:
        """A path inside the runs folder (relative paths are taken from it); refuse anything else."""
        candidate = Path(path)
        if not candidate.is_absolute():
            candidate = self.runs_dir / candidate
        resolved = candidate.resolve()
        if resolved != self.runs_dir and self.runs_dir not in resolved.parents:
            raise PermissionError(f"{path} is outside the runs folder")
        return resolved

    def adapter_files(self, job_id: str) -> list[Path]:
        """The finished job's adapter weights and card (checked to lie in the runs folder)."""
        job = self.require(job_id)
        folder = self.resolve_path(job.run_dir)
        weights = [p for p in (folder / "pytorch_lora_weights.safetensors", folder / "adapter_model.safetensors") if p.is_file()]
        card = folder / "adapter_card.json"
        if not weights or not card.is_file():
            raise FileNotFoundError(f"job {job.id} has no adapter yet (state: {job.state})")
        return [self.resolve_path(weights[0]), self.resolve_path(card)]


# -- progress read from the run folder ---------------------------------------------------------
def read_loss_log(run_dir: str | os.PathLike) -> list[dict]:
    """Rows of loss_log.csv as numbers (empty while the run prepares)."""
    path = Path(run_dir) / "loss_log.csv"
    try:
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
    except OSError:
        return []
    parsed = []
    for row in rows:
        try:
            parsed.append({k: (v == "True" if k == "projected" else None if v == "" else float(v)) for k, v in row.items()})
        except (TypeError, ValueError):
            continue  # a line being written
    return parsed


def progress(job: Job) -> dict:
    """Step/total, latest losses, gradient-conflict rate and ETA, for display."""
    rows = read_loss_log(job.run_dir)
    step = max(job.step, int(rows[-1]["step"]) if rows else 0)
    total = job.total or job.config.get("steps", 0)
    info = {"id": job.id, "state": job.state, "step": step, "total": total, "error": job.error, "model": job.model,
            "loss_forget": None, "loss_remember": None, "conflict_rate": None, "seconds_per_step": None, "eta_s": None,
            "toward_surrogate": None, "stop_at_r": job.config.get("stop_at_r")}
    if rows:
        recent = rows[-20:]
        seconds = sum(r["seconds_per_step"] for r in recent) / len(recent)
        info.update(loss_forget=rows[-1]["loss_forget"], loss_remember=rows[-1]["loss_remember"],
                    conflict_rate=sum(r["cosine"] < 0 for r in rows) / len(rows), seconds_per_step=seconds,
                    toward_surrogate=next((r["toward_surrogate"] for r in reversed(rows) if r.get("toward_surrogate") is not None), None))
        if job.state == "running":
            info["eta_s"] = max(0.0, (total - step) * seconds)
    status = read_status(job.run_dir)
    info["phase"] = status.get("phase") or ("training" if rows and job.state == "running" else job.state)
    return info


# -- the worker ----------------------------------------------------------------------------------
def build_command(job: Job, device: str = "auto") -> list[str]:
    """`python -m unlearn_core unlearn` with every config field spelled out (`--opt=value`, so a
    prompt that starts with '-' stays a value)."""
    config = UnlearnConfig.from_dict(job.config)  # validates what was stored
    command = [sys.executable, "-m", "unlearn_core", "unlearn", f"--model={job.model}", f"--device={device}", f"--out={job.run_dir}", "--preset=quick"]
    with_targets = all(t.get("target_path") for t in job.targets)
    for target in job.targets:
        command += [f"--prompt={target['prompt']}", f"--seed={int(target['seed'])}", f"--surrogate={target['surrogate_path']}"]
        if with_targets:
            command.append(f"--target={target['target_path']}")
    for spec in fields(UnlearnConfig):
        value = getattr(config, spec.name)
        option = "--" + RENAMED_OPTIONS.get(spec.name, spec.name).replace("_", "-")
        if value is None:
            continue
        if isinstance(value, bool):
            command.append(option if value else "--no-" + option[2:])
        elif isinstance(value, list):
            command += [f"{option}={item}" for item in value]
        else:
            command.append(f"{option}={value}")
    return command


class JobWorker:
    """One background thread per device; runs queued jobs one at a time, each in a subprocess."""

    def __init__(self, store: JobStore, device: str = "auto", poll_s: float = 0.5, env: dict | None = None):
        self.store = store
        self.device = device
        self.poll_s = poll_s
        self.env = env
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"job-worker-{device}", daemon=True)

    def start(self) -> "JobWorker":
        self._thread.start()
        return self

    def wake(self) -> None:
        """Look for queued jobs now (called after a submit or resume)."""
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            job = self.store.claim_next()
            if job is None:
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            try:
                self.run_job(job)
            except Exception as error:  # keep the worker alive whatever one job does
                self.store.update(job.id, state="failed", error=f"worker error: {type(error).__name__}: {error}")

    def _environment(self) -> dict:
        env = dict(self.env if self.env is not None else os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def run_job(self, job: Job) -> str:
        """Run one claimed job to its end; return its final state."""
        folder = job.folder
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "CANCEL").unlink(missing_ok=True)
        command = build_command(job, self.device)
        with open(folder / "worker.log", "ab") as log:  # an append-only stream: the one file not written atomically
            log.write(f"\n$ {' '.join(command)}\n".encode())
            log.flush()
            process = subprocess.Popen(command, cwd=os.getcwd(), env=self._environment(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       preexec_fn=_die_with_parent if _PRCTL is not None else None)
        cancel_seen = None
        last = (job.step, job.total)
        while process.poll() is None:
            if self._stop.wait(self.poll_s):
                _terminate(process)
                self.store.update(job.id, state="interrupted", error="the server stopped during the job; resume it")
                return "interrupted"
            status = read_status(folder)
            rows = read_loss_log(folder)
            step = max(int(status.get("step", 0) or 0), int(rows[-1]["step"]) if rows else 0)
            total = int(status.get("total", job.total) or job.total)
            if (step, total) != last:
                self.store.update(job.id, step=step, total=total)
                last = (step, total)
            if (folder / "CANCEL").exists():
                cancel_seen = cancel_seen or time.monotonic()
                if time.monotonic() - cancel_seen > CANCEL_GRACE_S:
                    _terminate(process)
        return self._finish(job, process.returncode, cancel_seen is not None)

    def _finish(self, job: Job, returncode: int, cancelled: bool) -> str:
        folder = job.folder
        status = read_status(folder)
        rows = read_loss_log(folder)
        step = max(int(status.get("step", 0) or 0), int(rows[-1]["step"]) if rows else 0)
        if returncode == 0 and status.get("state") == "done":
            self.store.update(job.id, state="done", step=job.total, error="")
            return "done"
        if cancelled or status.get("state") == "cancelled":
            self.store.update(job.id, state="cancelled", step=step, error="cancelled by the operator; resume continues from the last checkpoint")
            write_status(folder, "cancelled", step=step, total=job.total)
            return "cancelled"
        reason = status.get("error") or _killed_reason(returncode) or _log_tail(folder / "worker.log") or f"exit code {returncode}"
        self.store.update(job.id, state="failed", step=step, error=str(reason)[-2000:])
        write_status(folder, "failed", step=step, total=job.total, error=str(reason)[-2000:])
        return "failed"


def _killed_reason(returncode: int) -> str:
    """A clear reason for a job process ended by a signal (kill -9, the out-of-memory killer, ...)."""
    if returncode is None or returncode >= 0:
        return ""
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    return f"the job's process was killed ({name}; out of memory or killed by hand?); resume continues from the last checkpoint"


def _load_prctl():
    """libc's prctl on Linux (loaded here, not after fork), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the job's child process: the kernel kills it if the server dies (even by SIGKILL), so no
    orphaned job keeps writing into a run folder that a restarted server marks interrupted."""
    _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _terminate(process: subprocess.Popen, grace_s: float = 3.0) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _log_tail(path: Path) -> str:
    """The subprocess's last error line (or last line), without progress-bar redraws."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    lines = [line.split("\r")[-1].strip() for line in text.split("\n")]
    lines = [line for line in lines if line]
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or [""])[-1]


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".{secrets.token_hex(4)}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
