"""Run the fault and abuse suite and write docs/RELIABILITY.md.

    .venv/bin/python -m scripts.reliability_report            # HOTFIX_SLOW=1: includes the load test
    .venv/bin/python -m scripts.reliability_report --no-slow  # without it

Runs `pytest` on `SUITE` (the hardening table, restarts, accounts, metric weights, two-process
training) with `--junitxml` (outcomes and
durations) and `HOTFIX_HARDENING_STATS` (figures the tests record: each case's message, faults
injected, jobs and their end, load answered / errors), then writes the report. Exit code: pytest's.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

from tests.hardening_cases import CASES, STATS_ENV

ROOT = Path(__file__).resolve().parent.parent

# The hardening table and durability tests, plus the classes that live beside their subjects:
# sign-in owners (accounts), forged metric weights (metrics), two-process training (DDP).
SUITE = ["tests/test_hardening.py", "tests/test_restart.py", "tests/test_accounts.py", "tests/test_metrics_images.py", "tests/test_ddp.py",
         "tests/test_jobs.py", "tests/test_job_faults.py", "tests/test_disk.py", "tests/test_messages.py", "tests/test_forgetting.py::test_the_work_estimate_counts_every_step_a_job_may_take"]

# The red team's findings of 2026-12-07 (issue "faults and abuse, round two"), each with the tests
# that failed on the code before its fix and pass after, and the fault each injects.
FINDINGS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("1. a job left running by a server on another host stays running (High)", "a row of a host that no longer exists; kill -9 of a peer holding a lease; a peer paused past its lease",
     ("test_expired_leases_are_interrupted_on_any_host_live_ones_kept_and_resume_requeues", "test_a_store_of_an_older_version_gets_leases_and_its_running_jobs_are_interrupted",
      "test_a_survivor_marks_the_job_of_a_killed_peer_interrupted_and_runs_it_again", "test_a_runner_that_lost_its_lease_stops_its_job")),
    ("2. one SQLite error kills the job worker thread (High)", "the runs folder bind-mounted read-only while idle and mid-job",
     ("test_the_worker_outlives_a_read_only_store_and_runs_the_next_job",)),
    ("3. anonymous limits per invented session; check-then-insert (Medium)", "four simultaneous starts; several sessions from one address",
     ("test_simultaneous_starts_pass_the_limit_once", "test_anonymous_sessions_of_one_address_share_a_limit_and_the_queue_has_one", "test_the_client_address_is_the_proxy_s_only_where_one_is_trusted")),
    ("4. login blocks the server and reveals usernames (Medium)", "parallel bad logins; unknown against known users",
     ("test_unknown_users_cost_the_same_hashing_and_failures_are_rate_limited", "test_login_is_required")),
    ("5. decompression bomb through the paint canvas (Medium)", "a 12 500 × 12 500 PNG as the canvas background",
     ("test_a_canvas_bomb_is_refused_before_it_is_decoded", "test_every_image_door_checks_the_header_first")),
    ("6. uploads and the cache fill the disk (Medium)", "a full 256 kB tmpfs; a cache over its limit",
     ("test_the_generation_cache_stays_under_its_limit_least_recently_used_out_first", "test_gradio_s_temporary_files_are_deleted_on_a_schedule", "test_a_full_disk_is_answered_in_plain_words")),
    ("7. a forged SSCD network is accepted (Low–Medium)", "TorchScript files, unpinned, pinned and mis-pinned",
     ("test_a_forged_or_wrong_sscd_file_is_unavailable_not_trusted", "test_without_a_digest_to_check_sscd_is_not_downloaded")),
    ("8. server paths leak (Low)", "an unreadable after image; a safetensors header claiming 40 GB; unexpected exceptions",
     ("test_fail_and_the_guard_scrub_every_message", "test_image_messages_name_the_file_not_its_folder", "test_results_with_an_unreadable_after_image", "test_try_adapter_with_a_header_claiming_40_gb")),
    ("9. a damaged run file breaks pages (Low)", "random bytes in loss_log.csv, corrupt adapter_card.json, metrics.json and config.json",
     ("test_damaged_run_files_are_named_and_the_pages_keep_working",)),
    ("10. the work estimate misses steps_when_held (Low)", "a configuration that holds its target longest",
     ("test_the_work_estimate_counts_every_step_a_job_may_take",)),
    ("11. a read-only runs folder at start-up gives a traceback (Low)", "the runs folder under a regular file and under /proc",
     ("test_an_unusable_runs_folder_stops_the_start_with_one_line",)),
)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import torch

        torch_version = torch.__version__
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    except ImportError:
        torch_version, gpu = "?", "?"
    return f"{platform.node()} · {cpu} · {os.cpu_count()} cores · {gpu} · {platform.system()} {platform.release()} · Python {platform.python_version()} · torch {torch_version}"


def run_suite(work: Path, slow: bool) -> tuple[int, Path, Path, float]:
    junit, stats = work / "junit.xml", work / "stats.jsonl"
    env = {**os.environ, STATS_ENV: str(stats)}
    if slow:
        env["HOTFIX_SLOW"] = "1"
    started = dt.datetime.now()
    code = subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *SUITE], cwd=ROOT, env=env)
    return code, junit, stats, (dt.datetime.now() - started).total_seconds()


def read_junit(path: Path) -> list[dict]:
    tests = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome = "passed"
        detail = ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                detail = (node.get("message") or "")[:300]
                break
        tests.append({"file": case.get("classname", ""), "name": case.get("name", ""), "time": float(case.get("time", 0)), "outcome": outcome, "detail": detail})
    return tests


def read_stats(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def cell(text: str, limit: int = 110) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def write_report(out: Path, tests: list[dict], stats: list[dict], seconds: float, slow: bool, code: int) -> dict:
    case_tests = {t["name"][len("test_bad_input["):-1]: t for t in tests if t["name"].startswith("test_bad_input[")}
    other = [t for t in tests if not t["name"].startswith("test_bad_input[")]
    messages = {s["id"]: s for s in stats if s["kind"] == "case"}
    passed = sum(t["outcome"] == "passed" for t in case_tests.values())
    faults = [s for s in stats if s["kind"] == "fault"]
    jobs = [s for s in stats if s["kind"] == "job"]
    restart = [t for t in other if "test_restart" in t["file"]]
    durability = [t for t in other if t["name"] in ("test_kill_the_job_process_then_resume", "test_server_killed_leaves_nothing_running")] + restart
    lost = sum(j["final"] not in ("done", "interrupted (resumable)", "queued (kept across the restart)") for j in jobs) + sum(t["outcome"] in ("failed", "error") for t in durability)
    load = [s for s in stats if s["kind"] == "load"]
    figures = {
        "cases": len(CASES),
        "cases_passed": passed,
        "faults_injected": len(CASES) + len(faults) + sum(t["outcome"] == "passed" for t in restart),
        "jobs_lost": lost,
        "load_answered": sum(s["answered"] for s in load) if load else None,
        "load_errors": sum(s["errors"] for s in load) if load else None,
    }
    doors = Counter(case.door for case in CASES)
    families = Counter(case.fault for case in CASES)
    must_work = sum(case.expect is None for case in CASES)
    lines = [
        "# Reliability report",
        "",
        f"Written by `python -m scripts.reliability_report` on {dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}, machine: {machine()}.",
        f"Suite: `pytest {' '.join(SUITE)}`{' with `HOTFIX_SLOW=1`' if slow else ''}, {seconds:.0f} s, pytest exit code {code}.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| bad-input cases tried (one table, `tests/hardening_cases.py`) | **{len(CASES)}** ({must_work} must work, {len(CASES) - must_work} must be refused with a clear message) |",
        f"| cases passed | **{passed} / {len(case_tests)}** |",
        f"| doors | {', '.join(f'{k} {v}' for k, v in sorted(doors.items()))} |",
        f"| fault families | {', '.join(f'{k} {v}' for k, v in sorted(families.items()))} |",
        f"| faults injected (bad inputs + kills, NaN, unauthenticated calls, allow-list) | **{figures['faults_injected']}** |",
        f"| jobs lost (stuck running, unresumable, or wrong result) | **{lost}** |",
        (f"| load: 8 clients generating while a job trains | **{figures['load_answered']} requests answered, {figures['load_errors']} errors**; the job's losses and adapter identical to the same job alone |"
         if load else "| load | not run (HOTFIX_SLOW unset) |"),
        "",
        "After every case the live server still answers, the finished job's folder (every file's size and mtime) and",
        "the list of job folders are unchanged; at the end the server still generates.",
        "",
        "## Durability, access, sign-in, verified weights, two processes and load",
        "",
        "| test | outcome | seconds |",
        "|---|---|---|",
    ]
    for test in other:
        name = f"{Path(test['file'].replace('.', '/')).name}::{test['name']}"
        lines.append(f"| `{name}` | {test['outcome']}{': ' + cell(test['detail'], 80) if test['detail'] else ''} | {test['time']:.1f} |")
    lines += ["", "Faults injected outside the table:", ""]
    lines += [f"- {s['what']}" + (f" (at step {s['step']})" if "step" in s else "") for s in faults] or ["- (none recorded)"]
    if restart:
        lines.append("- SIGKILL to the server's process group mid-training, restart, resume (`tests/test_restart.py`)")
    def outcome(name: str) -> str:
        """A test's outcome and seconds, its parametrized cases taken together."""
        runs = [t for t in tests if t["name"] == name or t["name"].startswith(name + "[")]
        if not runs:
            return f"`{name}` (not run)"
        outcomes = Counter(t["outcome"] for t in runs)
        return f"`{name}` ({', '.join(f'{k} ×{v}' if len(runs) > 1 else k for k, v in outcomes.items())}, {sum(t['time'] for t in runs):.1f})"

    lines += ["", "## The findings of round two, each with its tests", "", "| finding | fault injected | tests (outcome, seconds) |", "|---|---|---|"]
    for finding, fault, names in FINDINGS:
        results = [outcome(name) for name in names]
        lines.append(f"| {finding} | {fault} | {'<br>'.join(results)} |")
    lines += ["", "## Every case", "", "| case | door | fault | expected | outcome | message (excerpt) |", "|---|---|---|---|---|---|"]
    for case in CASES:
        test = case_tests.get(case.id, {"outcome": "not run", "time": 0})
        message = messages.get(case.id, {}).get("message", "")
        expected = "works" if case.expect is None else f"refused: `/{cell(case.expect, 40)}/`"
        lines.append(f"| `{case.id}` | {case.door} | {case.fault} | {expected} | {test['outcome']} | {cell(message) if case.expect else ''} |")
    lines += ["", "## Durations", "", f"Slowest tests: " + ", ".join(f"`{t['name']}` {t['time']:.1f} s" for t in sorted(tests, key=lambda t: -t["time"])[:6]) + ".", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    return figures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-slow", action="store_true", help="skip the load test")
    parser.add_argument("--out", default=str(ROOT / "docs" / "RELIABILITY.md"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="hotfix-reliability-") as work:
        code, junit, stats, seconds = run_suite(Path(work), not args.no_slow)
        if not junit.is_file():
            print("pytest wrote no junit report", file=sys.stderr)
            return code or 1
        figures = write_report(Path(args.out), read_junit(junit), read_stats(stats), seconds, not args.no_slow, code)
    print(json.dumps(figures, indent=2))
    print(f"wrote {args.out}")
    return code


if __name__ == "__main__":
    sys.exit(main())
