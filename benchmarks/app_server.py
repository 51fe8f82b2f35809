"""`python app.py` on a free port, in its own process group, with its own runs folder: how the
tests drive the real server and how `python -m benchmarks` times a job through it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class AppServer:
    """`python app.py` in its own process group, on a free port, with its own runs folder."""

    def __init__(self, runs_dir: Path, cache_dir: Path | None = None):
        self.runs_dir = Path(runs_dir)
        self.cache_dir = cache_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.process: subprocess.Popen | None = None
        self.log_path = self.runs_dir.parent / f"server-{self.port}.log"

    def environment(self) -> dict:
        env = {**os.environ, "HOTFIX_RUNS_DIR": str(self.runs_dir), "HOTFIX_PORT": str(self.port), "HOTFIX_HOST": "127.0.0.1",
               "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        if self.cache_dir:
            env["HOTFIX_CACHE"] = str(self.cache_dir)
        return env

    def start(self, timeout_s: float = 180) -> "AppServer":
        env = self.environment()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(self.log_path, "ab")
        self.process = subprocess.Popen([sys.executable, str(ROOT / "app.py")], cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.url, timeout=5) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"the server did not answer within {timeout_s} s:\n{self.tail()}")

    def tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def job_process(self, job_id: str) -> int | None:
        """The pid of the job's process: the server's child `python -m unlearn_core.worker --wait` that
        was handed this job (its output goes to the job's worker.log), not the one waiting for the next."""
        import psutil

        for child in psutil.Process(self.process.pid).children(recursive=True):
            try:
                if "unlearn_core.worker" in child.cmdline() and any(f"{job_id}/worker.log" in file.path for file in child.open_files()):
                    return child.pid
            except psutil.NoSuchProcess:
                continue
        return None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group (the server and its job subprocesses)."""
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, sig)
            self.process.wait(30)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        if getattr(self, "log", None):
            self.log.close()

    def __enter__(self) -> "AppServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
