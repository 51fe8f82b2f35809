"""The probe's figures (matplotlib `Figure` objects on the Agg canvas, no pyplot state).

- `plot_similarity`: in the style of the paper's figures 2–3, text cosine to the anchor (pooled
  and mean over tokens), the token-ablation drops, and the CLIP image similarity (or why not);
- `plot_attention_mass`: as its figure 4, M_t(concept) and M_t(instruction) over normalised
  steps per variant (mean over seeds, min–max band), AUC in the legend;
- `plot_heatmaps`: per-token heat maps (rows: concept, then instruction tokens) over steps, each
  row on its own colour scale (that token's min to max over steps);
- `plot_images`: the images per variant (rows) and seed (columns, same initial noise).

`heatmap_image` and `token_choices` serve the UI's interactive heat-map view.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from unlearn_core.probe.run import ProbeResult, VariantResult


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def _wrap(text: str, width: int) -> str:
    return "\n".join(line for part in text.split("\n") for line in textwrap.wrap(part, width)[:6])


def plot_similarity(result: ProbeResult, path: Path) -> Path:
    """Text cosine to the anchor, token ablation, CLIP image similarity (paper fig. 2–3 style)."""
    names = list(result.variants)
    vs = [result.variants[n] for n in names]
    x = np.arange(len(names))
    fig = _figure(12, 4.4)
    axes = fig.subplots(1, 3)
    ax = axes[0]
    ax.bar(x - 0.2, [v.text.cosine_mean for v in vs], 0.4, label="mean over word tokens (what SD's denoiser reads)")
    ax.bar(x + 0.2, [v.text.cosine for v in vs], 0.4, label="pooled (CLIP's sentence embedding)")
    low = min([v.text.cosine for v in vs] + [v.text.cosine_mean for v in vs])
    ax.set_ylim(min(0.0, low - 0.05), 1.02)
    ax.set_title(f"(a) text cosine to anchor\n'{result.anchor_prompt}'", fontsize=11)
    ax.legend(fontsize=9, loc="upper center", bbox_to_anchor=(0.5, -0.2))  # below the axes: no bar hidden
    ax = axes[1]
    ax.bar(x - 0.2, [v.text.drop_without_concept for v in vs], 0.4, label="remove concept tokens", color="tab:red")
    ax.bar(x + 0.2, [v.text.drop_without_instruction for v in vs], 0.4, label="remove instruction tokens", color="tab:gray")
    ax.axhline(0, color="black", lw=0.6)
    ax.set_title("(b) token ablation: drop in pooled cosine", fontsize=11)
    ax.legend(fontsize=9, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    ax = axes[2]
    if result.image_similarity_reason is None:
        means = [float(np.mean(v.image_similarity)) for v in vs]
        stds = [float(np.std(v.image_similarity)) for v in vs]
        ax.bar(x, means, 0.6, yerr=stds, capsize=3, color=_colors(len(vs)))
        ax.set_title("(c) CLIP image–text similarity to anchor", fontsize=11)
    else:
        ax.text(0.5, 0.5, "CLIP image similarity unavailable:\n" + _wrap(result.image_similarity_reason, 50), ha="center", va="center", fontsize=10, transform=ax.transAxes)
        ax.set_title("(c) CLIP image–text similarity", fontsize=11)
        ax.set_axis_off()
    for ax in axes[:2] if result.image_similarity_reason else axes:
        ax.set_xticks(x, names, rotation=20, fontsize=10)
    fig.savefig(path)
    return path


def plot_attention_mass(result: ProbeResult, path: Path) -> Path:
    """M_t(concept) and M_t(instruction) over normalised steps, AUC in the legend (paper fig. 4 style)."""
    fig = _figure(11, 3.8)
    axes = fig.subplots(1, 2, sharey=True)
    colors = _colors(len(result.variants))
    styles = ("-", "--", ":", "-.")
    for index, (color, v) in enumerate(zip(colors, result.variants.values())):
        for ax, curves, aucs in ((axes[0], v.concept_curves, v.concept_auc), (axes[1], v.instruction_curves, v.instruction_auc)):
            mean = curves.mean(axis=0)
            xs = np.linspace(0, 1, mean.size) if mean.size > 1 else np.array([0.0])
            # each variant its own dash, the first (the baseline) drawn on top: curves that coincide stay visible
            ax.plot(xs, mean, color=color, lw=2, ls=styles[index % len(styles)], zorder=3 + len(result.variants) - index,
                    marker="o" if mean.size < 3 else None, label=f"{v.name} (AUC {np.mean(aucs):.3f})")
            if curves.shape[0] > 1:
                ax.fill_between(xs, curves.min(axis=0), curves.max(axis=0), color=color, alpha=0.15)
    axes[0].set_title(f"attention mass on concept tokens ('{result.config.concept}')", fontsize=11)
    axes[1].set_title("attention mass on instruction tokens", fontsize=11)
    for ax in axes:
        ax.set_xlabel("denoising progress (normalised step)", fontsize=10)
        ax.tick_params(labelsize=9)
        ax.legend(fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("M_t(S): share of attention on the tokens", fontsize=10)
    fig.savefig(path)
    return path


def heatmap_steps(total: int, count: int) -> list[int]:
    """`count` evenly spaced step indices in [0, total)."""
    return sorted({int(round(s)) for s in np.linspace(0, total - 1, min(count, total))})


def plot_heatmaps(v: VariantResult, path: Path, columns: int = 6, max_tokens: int = 8) -> Path:
    """Grid of per-token heat maps (rows: concept then instruction tokens) over denoising steps."""
    positions = list(v.concept_positions) + list(v.instruction_positions)
    if not positions:
        positions = list(range(1, len(v.tokens) - 1))
    positions = positions[:max_tokens]
    steps = heatmap_steps(v.heatmaps.shape[0], columns)
    fig = _figure(1.3 * len(steps) + 1.2, 1.3 * len(positions) + 0.6)
    axes = np.atleast_2d(fig.subplots(len(positions), len(steps), squeeze=False))
    for r, pos in enumerate(positions):
        maps = v.heatmaps[:, pos]
        vmin, vmax = float(maps.min()), float(maps.max())
        for c, step in enumerate(steps):
            ax = axes[r, c]
            ax.imshow(maps[step], cmap="magma", vmin=vmin, vmax=max(vmax, vmin + 1e-12), interpolation="bilinear")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"step {step + 1}", fontsize=8)
            if c == 0:
                ax.set_ylabel(v.token_label(pos).replace(" (", "\n("), fontsize=7)
    title = f"{v.name}: '{v.prompt}'\n(colour scale per token row: its min to max over steps)"
    fig.suptitle(_wrap(title, int(14 * len(steps) + 12)), fontsize=8)
    fig.savefig(path)
    return path


def plot_images(result: ProbeResult, path: Path) -> Path:
    """Images per variant (rows) and seed (columns), same initial noise per column."""
    names = list(result.variants)
    seeds = result.config.seeds
    fig = _figure(1.4 * len(seeds) + 1.4, 1.4 * len(names) + 0.3)
    axes = np.atleast_2d(fig.subplots(len(names), len(seeds), squeeze=False))
    for r, name in enumerate(names):
        for c, (seed, image) in enumerate(zip(seeds, result.variants[name].images)):
            ax = axes[r, c]
            ax.imshow(np.asarray(image))
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"seed {seed}", fontsize=8)
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.savefig(path)
    return path


def heatmap_image(result: ProbeResult, variant: str, position: int, step: int, width_in: float = 5.0):
    """One token's heat map at one step (mean over the run's seeds), laid over the variant's first
    image, with a colour bar on that token's own scale (its min to max over steps), as an RGB PIL image."""
    import io

    from PIL import Image

    v = result.variants[variant]
    if v.heatmaps is None:
        raise ValueError("this probe kept no heat maps")
    maps = v.heatmaps[:, int(position)]
    step = min(max(int(step), 0), maps.shape[0] - 1)
    low, high = float(maps.min()), float(maps.max())
    image = np.asarray(v.images[0].convert("RGB"))
    height, width = image.shape[:2]
    fig = _figure(width_in, width_in * 0.82)
    ax = fig.subplots()
    ax.imshow(image, extent=(0, width, height, 0), interpolation="nearest")
    shown = ax.imshow(maps[step], cmap="magma", vmin=low, vmax=max(high, low + 1e-12), alpha=0.6, extent=(0, width, height, 0), interpolation="bilinear")
    bar = fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.03)
    bar.set_label("share of the image's attention on this token", fontsize=10)
    bar.ax.tick_params(labelsize=9)
    ax.set_title(f"'{v.token_label(int(position))}', step {step + 1}/{maps.shape[0]}\nover seed {v.seeds[0]}'s image (map: mean over seeds)", fontsize=10)
    ax.set_axis_off()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def token_choices(result: ProbeResult, variant: str) -> list[tuple[str, int]]:
    """(label, position) for each word token of a variant's prompt (start/end excluded)."""
    v = result.variants[variant]
    return [(v.token_label(p), p) for p in range(1, len(v.tokens) - 1)]
