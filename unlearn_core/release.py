"""A release: one adapter that carries several fixes, every fix re-checked in it.

    hotfix-studio release RUN_DIR [RUN_DIR ...] --out DIR

Each fix is a finished run folder of the same base model. The release's LoRA is the fixes' LoRAs
concatenated along the rank: at every adapted layer its A stacks the fixes' A matrices and its B
the fixes' B matrices, each with its own scale folded in, and its alpha equals its rank (scale 1).
Its update is then exactly the sum of the fixes' updates, ΔW = Σ s_i·B_i·A_i: nothing is averaged
or re-trained, each fix is kept as it was. (peft's `add_weighted_adapter(combination_type="cat")`
does this only inside a `PeftModel`, and diffusers' `set_adapters` + `fuse_lora` folds adapters into
the base weights instead of writing one adapter, so the concatenation is written here.)

The release is then loaded as any adapter and evaluated as a job with every fix's target: each
fix's r and verdict in the release next to its r alone, and the integrity of every prompt a fix
touched (other seeds kept at SSIM ≥ 0.9). A fix that no longer holds is named. DIR gets the
diffusers file, the kohya (or interchange) copy, `release.json`, a model card listing every fix and
the before/after grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from unlearn_core.config import UnlearnConfig
from unlearn_core.errors import InvalidInput
from unlearn_core.runfolder import RunFolder


@dataclass
class Fix:
    """One finished job as a fix: where it is, what it fixed, how well alone."""

    folder: RunFolder
    model: str
    config: UnlearnConfig
    prompt: str
    seed: int
    r_alone: float | None

    @classmethod
    def read(cls, run_dir: str | Path) -> "Fix":
        folder = RunFolder(run_dir)
        if not folder.adapter_files():
            raise InvalidInput(f"{folder.path.name} has no adapter: give the folders of finished jobs")
        request = folder.read_request()
        if len(request["targets"]) != 1:
            raise InvalidInput(f"{folder.path.name} fixed {len(request['targets'])} targets at once: a release takes one fix per job")
        target = request["targets"][0]
        metrics = folder.read_metrics() or {}
        r_alone = (metrics.get("forgetting") or {}).get("toward_surrogate")
        return cls(folder, request["model"], UnlearnConfig.from_dict(request["config"]), target["prompt"], int(target["seed"]), r_alone)


def concatenated_lora(parts: list[tuple[dict[str, torch.Tensor], dict[str, float]]]) -> tuple[dict[str, torch.Tensor], int]:
    """The fixes' LoRA state dicts (peft's keys, `….lora_A.weight` / `….lora_B.weight`) with each
    layer's scale, stacked along the rank; returns the state and its rank. A layer one fix lacks gets
    zeros in that fix's rows, which add nothing."""
    ranks = [next(value.shape[0] for key, value in state.items() if key.endswith("lora_A.weight")) for state, _ in parts]
    total = sum(ranks)
    layers = sorted({key.removesuffix(".lora_A.weight") for state, _ in parts for key in state if key.endswith(".lora_A.weight")})
    merged = {}
    for layer in layers:
        shapes = next((state[f"{layer}.lora_A.weight"].shape, state[f"{layer}.lora_B.weight"].shape) for state, _ in parts if f"{layer}.lora_A.weight" in state)
        a = torch.zeros((total, *shapes[0][1:]))
        b = torch.zeros((shapes[1][0], total, *shapes[1][2:]))
        start = 0
        for (state, scales), rank in zip(parts, ranks):
            if f"{layer}.lora_A.weight" in state:
                a[start:start + rank] = state[f"{layer}.lora_A.weight"].float()
                b[:, start:start + rank] = state[f"{layer}.lora_B.weight"].float() * scales[layer]
            start += rank
        merged[f"{layer}.lora_A.weight"], merged[f"{layer}.lora_B.weight"] = a, b
    return merged, total


def merge_into(model, fixes: list[Fix]) -> int:
    """Load each fix, read its LoRA and scales, and leave `model` carrying the release; its rank."""
    from unlearn_core.export import lora_scales

    layer_sets = {fix.config.lora_layers for fix in fixes}
    if len(layer_sets) > 1:
        raise InvalidInput(f"the fixes adapt different layer sets ({', '.join(sorted(layer_sets))}): release fixes trained with the same lora_layers")
    parts = []
    for fix in fixes:
        model.load_lora(fix.folder.path)
        scales = {name.removesuffix(f".{model.adapter_name}"): scale for name, scale in lora_scales(model).items()}
        parts.append(({key: value.detach().cpu() for key, value in model.lora_state_dict().items()}, scales))
        model.remove_lora()
    state, rank = concatenated_lora(parts)
    model.add_lora(rank, float(rank), layer_sets.pop())
    model.load_lora_state_dict({key: value.to(model.device, model.weights_dtype) for key, value in state.items()})
    model.denoiser.requires_grad_(False)
    return rank


def release_card(fixes: list[dict], base: str, integrity: dict, files: list[str]) -> str:
    """The release's model card: what it carries and how each fix holds in it."""
    rows = "\n".join(f"| `{f['prompt']}` | {f['seed']} | {_percent(f['r_alone'])} | {_percent(f['r_release'])} | {f['verdict']} |" for f in fixes)
    kept = "\n".join(f"| `{prompt}` | {row['kept']}/{row['seeds']} |" for prompt, row in integrity.items())
    return f"""---
base_model: {base}
library_name: diffusers
tags: [lora, diffusers, text-to-image, hotfix-studio, unlearning, release]
---

# Hotfix release: {len(fixes)} fixes of `{base}`

One LoRA that carries every fix below: the fixes' LoRAs concatenated along the rank, so its update
is the sum of theirs. Each fix was re-checked in the release (r: how far the flagged seed's painted
pixels moved toward the correction; fixed at 70 %).

| prompt | seed | r alone | r in the release | verdict in the release |
|---|---|---|---|---|
{rows}

Other seeds of each touched prompt, kept at SSIM ≥ 0.9 with the release:

| prompt | kept |
|---|---|
{kept}

Files: {", ".join(f"`{name}`" for name in files)}. Load it as any diffusers LoRA:
`pipe.load_lora_weights("<this repo or folder>")`.
"""


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def make_release(run_dirs: list[str | Path], out: str | Path, device: str = "auto", model=None) -> dict:
    """Merge the fixes of `run_dirs` into one adapter in `out`, re-check every fix and write
    `release.json`; returns it. `model`: the base model already loaded (else loaded here)."""
    from unlearn_core.cache import GenerationCache
    from unlearn_core.evaluation import EvalTarget, evaluate
    from unlearn_core.export import save_kohya
    from unlearn_core.files import save_image_atomic, write_bytes_atomic, write_json_atomic
    from unlearn_core.images import load_for_model
    from unlearn_core.models import load_model

    fixes = [Fix.read(run_dir) for run_dir in run_dirs]
    if not fixes:
        raise InvalidInput("give at least one fix to release")
    bases = {fix.model for fix in fixes}
    if len(bases) > 1:
        raise InvalidInput(f"the fixes were made on different models ({', '.join(sorted(bases))}): a release is for one base model")
    base = bases.pop()
    model = model or load_model(base, device)
    folder = RunFolder(out).create()
    targets = [EvalTarget(fix.prompt, fix.seed, load_for_model(fix.folder.training_image("target", 0), model.image_size, "target"),
                          load_for_model(fix.folder.training_image("surrogate", 0), model.image_size, "surrogate")) for fix in fixes]
    config = fixes[0].config  # its evaluation seeds and sampling settings, which every fix of one base model shares by default
    try:
        rank = merge_into(model, fixes)
        files = model.save_lora(folder.path) + save_kohya(model, folder)
        report, picture, _ = evaluate(model, targets, config, GenerationCache())
    finally:
        model.remove_lora()  # a shared model (the web page's) is left as it was
    per_fix = [{"run": fix.folder.path.name, "prompt": fix.prompt, "seed": fix.seed, "r_alone": fix.r_alone,
                "r_release": entry["toward_surrogate"]["r"], "verdict": entry["toward_surrogate"]["verdict"],
                "holds": entry["toward_surrogate"]["verdict"] == "fixed"} for fix, entry in zip(fixes, report["targets"])]
    touched = {fix.prompt for fix in fixes}
    integrity = {prompt: {"kept": row["ssim_at_least_0.9"], "seeds": len(row["seeds"]), "ssim_mean": row["ssim"]["value"], "touched": prompt in touched}
                 for prompt, row in report["integrity"].items()}
    summary = {"base_model": base, "rank": rank, "fixes": per_fix, "integrity": integrity,
               "not_holding": [f"{f['prompt']} seed {f['seed']}: r {_percent(f['r_alone'])} alone, {_percent(f['r_release'])} in the release" for f in per_fix if not f["holds"]]}
    write_json_atomic(folder.path / "release.json", summary)
    write_bytes_atomic(folder.model_card, release_card(per_fix, base, integrity, files).encode())
    save_image_atomic(picture, folder.picture)
    return summary


def summary_lines(summary: dict) -> list[str]:
    """The release for a terminal: one line per fix, one per touched prompt."""
    lines = [f"{f['prompt']} seed {f['seed']}: r {_percent(f['r_alone'])} alone, {_percent(f['r_release'])} in the release — {f['verdict']}" for f in summary["fixes"]]
    lines += [f"{prompt}: {row['kept']}/{row['seeds']} other seeds kept (SSIM ≥ 0.9)" for prompt, row in summary["integrity"].items()]
    lines.append("every fix holds" if not summary["not_holding"] else "NOT holding: " + "; ".join(summary["not_holding"]))
    return lines
