"""Before/after evaluation on the same initial noise.

Forgetting: the target seed's output after unlearning vs the target (and vs the surrogate), and
the denoise probe (the target noised to t≈T/4 and denoised by the unlearned model); for each, how
far the painted pixels moved toward the surrogate (r) and the verdict that gives. Integrity:
before vs after on other seeds of the same prompt and on other prompts.
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

from unlearn_core import metrics
from unlearn_core.cache import GenerationCache
from unlearn_core.config import UnlearnConfig
from unlearn_core.models import DiffusionModel

PROBE_STRENGTH = 0.25
KEPT_SSIM = 0.9  # a seed whose before/after SSIM is at least this counts as kept
COLOURS = {"target": (31, 119, 180), "kept": (44, 160, 44), "changed": (214, 39, 40)}


@dataclass
class EvalTarget:
    prompt: str
    seed: int
    target: Image.Image
    surrogate: Image.Image


def other_seeds(count: int, exclude: set[int], remember_range: range) -> list[int]:
    """The first `count` seeds that are neither target seeds nor remember-set seeds."""
    seeds, candidate = [], 0
    while len(seeds) < count:
        if candidate not in exclude and candidate not in remember_range:
            seeds.append(candidate)
        candidate += 1
    return seeds


def _after(model: DiffusionModel, prompt: str, seeds: list[int], steps: int, guidance: float) -> list[Image.Image]:
    return [image for image, _ in model.generate(prompt, seeds, steps, guidance)]


@dataclass
class GridCell:
    """One seed of the before/after grid: its label, the number under it, and its frame colour."""

    label: str
    note: str
    before: Image.Image
    after: Image.Image
    colour: tuple[int, int, int]


def evaluate(model: DiffusionModel, targets: list[EvalTarget], config: UnlearnConfig, cache: GenerationCache | None = None) -> tuple[dict, Image.Image, list[Image.Image]]:
    """Metrics dict (JSON-ready), the labelled before/after grid, and each target seed's "after"
    image (in the order of `targets`); the model must carry its adapter.

    Reads the config's eval seeds and prompts, remember seeds (never evaluated on) and sampling
    settings."""
    cache = cache or GenerationCache()
    steps, guidance, eval_prompts = config.generation_steps, config.guidance_scale, config.eval_prompts
    report: dict = {"availability": metrics.availability(), "sscd_threshold": metrics.SSCD_THRESHOLD, "targets": [], "integrity": {}}
    target_cells: list[GridCell] = []
    sections: list[tuple[str, list[GridCell]]] = [("Target seed: before = the flagged output, after = the same seed with the adapter", target_cells)]
    after_targets: list[Image.Image] = []
    exclude = {t.seed for t in targets}
    seeds = other_seeds(config.eval_seeds, exclude, config.remember_seeds)
    for target in targets:
        after_target = _after(model, target.prompt, [target.seed], steps, guidance)[0]
        probe_after = model.sdedit(target.target, target.prompt, PROBE_STRENGTH, target.seed, steps, guidance)
        with model.adapter_disabled():
            probe_before = model.sdedit(target.target, target.prompt, PROBE_STRENGTH, target.seed, steps, guidance)
        entry = {
            "prompt": target.prompt,
            "seed": target.seed,
            "after_vs_target": metrics.compare([after_target], [target.target]),
            "after_vs_surrogate": metrics.compare([after_target], [target.surrogate]),
            "denoise_probe_after_vs_target": metrics.compare([probe_after], [target.target]),
            "denoise_probe_before_vs_target": metrics.compare([probe_before], [target.target]),
        }
        sscd = entry["after_vs_target"]["sscd"]
        entry["forgotten"] = (sscd["value"] < metrics.SSCD_THRESHOLD) if sscd["available"] else None
        entry["toward_surrogate"] = metrics.toward_surrogate(after_target, target.target, target.surrogate).to_dict()
        entry["denoise_probe_toward_surrogate"] = metrics.toward_surrogate(probe_after, target.target, target.surrogate).to_dict()
        entry["denoise_probe_before_toward_surrogate"] = metrics.toward_surrogate(probe_before, target.target, target.surrogate).to_dict()
        report["targets"].append(entry)
        after_targets.append(after_target)
        r = entry["toward_surrogate"]["r"]
        target_cells.append(GridCell(f"seed {target.seed} (target)", "r n/a" if r is None else f"moved {r:.0%}", target.target, after_target, COLOURS["target"]))
    target_prompts = {t.prompt for t in targets}
    integrity_prompts = list(dict.fromkeys([t.prompt for t in targets] + list(eval_prompts)))
    remember = set(config.remember_seeds)
    yours = [seed for seed in config.review_seeds if seed not in exclude and seed not in remember]  # the operator's grid, checked first
    for prompt in integrity_prompts:
        same = prompt in target_prompts
        prompt_seeds = yours + [s for s in seeds if s not in yours] if same else seeds[: max(1, min(8, len(seeds)))]
        if not prompt_seeds:
            continue
        before, _ = cache.get_or_generate(model, prompt, prompt_seeds, steps, guidance)
        after = _after(model, prompt, prompt_seeds, steps, guidance)
        scores = metrics.compare(before, after)
        ssim_values = scores["ssim"]["per_pair"]
        scores["seeds"] = prompt_seeds
        if same and yours:
            scores["your_seeds"] = yours
        scores["ssim_at_least_0.9"] = sum(v >= KEPT_SSIM for v in ssim_values)
        report["integrity"][prompt or "(empty prompt)"] = scores
        worst_first = sorted(range(len(prompt_seeds)), key=lambda i: ssim_values[i])
        cells = [GridCell(f"seed {prompt_seeds[i]}" + (" (yours)" if same and prompt_seeds[i] in yours else ""), f"SSIM {ssim_values[i]:.2f}", before[i], after[i], COLOURS["kept" if ssim_values[i] >= KEPT_SSIM else "changed"]) for i in worst_first]
        sections.append((f"{prompt or '(empty prompt)'!r}, other seeds, worst first: {scores['ssim_at_least_0.9']}/{len(prompt_seeds)} kept (SSIM >= {KEPT_SSIM})", cells))
    report["forgetting"] = forgetting_summary(report["targets"])
    picture = before_after_grid(sections)
    return report, picture, after_targets


def forgetting_summary(entries: list[dict]) -> dict:
    """The run's answer: the least-fixed target's r (same seed regenerated) and its verdict."""
    worst = min(entries, key=lambda e: e["toward_surrogate"]["r"] if e["toward_surrogate"]["r"] is not None else float("inf"))
    moved = worst["toward_surrogate"]
    return {
        "toward_surrogate": moved["r"],
        "residual": moved["residual"],
        "denoise_probe_toward_surrogate": worst["denoise_probe_toward_surrogate"]["r"],
        "verdict": moved["verdict"],
        "unpainted_change": max(e["toward_surrogate"]["unpainted_change"] for e in entries),
        "rest_changed": max(e["toward_surrogate"]["unpainted_change"] for e in entries) > metrics.UNPAINTED_CHANGE_WARNING,
        "fixed_at": metrics.FIXED_AT,
        "worst_target_seed": worst["seed"],
    }


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def _thumbnail(image: Image.Image, side: int) -> Image.Image:
    """The image with its longer edge at about `side` pixels: small images enlarged by a whole
    factor with nearest-neighbour (pixels stay sharp), large ones reduced."""
    longest = max(image.size)
    if longest <= side:
        factor = max(1, side // longest)
        return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)
    return image.resize((max(1, image.width * side // longest), max(1, image.height * side // longest)), Image.Resampling.LANCZOS)


def before_after_grid(sections: list[tuple[str, list[GridCell]]], columns: int = 8, side: int = 128) -> Image.Image:
    """Sections of labelled cells (a heading, then rows of cells): each cell is one seed, before
    over after, framed in its colour, with its label and number written below the images."""
    font, heading_font = _font(13), _font(15)
    sections = [(title, cells) for title, cells in sections if cells]
    first = sections[0][1][0]
    width, height = _thumbnail(first.before.convert("RGB"), side).size
    frame, inner, gap, margin, label_height, heading_height = 4, 2, 8, 52, 36, 26
    framed = 2 * height + 2 * frame + inner  # before over after, in the cell's frame
    cell_width, cell_height = width + 2 * frame, framed + label_height
    used = min(columns, max(len(cells) for _, cells in sections))
    rows = [(len(cells) + columns - 1) // columns for _, cells in sections]
    canvas = Image.new("RGB", (margin + used * (cell_width + gap) + gap, sum(heading_height + r * (cell_height + gap) for r in rows) + gap), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    y = gap
    for (title, cells), count in zip(sections, rows):
        draw.text((gap, y + 4), title, fill=(0, 0, 0), font=heading_font)
        y += heading_height
        for row in range(count):
            top = y + row * (cell_height + gap)
            draw.text((6, top + frame + height // 2 - 7), "before", fill=(80, 80, 80), font=font)
            draw.text((6, top + frame + inner + height + height // 2 - 7), "after", fill=(80, 80, 80), font=font)
            for column, cell in enumerate(cells[row * columns:(row + 1) * columns]):
                left = margin + column * (cell_width + gap)
                draw.rectangle([left, top, left + cell_width - 1, top + framed - 1], fill=cell.colour)
                canvas.paste(_thumbnail(cell.before.convert("RGB"), side).resize((width, height)), (left + frame, top + frame))
                canvas.paste(_thumbnail(cell.after.convert("RGB"), side).resize((width, height)), (left + frame, top + frame + inner + height))
                text_top = top + framed + 2
                draw.text((left, text_top), cell.label, fill=(0, 0, 0), font=font)
                draw.text((left, text_top + 16), cell.note, fill=cell.colour, font=font)
        y += count * (cell_height + gap)
    return canvas
