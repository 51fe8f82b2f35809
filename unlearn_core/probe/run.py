"""The probe run: images and cross-attention per variant, the metrics, and the files written.

For each variant the model generates one image per seed through `DiffusionModel.generate` (one
generator per seed, so every variant starts from the same initial noise), while
`unlearn_core.attention` captures the cross-attention of the model's denoiser. A forward hook on
the denoiser marks the end of each denoising step (the pipelines call it once per step, with the
classifier-free-guidance halves batched), so the captured attention splits by step.

Cross-attention mass on a token set S at step t is `M_t(S) = mean_q sum_{j in S} A_t[q, j]`
(averaged over heads and layers, over the image queries of the conditional half); its AUC is the
trapezoid area over normalised steps x in [0, 1]. Per-token heat maps per step are averaged over
seeds.

`run_probe` writes `results.csv` (one row per variant and seed), `summary.json`, the PNG figures
of `figures` and the images; `export_zip` bundles them.
"""

from __future__ import annotations

import csv
import json
import math
import re
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from unlearn_core.attention import AttentionTracer, capture_attention
from unlearn_core.probe import figures
from unlearn_core.probe.config import ProbeConfig
from unlearn_core.probe.text import TextScores, load_clip, text_analysis, text_encoder_of
from unlearn_core.probe.tokens import map_words, token_sets

CSV_COLUMNS = ("variant", "prompt", "seed", "text_cosine_tokens", "text_cosine_pooled", "drop_without_concept", "drop_without_instruction", "concept_auc", "instruction_auc", "image_similarity")

Progress = Callable[[int, int], None]


# -- cross-attention metrics -------------------------------------------------------------------
def mass_on(mass: np.ndarray | torch.Tensor, positions: Sequence[int]) -> np.ndarray:
    """M_t(S) from per-token mass (..., steps, tokens): sum over the positions in S."""
    mass = np.asarray(mass.cpu() if isinstance(mass, torch.Tensor) else mass, dtype=np.float64)
    if not len(positions):
        return np.zeros(mass.shape[:-1])
    return mass[..., list(positions)].sum(axis=-1)


def auc(curve: Sequence[float]) -> float:
    """Area under a per-step curve over normalised steps x in [0, 1] (trapezoid rule).

    A single step counts as a constant curve (its value).
    """
    y = np.asarray(curve, dtype=np.float64).reshape(-1)
    if y.size == 0:
        raise ValueError("cannot take the AUC of an empty curve")
    if y.size == 1:
        return float(y[0])
    x = np.linspace(0.0, 1.0, y.size)
    return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2.0)


# -- results -----------------------------------------------------------------------------------
@dataclass
class VariantResult:
    name: str
    prompt: str
    tokens: tuple[str, ...]  # the prompt's tokens, start/end included, no padding
    concept_positions: tuple[int, ...]
    instruction_positions: tuple[int, ...]
    text: TextScores
    seeds: tuple[int, ...]
    images: list  # PIL images, one per seed
    concept_curves: np.ndarray  # (seeds, steps) M_t(concept)
    instruction_curves: np.ndarray  # (seeds, steps) M_t(instruction)
    token_mass: np.ndarray  # (steps, tokens) mean over seeds, tokens of `tokens` only
    heatmaps: np.ndarray | None  # (steps, tokens, R, R) mean over seeds
    image_similarity: list[float] | None = None

    @property
    def concept_auc(self) -> list[float]:
        return [auc(c) for c in self.concept_curves]

    @property
    def instruction_auc(self) -> list[float]:
        return [auc(c) for c in self.instruction_curves]

    def token_label(self, position: int) -> str:
        token = self.tokens[position].replace("</w>", "")
        role = " (concept)" if position in self.concept_positions else " (instruction)" if position in self.instruction_positions else ""
        return f"{position}: {token}{role}"


@dataclass
class ProbeResult:
    config: ProbeConfig
    anchor_prompt: str
    variants: dict[str, VariantResult]
    out_dir: Path
    csv_path: Path
    summary_path: Path
    figures: dict[str, Path]
    image_paths: dict[str, list[Path]]
    rows: list[dict]
    image_similarity_reason: str | None
    seconds: float

    def summary(self) -> dict:
        per_variant = {}
        for name, v in self.variants.items():
            per_variant[name] = {
                "prompt": v.prompt,
                "concept_tokens": [v.tokens[p] for p in v.concept_positions],
                "instruction_tokens": [v.tokens[p] for p in v.instruction_positions],
                "text": asdict(v.text),
                "concept_auc_mean": float(np.mean(v.concept_auc)),
                "instruction_auc_mean": float(np.mean(v.instruction_auc)),
                "image_similarity_mean": None if v.image_similarity is None else float(np.mean(v.image_similarity)),
            }
        return {
            "config": self.config.to_dict(),
            "anchor_prompt": self.anchor_prompt,
            "variants": per_variant,
            "image_similarity": "clip" if self.image_similarity_reason is None else None,
            "image_similarity_unavailable": self.image_similarity_reason,
            "seconds": round(self.seconds, 2),
            "definitions": {
                "text_cosine_tokens": "cosine to the anchor prompt's of the mean over word tokens of the text encoder's last hidden state: what a Stable Diffusion 1.x/2.x denoiser cross-attends to",
                "text_cosine_pooled": "cosine to the anchor prompt's of the pooled (end-of-text) embedding: CLIP's sentence embedding, which SD 1.x/2.x never read",
                "drop_without_concept": "text_cosine_pooled minus the cosine after removing the concept tokens",
                "drop_without_instruction": "text_cosine_pooled minus the cosine after removing the instruction tokens",
                "auc": "trapezoid area under M_t(S) = mean over image queries (heads, layers) of sum_{j in S} A_t[q, j], steps normalised to [0, 1]",
            },
        }


# -- generation with attention capture ---------------------------------------------------------
def _generate_variant(model, prompt: str, config: ProbeConfig, n_tokens: int, tick: Callable[[], None]):
    """Images, per-image token mass (seeds, steps, K) and seed-mean heat maps for one prompt."""
    denoiser = model.denoiser
    images, masses, heat_sum = [], [], None
    seeds = list(config.seeds)
    for start in range(0, len(seeds), config.batch_size):
        chunk = seeds[start : start + config.batch_size]
        tracer = AttentionTracer(config.heatmap_resolution, images_per_call=len(chunk))

        def step_done(module, args, kwargs, output, tracer=tracer):
            _, timestep, _ = model.denoiser_call(args, kwargs)
            tracer.step_callback(None, tracer.step, float(torch.as_tensor(timestep).reshape(-1)[0]), {})
            tick()

        handle = denoiser.register_forward_hook(step_done, with_kwargs=True)
        try:
            with capture_attention(denoiser, tracer):
                generated = model.generate(prompt, chunk, config.steps, config.guidance, batch_size=len(chunk))
        finally:
            handle.remove()
        trace = tracer.trace()
        images.extend(image for image, _ in generated)
        masses.append(trace.mass.transpose(0, 1).numpy())  # (B, steps, K)
        if trace.heatmaps is not None:
            part = trace.heatmaps[:, :, :n_tokens].sum(dim=1).numpy()  # (steps, tokens, R, R)
            heat_sum = part if heat_sum is None else heat_sum + part
    mass = np.concatenate(masses, axis=0)
    heat = None if heat_sum is None else (heat_sum / len(seeds)).astype(np.float32)
    return images, mass, heat


def run_probe(
    model,
    concept: str | ProbeConfig,
    variants: Sequence[str] | str | None = None,
    seeds: Sequence[int] | str | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    out_dir: str | Path = "runs/probe",
    progress: Progress | None = None,
) -> ProbeResult:
    """Run the instruction-forgetting probe on a `DiffusionModel`; write CSV, JSON, figures and images to `out_dir`.

    `concept` is the concept string (the other settings then default to `ProbeConfig`'s) or a
    whole `ProbeConfig` (then leave variants/seeds/steps/guidance out). `progress(done, total)`
    is called after every denoising step. Raises InvalidInput for a model without text
    conditioning or a prompt longer than its tokenizer takes, before any image is generated.
    """
    started = time.perf_counter()
    if isinstance(concept, ProbeConfig):
        if any(v is not None for v in (variants, seeds, steps, guidance)):
            raise TypeError("pass either a ProbeConfig or the separate settings, not both")
        config = concept
    else:
        given = {k: v for k, v in dict(variants=variants, seeds=seeds, steps=steps, guidance=guidance).items() if v is not None}
        config = ProbeConfig(concept=concept, **given)
    tokenizer, encoder = text_encoder_of(model)
    out_dir = Path(out_dir)
    variant_list = config.variant_list
    prompts = {v.name: v.prompt(config.concept) for v in variant_list}
    anchor_prompt = config.anchor_prompt
    maps = {name: map_words(tokenizer, prompt) for name, prompt in prompts.items()}  # length errors before any work
    text = text_analysis(tokenizer, encoder, config.concept, anchor_prompt, prompts)

    clip, clip_reason = (None, "image similarity switched off") if not config.image_similarity else load_clip(config.clip_model)
    chunks = math.ceil(len(config.seeds) / config.batch_size)
    total, done = len(variant_list) * chunks * config.steps, [0]

    def tick():
        done[0] += 1
        if progress is not None:
            progress(done[0], total)

    results: dict[str, VariantResult] = {}
    for variant in variant_list:
        tmap = maps[variant.name]
        sets = token_sets(tmap, config.concept)
        n_tokens = len(tmap.input_ids)
        images, mass, heat = _generate_variant(model, prompts[variant.name], config, n_tokens, tick)
        results[variant.name] = VariantResult(
            name=variant.name,
            prompt=prompts[variant.name],
            tokens=tmap.tokens,
            concept_positions=sets.concept,
            instruction_positions=sets.instruction,
            text=text[variant.name],
            seeds=tuple(config.seeds),
            images=images,
            concept_curves=mass_on(mass, sets.concept),
            instruction_curves=mass_on(mass, sets.instruction),
            token_mass=mass[:, :, :n_tokens].mean(axis=0),
            heatmaps=heat,
            image_similarity=clip.similarity(images, anchor_prompt) if clip is not None else None,
        )

    result = ProbeResult(
        config=config,
        anchor_prompt=anchor_prompt,
        variants=results,
        out_dir=out_dir,
        csv_path=out_dir / "results.csv",
        summary_path=out_dir / "summary.json",
        figures={},
        image_paths={},
        rows=probe_rows(results),
        image_similarity_reason=None if clip is not None else clip_reason,
        seconds=0.0,
    )
    write_outputs(result)
    result.seconds = time.perf_counter() - started
    result.summary_path.write_text(json.dumps(result.summary(), indent=2))
    return result


# -- outputs -----------------------------------------------------------------------------------
def probe_rows(results: dict[str, VariantResult]) -> list[dict]:
    """One row per variant and seed, with the CSV columns."""
    rows = []
    for v in results.values():
        c_auc, i_auc = v.concept_auc, v.instruction_auc
        for k, seed in enumerate(v.seeds):
            rows.append(
                {
                    "variant": v.name,
                    "prompt": v.prompt,
                    "seed": seed,
                    "text_cosine_tokens": round(v.text.cosine_mean, 6),
                    "text_cosine_pooled": round(v.text.cosine, 6),
                    "drop_without_concept": round(v.text.drop_without_concept, 6),
                    "drop_without_instruction": round(v.text.drop_without_instruction, 6),
                    "concept_auc": round(c_auc[k], 6),
                    "instruction_auc": round(i_auc[k], 6),
                    "image_similarity": "" if v.image_similarity is None else round(v.image_similarity[k], 6),
                }
            )
    return rows


def _safe_name(name: str) -> str:
    return re.sub(r"[^\w-]+", "_", name)[:40] or "variant"


def write_outputs(result: ProbeResult) -> None:
    """CSV, per-image PNGs and the figures (summary.json is written by run_probe)."""
    out = result.out_dir
    (out / "images").mkdir(parents=True, exist_ok=True)
    with open(result.csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(result.rows)
    for name, v in result.variants.items():
        paths = []
        for seed, image in zip(v.seeds, v.images):
            path = out / "images" / f"{_safe_name(name)}_seed{seed}.png"
            image.save(path)
            paths.append(path)
        result.image_paths[name] = paths
    result.figures["similarity"] = figures.plot_similarity(result, out / "similarity.png")
    result.figures["attention_mass"] = figures.plot_attention_mass(result, out / "attention_mass.png")
    result.figures["images"] = figures.plot_images(result, out / "images.png")
    for name, v in result.variants.items():
        if v.heatmaps is not None:
            path = out / f"heatmaps_{_safe_name(name)}.png"
            result.figures[f"heatmaps_{name}"] = figures.plot_heatmaps(v, path, result.config.heatmap_steps, result.config.max_heatmap_tokens)


def export_zip(result: ProbeResult, path: str | Path | None = None) -> Path:
    """One zip with the CSV, summary.json, the figures and the images."""
    path = Path(path) if path else result.out_dir / "probe_export.zip"
    files = [result.csv_path, result.summary_path, *result.figures.values(), *(p for ps in result.image_paths.values() for p in ps)]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for file in files:
            if Path(file).is_file():
                archive.write(file, Path(file).relative_to(result.out_dir).as_posix())
    return path


def conclusion(result: ProbeResult) -> str:
    """The probe's answer in one line, from this run's numbers: how much of the first (baseline)
    variant's cross-attention on the concept's tokens each other variant keeps, and how close its
    text encoding stays to the plain prompt's."""
    variants = list(result.variants.values())
    if len(variants) < 2:
        return "Only one variant: add an instruction variant to compare with it."
    base, others = variants[0], variants[1:]
    base_mass = float(np.mean(base.concept_auc))
    kept = {v.name: float(np.mean(v.concept_auc)) / base_mass if base_mass > 0 else float("nan") for v in others}
    least = min(kept, key=kept.get)
    cosine = min(v.text.cosine_mean for v in others)  # over the word tokens: what the denoiser reads
    concept = result.config.concept
    if kept[least] >= 0.5:
        return (f"Writing the instruction does not remove \"{concept}\": every variant keeps at least {kept[least]:.0%} of "
                f"{base.name}'s attention on its tokens (least: {least}); their word tokens' encodings stay at cosine ≥ {cosine:.2f} to the plain prompt's.")
    return (f"{least} cut the attention on \"{concept}\" to {kept[least]:.0%} of {base.name}'s; the other variants keep "
            f"{min([k for n, k in kept.items() if n != least], default=kept[least]):.0%} or more. Look at its images: less attention is not absence.")


def summary_lines(result: ProbeResult) -> list[str]:
    """The key numbers as a fixed-width table, for the terminal."""
    lines = [
        conclusion(result),
        f"anchor: {result.anchor_prompt!r}",
        f"{'variant':<12} {'cos tokens':>10} {'cos pooled':>10} {'-concept':>9} {'-instr':>9} {'concept AUC':>12} {'instr AUC':>10} {'image sim':>10}",
    ]
    for v in result.variants.values():
        image = "n/a" if v.image_similarity is None else f"{np.mean(v.image_similarity):.4f}"
        lines.append(
            f"{v.name:<12} {v.text.cosine_mean:10.4f} {v.text.cosine:10.4f} {v.text.drop_without_concept:9.4f} {v.text.drop_without_instruction:9.4f} "
            f"{np.mean(v.concept_auc):12.4f} {np.mean(v.instruction_auc):10.4f} {image:>10}"
        )
    if result.image_similarity_reason:
        lines.append(f"image similarity: not computed ({result.image_similarity_reason})")
    lines.append(f"wrote {result.csv_path}, {result.summary_path} and {len(result.figures)} figures in {result.out_dir} ({result.seconds:.1f} s)")
    return lines
