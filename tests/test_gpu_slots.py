"""Jobs on ZeroGPU run as a chain of GPU slots (`unlearn_core.gpu_slots`), through the real `spaces`
decorator (a no-op outside a Space, so the slots run here on the CPU). A chained job must give the
adapter of one straight run: the checkpoint between slots holds all the trainer steers by."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from unlearn_core import gpu_slots
from unlearn_core.config import UnlearnConfig
from unlearn_core.gpu_slots import SlotChain, SlotClock
from unlearn_core.job_process import execute
from unlearn_core.runfolder import RunFolder
from unlearn_core.store import JobStore
from unlearn_core.worker import JobWorker

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "assets" / "examples"
# Short, with every control of the default method at work: trajectory refreshes, the extension
# while not fixed and consolidation all fall between slots.
CONFIG = {"steps": 6, "remember_count": 4, "generation_steps": 8, "eval_seeds": 2, "checkpoint_every": 0,
          "extend_until_fixed": 4, "consolidate_steps": 2, "trajectory_refresh": 3, "steps_when_held": 6}
TARGET = {"prompt": "flag of chad", "seed": 40, "surrogate_path": str(EXAMPLES / "chad_seed40_surrogate.png"), "target_path": str(EXAMPLES / "chad_seed40_target.png")}


def run_folder(path: Path) -> RunFolder:
    folder = RunFolder(path).create()
    folder.write_request("assets/demo-model", CONFIG, [TARGET])
    return folder


def test_the_real_spaces_decorator_wraps_the_slot():
    import spaces

    assert gpu_slots._gpu_slot() is spaces.GPU(duration=gpu_slots._slot_duration)(gpu_slots.run_slot), "not the spaces package's decorator"


def test_a_job_in_three_or_more_gpu_slots_gives_the_adapter_of_one_straight_run(tmp_path):
    straight = run_folder(tmp_path / "straight")
    execute(straight, "cpu", web=True)
    chained = run_folder(tmp_path / "chained")
    chain = SlotChain(chained, "cpu", slot_s=0.01)  # a slot shorter than any step: one step per slot
    assert chain.wait(600) == 0
    assert chain.slots >= 3
    first, second = load_file(straight.path / "pytorch_lora_weights.safetensors"), load_file(chained.path / "pytorch_lora_weights.safetensors")
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(second[key], first[key], rtol=0, atol=1e-6)
    one, other = json.loads((straight.path / "metrics.json").read_text()), json.loads((chained.path / "metrics.json").read_text())
    assert other["timing"]["steps_run"] == one["timing"]["steps_run"] and chain.slots >= other["timing"]["steps_run"]
    assert other["forgetting"]["toward_surrogate"] == pytest.approx(one["forgetting"]["toward_surrogate"], abs=1e-6)
    assert other["forgetting"]["verdict"] == one["forgetting"]["verdict"]
    assert chained.read_status()["state"] == "done" and not chained.checkpoint.exists()


def test_the_slot_clock_stops_before_a_step_that_may_not_fit_and_never_before_the_first():
    now = [0.0]
    clock = SlotClock(60.0, clock=lambda: now[0])
    now[0] = 50.0  # a long preparation: the first step still runs
    assert not clock.should_pause("step") and not clock.should_pause("evaluating")
    clock.on_phase("training")
    clock.on_step(type("Report", (), {"seconds_per_step": 4.0})())
    now[0] = 51.0  # 9 s left: two steps' worth fit
    assert not clock.should_pause("step")
    now[0] = 53.0  # 7 s left, under twice the longest step
    assert clock.should_pause("step")
    assert clock.should_pause("evaluating"), "7 s left is less than the 50 s the preparation took"


def test_the_worker_runs_a_job_in_gpu_slots_and_a_cancel_between_slots_ends_it(tmp_path):
    from PIL import Image

    store = JobStore(tmp_path / "runs")
    instance = {"prompt": TARGET["prompt"], "seed": TARGET["seed"], "surrogate": Image.open(TARGET["surrogate_path"]), "target": Image.open(TARGET["target_path"])}
    worker = JobWorker(store, device="cpu", poll_s=0.05, launch=gpu_slots.launcher(0.01)).start()
    try:
        done = store.create("assets/demo-model", UnlearnConfig.from_dict(CONFIG), [instance])
        cancelled = store.create("assets/demo-model", UnlearnConfig.from_dict(CONFIG), [instance])
        worker.wake()
        deadline = time.monotonic() + 600
        while store.get(cancelled.id).step < 1 and time.monotonic() < deadline:  # the second job, a slot in
            time.sleep(0.05)
        store.cancel(cancelled.id)
        while store.get(cancelled.id).state in ("queued", "running") and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        worker.stop()
    assert store.get(done.id).state == "done"
    assert store.get(cancelled.id).state == "cancelled"
    assert cancelled.folder.checkpoint.exists(), "a cancelled job keeps its checkpoint for Resume"
