"""How many U-Net sample-evaluations the README's default job spends, per phase: the floor the
job's time works against.

    python -m benchmarks.unet_budget [--cache DIR]

A forward hook on the denoiser adds up the batch rows of every call. Calls with gradients are
training passes (each also pays a backward, about twice a forward); calls without are sampling,
teachers and re-recorded trajectories. The phases are the run's own (`RunCallbacks.on_phase`).
The first job runs on an empty cache (cold), the second on what it left (warm).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from benchmarks.__main__ import CHAD
from unlearn_core.cache import GenerationCache
from unlearn_core.config import DEMO_MODEL, InstanceTarget, UnlearnConfig
from unlearn_core.models import load_model
from unlearn_core.run import RunCallbacks, run_unlearning


def count_job(model, cache: GenerationCache, out: Path) -> dict:
    """{phase: {"no grad": rows, "with grad": rows, "seconds": s}} of one default chad job."""
    counts: dict = defaultdict(lambda: {"no grad": 0, "with grad": 0, "seconds": 0.0})
    phase = {"name": "loading", "since": time.perf_counter()}

    def on_phase(name: str) -> None:
        now = time.perf_counter()
        counts[phase["name"]]["seconds"] += now - phase["since"]
        phase.update(name=name, since=now)

    def hook(module, args, kwargs, output):
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        counts[phase["name"]]["with grad" if torch.is_grad_enabled() else "no grad"] += int(sample.shape[0])

    prompt, seed, surrogate = CHAD
    handle = model.denoiser.register_forward_hook(hook, with_kwargs=True)
    try:
        model.remove_lora()
        run_unlearning(model, [InstanceTarget(prompt, seed, str(surrogate))], UnlearnConfig(checkpoint_every=0), out, RunCallbacks(on_phase=on_phase), cache)
        on_phase("done")
    finally:
        handle.remove()
    counts.pop("done", None)
    counts.pop("loading", None)
    return dict(counts)


def table(cold: dict, warm: dict, steps: int) -> str:
    lines = ["| phase | cold: sampling rows | cold: training rows | warm: sampling rows | warm: training rows | warm s |", "|---|---|---|---|---|---|"]
    for name in dict.fromkeys([*cold, *warm]):
        c, w = cold.get(name, {}), warm.get(name, {})
        lines.append(f"| {name} | {c.get('no grad', 0):,} | {c.get('with grad', 0):,} | {w.get('no grad', 0):,} | {w.get('with grad', 0):,} | {w.get('seconds', 0):.1f} |")
    total = lambda counts, key: sum(value[key] for value in counts.values())  # noqa: E731
    lines.append(f"| **all** ({steps} training steps) | {total(cold, 'no grad'):,} | {total(cold, 'with grad'):,} | {total(warm, 'no grad'):,} | {total(warm, 'with grad'):,} | {total(warm, 'seconds'):.1f} |")
    return "\n".join(lines)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", default="", help="generation cache folder (default: a new empty one)")
    args = parser.parse_args(argv)
    model = load_model(DEMO_MODEL, "cpu")
    with tempfile.TemporaryDirectory() as scratch:
        cache = GenerationCache(Path(args.cache or Path(scratch) / "cache"))
        cold = count_job(model, cache, Path(scratch) / "cold")
        warm = count_job(model, cache, Path(scratch) / "warm")
        steps = len((Path(scratch) / "warm" / "loss_log.csv").read_text().strip().splitlines()) - 1
    text = table(cold, warm, steps)
    print(text)
    return text


if __name__ == "__main__":
    main()
