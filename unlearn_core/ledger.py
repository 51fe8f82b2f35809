"""The fix ledger: the fixes a model has received, to release together (`release`).

A finished job whose verdict is `fixed` can be added: the ledger keeps where its run folder is,
what it fixed (prompt, seed), its r and its integrity (other seeds of its prompt kept), who added it
and when. A fix can be retired (kept, marked, left out of releases). The ledger is a table in the
job store's SQLite file, so it lives with the runs and survives restarts; like jobs, an owner sees
only their own entries (None: every entry, for admins and the CLI).
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
from contextlib import closing
from dataclasses import asdict, dataclass
from pathlib import Path

from unlearn_core.errors import InvalidInput
from unlearn_core.runfolder import RunFolder

SCHEMA = """
CREATE TABLE IF NOT EXISTS ledger (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    model TEXT NOT NULL,
    run_dir TEXT NOT NULL,
    prompt TEXT NOT NULL,
    seed INTEGER NOT NULL,
    r REAL,
    kept TEXT NOT NULL,
    added REAL NOT NULL,
    retired REAL NOT NULL DEFAULT 0
)
"""


@dataclass
class LedgerEntry:
    """One fix in the ledger."""

    id: str
    owner: str
    model: str
    run_dir: str
    prompt: str
    seed: int
    r: float | None
    kept: str  # "16/16": other seeds of the prompt kept at SSIM ≥ 0.9 by the fix alone
    added: float
    retired: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


class Ledger:
    """The ledger in `runs_dir/jobs.sqlite` (the job store's file); thread-safe like the store."""

    def __init__(self, runs_dir: str | Path):
        self.db_path = Path(runs_dir).resolve() / "jobs.sqlite"
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as db:
            db.execute(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.db_path, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        return db

    def add(self, run_dir: str | Path, owner: str) -> LedgerEntry:
        """Add a finished run whose verdict is `fixed`; refuses anything else, and a run already in."""
        folder = RunFolder(run_dir)
        metrics = folder.read_metrics() or {}
        forgetting = metrics.get("forgetting") or {}
        if not folder.adapter_files() or forgetting.get("verdict") != "fixed":
            raise InvalidInput(f"only a finished job whose verdict is 'fixed' goes into the ledger (this one: {forgetting.get('verdict', 'not finished')})")
        request = folder.read_request()
        if len(request["targets"]) != 1:
            raise InvalidInput("the ledger takes one fix per job; this job fixed several targets at once")
        target = request["targets"][0]
        own = (metrics.get("integrity") or {}).get(target["prompt"]) or {}
        kept = f"{own.get('ssim_at_least_0.9', '?')}/{len(own.get('seeds', []))}" if own else "n/a"
        fix = LedgerEntry(secrets.token_urlsafe(6), owner, request["model"], str(folder.path.resolve()), target["prompt"], int(target["seed"]),
                  forgetting.get("toward_surrogate"), kept, time.time())
        with closing(self._connect()) as db:
            if db.execute("SELECT 1 FROM ledger WHERE run_dir = ? AND owner = ? AND retired = 0", (fix.run_dir, owner)).fetchone():
                raise InvalidInput("this job is in the ledger already")
            db.execute("INSERT INTO ledger VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", tuple(fix.to_dict().values()))
        return fix

    def list(self, owner: str | None = None, include_retired: bool = False) -> list[LedgerEntry]:
        """The owner's fixes (every owner's for None), oldest first."""
        query, values = "SELECT * FROM ledger WHERE 1 = 1", []
        if owner is not None:
            query, values = query + " AND owner = ?", [owner]
        if not include_retired:
            query += " AND retired = 0"
        with closing(self._connect()) as db:
            return [LedgerEntry(**dict(row)) for row in db.execute(query + " ORDER BY added", values)]

    def get(self, fix_id: str, owner: str | None = None) -> LedgerEntry:
        found = [fix for fix in self.list(owner, include_retired=True) if fix.id == fix_id]
        if not found:
            raise InvalidInput(f"no fix {fix_id!r} in your ledger")
        return found[0]

    def retire(self, fix_id: str, owner: str | None = None) -> LedgerEntry:
        """Mark a fix retired: it stays listed with --all, and no release takes it."""
        fix = self.get(fix_id, owner)
        with closing(self._connect()) as db:
            db.execute("UPDATE ledger SET retired = ? WHERE id = ?", (time.time(), fix.id))
        return self.get(fix_id, owner)


def table_lines(fixes: list[LedgerEntry]) -> list[str]:
    """The ledger for a terminal."""
    if not fixes:
        return ["the ledger is empty: add a fixed job with `ledger add RUN_DIR`"]
    return [f"{fix.id}  {fix.prompt!r} seed {fix.seed}  r {fix.r if fix.r is None else f'{fix.r:.2f}'}  kept {fix.kept}  "
            f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(fix.added))}  {fix.owner}{'  (retired)' if fix.retired else ''}  {fix.run_dir}" for fix in fixes]


def as_json(fixes: list[LedgerEntry]) -> str:
    return json.dumps([fix.to_dict() for fix in fixes], indent=1)
