"""A disk cache of pretrained-model generations (remember sets, 'before' images).

Keyed by model fingerprint, prompt, seed, steps and guidance: a second job on the same model and
prompt reuses the images instead of regenerating them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from PIL import Image

from unlearn_core import settings
from unlearn_core.files import save_image_atomic
from unlearn_core.models import DiffusionModel


def model_fingerprint(model: DiffusionModel) -> str:
    """The source plus, for a local folder, the sizes and times of its weight files."""
    path = Path(model.source)
    parts = [model.source, model.family]
    if path.is_dir():
        for weight in sorted(path.rglob("*.safetensors")) + sorted(path.rglob("*.bin")):
            stat = weight.stat()
            parts.append(f"{weight.relative_to(path)}:{stat.st_size}:{int(stat.st_mtime)}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


class GenerationCache:
    """Pretrained generations on disk; `get_or_generate` fills what is missing in one batch."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root or settings.current().cache_dir) / "generations"

    def _folder(self, model: DiffusionModel, prompt: str, steps: int, guidance: float) -> Path:
        key = json.dumps([model_fingerprint(model), prompt, steps, round(float(guidance), 4)])
        return self.root / hashlib.sha256(key.encode()).hexdigest()[:24]

    def get_or_generate(self, model: DiffusionModel, prompt: str, seeds: list[int], steps: int, guidance: float) -> tuple[list[Image.Image], int]:
        """Images for `seeds` from the model with its adapter disabled; returns (images, generated count)."""
        folder = self._folder(model, prompt, steps, guidance)
        images: dict[int, Image.Image] = {}
        for seed in seeds:
            file = folder / f"seed_{seed}.png"
            if file.is_file():
                try:
                    with Image.open(file) as handle:
                        images[seed] = handle.convert("RGB")
                except OSError:
                    file.unlink(missing_ok=True)
        missing = [seed for seed in seeds if seed not in images]
        if missing:
            with model.adapter_disabled():
                generated = model.generate(prompt, missing, steps, guidance)
            for image, provenance in generated:
                images[provenance.seed] = image
                save_image_atomic(image, folder / f"seed_{provenance.seed}.png")
        return [images[seed] for seed in seeds], len(missing)
