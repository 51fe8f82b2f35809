"""Seed grids with provenance, written as PNGs plus a JSON manifest."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from unlearn_core.config import GenerationRequest
from unlearn_core.files import save_image_atomic
from unlearn_core.models import DiffusionModel, Provenance


def generate_grid(model: DiffusionModel, request: GenerationRequest, progress=None) -> list[tuple[Image.Image, Provenance]]:
    """Generate `request.seeds` in batches; `progress(done, total)` is called after each batch."""
    results: list[tuple[Image.Image, Provenance]] = []
    batch = 8
    for start in range(0, len(request.seeds), batch):
        chunk = request.seeds[start : start + batch]
        results.extend(model.generate(request.prompt, chunk, request.steps, request.guidance_scale, batch_size=batch))
        if progress:
            progress(len(results), len(request.seeds))
    return results


def image_file_name(provenance: Provenance) -> str:
    return f"seed_{provenance.seed:06d}.png"


def write_grid(results: list[tuple[Image.Image, Provenance]], out: Path) -> Path:
    """Save each image and `manifest.json` (one provenance record per file); return the manifest."""
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for image, provenance in results:
        name = image_file_name(provenance)
        save_image_atomic(image, out / name)
        records.append({"file": name, **provenance.to_dict()})
    manifest = out / "manifest.json"
    tmp = manifest.with_suffix(".tmp")
    tmp.write_text(json.dumps({"images": records}, indent=2))
    tmp.replace(manifest)
    return manifest
