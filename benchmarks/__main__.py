"""Speed and memory of Hotfix Studio on the demo model, measured in one run.

    python -m benchmarks [--quick] [--skip-job] [--out docs/PERFORMANCE.md]

Ratios (measured in the same process, which is what we track on noisy machines):
a. our unlearning step vs one plain LoRA step (ordinary diffusion loss) on the same total batch;
b. gradient projection on vs off; c. LoRA vs full fine-tuning; d. ours vs NegGrad and SISS.
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.app_server import AppServer
from unlearn_core import objectives
from unlearn_core.config import DEMO_MODEL, UnlearnConfig
from unlearn_core.models import load_model
from unlearn_core.sets import encode_sets
from unlearn_core.trainer import UnlearnTrainer

ROOT = Path(__file__).resolve().parent.parent
IDLE_GENERATION_SECONDS = 1.05  # the generation row on 2026-11-27's idle machine, where the speed targets were set


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def bench_generation(model, repeats: int) -> float:
    model.generate("flag of japan", list(range(8)), 25, 5.0)  # warm-up
    return median_seconds(lambda: model.generate("flag of japan", list(range(8)), 25, 5.0), repeats)


def make_trainer(model, sets, **overrides) -> UnlearnTrainer:
    model.remove_lora()
    # The paper's step (random forget states, denoise remember): it needs only the fixed image sets.
    config = UnlearnConfig(**{"forget_states": "random", "forget_target": "surrogate", "remember_loss": "denoise", **overrides})
    if not config.full_finetune:
        model.add_lora(config.lora_rank, config.lora_alpha)
    else:
        model.denoiser.requires_grad_(True)
    return UnlearnTrainer(model, config, sets)


def plain_lora_step(trainer: UnlearnTrainer) -> None:
    """One ordinary diffusion-loss step on 2×batch remember samples: the baseline of ratio a."""
    batch = trainer.config.batch_size * 2
    index = torch.randint(0, trainer.sets.remember_x0.shape[0], (batch,), generator=trainer.generator)
    x0 = trainer.sets.remember_x0[index]
    cond = {k: v[index] for k, v in trainer.sets.remember_cond.items()}
    t, a, b, _ = trainer.model.sample_noise_levels(batch, trainer.generator)
    a, b = a.view(-1, 1, 1, 1), b.view(-1, 1, 1, 1)
    noise = torch.randn(x0.shape, generator=trainer.generator)
    prediction = trainer.model.predict(trainer.denoiser, objectives.noisy_sample(x0, noise, a, b), t, cond)
    loss = objectives.per_sample_mse(prediction, objectives.training_target(trainer.model.prediction_type, x0, noise, a, b)).mean()
    trainer.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    trainer.optimizer.step()


def step_seconds(trainer, steps: int, step_fn=None) -> float:
    step_fn = step_fn or trainer.train_step
    for _ in range(2):
        step_fn()
    return median_seconds(step_fn, steps)


def trainable_state_mb(trainer) -> float:
    """Weights + gradients + AdamW moments of the trainable parameters (float32), in MB."""
    count = sum(p.numel() for p in trainer.params)
    return count * 4 * 4 / 1e6


CHAD = ("flag of chad", 40, ROOT / "assets" / "examples" / "chad_seed40_surrogate.png")


def cli_job_seconds(out: Path, cache: Path, quick: bool) -> float:
    """The default job through the CLI in a fresh process, wall clock."""
    import os
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    prompt, seed, surrogate = CHAD
    cmd = [sys.executable, "-m", "unlearn_core", "unlearn", "--prompt", prompt, "--seed", str(seed), "--surrogate", str(surrogate), "--out", str(out)]
    if quick:
        cmd += ["--steps", "10"]
    started = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, env={**os.environ, "HOTFIX_CACHE": str(cache)})
    return time.perf_counter() - started


def browser_job_seconds(client, quick: bool) -> float:
    """The default job as the browser starts it (/start_unlearning, then the server's worker runs
    it), from the click to the state 'done' (polled every 0.5 s: each poll is a request the server
    answers on the same two cores; the page itself polls every 2 s)."""
    import json

    from gradio_client import handle_file

    prompt, seed, surrogate = CHAD
    started = time.perf_counter()
    job_id, _ = client.predict(prompt, seed, handle_file(str(surrogate)), None, json.dumps({"steps": 10} if quick else {}), api_name="/start_unlearning")
    while True:
        state = client.predict(job_id, api_name="/job_status")["state"]
        if state == "done":
            return time.perf_counter() - started
        if state in ("failed", "cancelled", "interrupted"):
            raise RuntimeError(f"the browser's job ended {state}")
        time.sleep(0.5)


IDLE_BETWEEN_JOBS_S = 15  # after a job the server starts the next job's process, which imports and loads while the machine is idle


def bench_job(quick: bool) -> dict:
    """The whole default job: through the CLI with a cold and a warm cache, then the same job started
    as the browser starts it and through the CLI again, alternating (warm cache, two of each)."""
    import json
    import shutil

    from gradio_client import Client

    runs, cache = ROOT / "runs" / "benchmark-job", ROOT / "runs" / "benchmark-cache"
    shutil.rmtree(runs, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    results = {"cold cache": cli_job_seconds(runs / "cli", cache, quick), "warm cache": cli_job_seconds(runs / "cli", cache, quick)}
    results["warm timing"] = json.loads((runs / "cli" / "metrics.json").read_text())["timing"]  # the warm job's own steps and step time
    results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    cli, browser = [], []
    with AppServer(runs / "server", cache) as server:
        client = Client(server.url, verbose=False)
        for _ in range(2):
            time.sleep(IDLE_BETWEEN_JOBS_S)
            browser.append(browser_job_seconds(client, quick))
            time.sleep(IDLE_BETWEEN_JOBS_S)
            cli.append(cli_job_seconds(runs / "cli", cache, quick))
    results["cli"], results["browser"] = statistics.median(cli), statistics.median(browser)
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (smoke run)")
    parser.add_argument("--skip-job", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "docs" / "PERFORMANCE.md"))
    args = parser.parse_args(argv)
    repeats = 2 if args.quick else 5
    model = load_model(DEMO_MODEL, "cpu")
    rows = []
    generation = bench_generation(model, repeats)
    rows.append(("generation: 8 images × 25 steps, guidance 5", f"{generation:.2f} s", "≤ 5 s"))

    remember = [img for img, _ in model.generate("flag of chad", list(range(1000, 1016)), 25, 5.0)]
    target = remember[0]
    sets = encode_sets(model, [target], [target.transpose(0)], ["flag of chad"], remember, ["flag of chad"] * len(remember))
    steps = 5 if args.quick else 15
    ours = step_seconds(make_trainer(model, sets), steps)
    plain_trainer = make_trainer(model, sets)
    plain = step_seconds(plain_trainer, steps, lambda: plain_lora_step(plain_trainer))
    no_projection = step_seconds(make_trainer(model, sets, projection="none"), steps)
    neggrad = step_seconds(make_trainer(model, sets, method="neggrad"), steps)
    siss = step_seconds(make_trainer(model, sets, method="siss"), steps)
    lora_trainer = make_trainer(model, sets)
    full_trainer = make_trainer(model, sets, full_finetune=True)
    full = step_seconds(full_trainer, steps)
    rows += [
        ("our unlearning step (batch 4 forget + 4 remember)", f"{ours * 1000:.0f} ms", ""),
        ("a. ours / plain LoRA step on batch 8", f"{ours / plain:.2f}×", "≤ 1.3×"),
        ("b. projection on / off", f"{ours / no_projection:.3f}× ({(ours / no_projection - 1) * 100:+.1f} %)", "≤ +5 %"),
        ("c. full fine-tune / LoRA step time", f"{full / ours:.2f}×", ""),
        ("c. trainable state (weights+grads+Adam), LoRA vs full", f"{trainable_state_mb(lora_trainer):.2f} MB vs {trainable_state_mb(full_trainer):.1f} MB", ""),
        ("d. NegGrad / ours per step", f"{neggrad / ours:.2f}×", ""),
        ("d. SISS-style / ours per step", f"{siss / ours:.2f}×", ""),
    ]
    if not args.skip_job:
        job = bench_job(args.quick)
        rows += [
            ("whole default job, cold cache (remember trajectories recorded)", f"{job['cold cache']:.1f} s", ""),
            ("whole default job, warm cache (remember trajectories reused)", f"{job['warm cache']:.1f} s", ""),
            ("of which training: steps (until fixed) and mean step, refreshes included", f"{job['warm timing']['steps_run']} steps, {job['warm timing']['mean_seconds_per_step']:.2f} s", ""),
            ("peak resident memory of the job process", f"{job['peak_rss_mb']:.0f} MB", ""),
            ("default job started as the browser starts it (server worker), warm cache", f"{job['browser']:.1f} s", ""),
            ("the same job through the CLI, alternating with it", f"{job['cli']:.1f} s", ""),
            ("browser / CLI job time", f"{job['browser'] / job['cli']:.2f}×", "≤ 1.2×"),
        ]
    job_rows = {"cold": "not run", "warm": "not run", "ratio": "not run"}
    if not args.skip_job:
        scale = IDLE_GENERATION_SECONDS / generation
        job_rows = {"cold": f"{job['cold cache'] * scale:.1f} s ({job['cold cache']:.1f} s raw)", "warm": f"{job['warm cache'] * scale:.1f} s ({job['warm cache']:.1f} s raw)",
                    "ratio": f"{job['browser'] / job['cli']:.2f}×"}
    from benchmarks.unet_budget import main as unet_budget

    budget = "not counted (--quick)" if args.quick else unet_budget([])
    gpu_file = ROOT / "docs" / "PERFORMANCE-gpu-h100.md"
    gpu_section = gpu_file.read_text() if gpu_file.is_file() else "Not measured yet: run `python -m benchmarks.gpu` where a GPU is available."
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    table = "| measurement | value | target |\n|---|---|---|\n" + "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows)
    print(table)
    text = f"""# Performance

Written by `python -m benchmarks{' --quick' if args.quick else ''}` on {time.strftime('%Y-%m-%d')} ({machine}).
Medians of {repeats} (generation) / {steps} (steps) timed repeats after warm-up; ratios come from
the same process. The job rows run the real CLI in a fresh process (imports and model loading
included); the browser row starts the same job on a running `app.py` through `/start_unlearning`
(what the Unlearn tab's button calls) and times it to the state `done`, alternating with the CLI
(medians of 2 each, with {IDLE_BETWEEN_JOBS_S} s idle before each job). The server hands each job to a job process it
started ahead, which has already imported torch/diffusers and loaded the demo model while the
machine was idle (`HOTFIX_WARM_WORKER`, on by default), so the browser's job skips the start-up
that the CLI pays.

{table}

The job rows time the README's chad job, which trains until its target is fixed (r ≥ 0.75,
checked every 5 steps). On 2026-11-27, the idle machine these targets were set on, the generation
row took {IDLE_GENERATION_SECONDS} s; every row scales with it, so read the job rows against it: the
"at the idle speed" column divides by this run's generation row and multiplies by {IDLE_GENERATION_SECONDS} s.

| job at the idle speed | this run | target |
|---|---|---|
| cold cache | {job_rows['cold']} | ≤ 20 s |
| warm cache | {job_rows['warm']} | ≤ 10 s |
| browser / CLI | {job_rows['ratio']} | ≤ 1.2× |

### U-Net sample-evaluations of the default job (`python -m benchmarks.unet_budget`)

Rows of every denoiser call, by the run's phases: sampling (no gradient: the remember trajectories
recorded on a cold cache, the target's trajectory re-recorded every 5 steps with the frozen
model's predictions along it, evaluation) and training (forward passes with gradient; each also
pays a backward of about twice its cost). This count is the floor the job's time works against.

{budget}

## GPU: SD1.5-size and SD3-medium-size denoisers (random weights)

`python -m benchmarks.gpu` on a lent GPU machine; LoRA rank 16, bf16 autocast, one forget + one
remember sample per step (the trainer's two forward/backward passes, projection and AdamW). Only
the training steps are timed: the VAE/text encoding of the fixed sets happens once per job.

{gpu_section}

The demo model's own default job on a lent H200 (2026-12-04, the version before the lean method, the README's CLI command with
`--device cuda`, cold cache): fixed at step 50 and consolidated to 65 as on the CPU (r 0.77, the
same to two decimals), 0.32 s per step (a model this small gives a GPU too little work per kernel
to be faster), 63.5 s wall with 17 s of it generating the remember set. In half precision its
images were not its own (chad seed 40 off by 20–45 grey levels, an adapter's effect a tenth), so
`--dtype auto` keeps the demo model in fp32 on a GPU too.

The default job on an SD1.5-size pipeline (`python -m benchmarks.gpu_job --quick`: U-Net, VAE and
CLIP text encoder of SD1.5's sizes built from their configs with random weights, bf16 weights by
`--dtype auto`, the CLI's `unlearn` with 20 steps, 8 remember seeds and 4 other seeds; the
same H200, 2026-12-04): 70 s wall with a cold cache (10 s preparing), 20 steps of 1.40 s, each
fifth re-recording the target's 25-step guided trajectory at 512²; random weights draw noise, so
the target is never fixed (r 0.02), and plain diffusers loads the adapter it wrote (seed 40's
image moved 5.5 grey levels on average).
"""
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
