"""A disk cache of pretrained-model generations (remember sets, 'before' images) and of recorded
sampling trajectories (the distilled remember set's states).

Keyed by model fingerprint, prompt, seed, steps and guidance: a second job on the same model and
prompt reuses the images and states instead of sampling them again.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load, save

from unlearn_core import settings
from unlearn_core.errors import DiskFull
from unlearn_core.files import write_bytes_atomic
from unlearn_core.models import DiffusionModel
from unlearn_core.models.base import SamplingRecord

RECORD_CACHE_LIMIT = 512 * 2**20  # bytes: a larger record (a big model's many states) is sampled again each job rather than kept


def model_fingerprint(model: DiffusionModel) -> str:
    """The source, the weights' precision unless fp32 (bf16 and fp32 draw different images; fp32
    entries keep the key they always had) and, for a local folder, its weight files' sizes and times."""
    path = Path(model.source)
    parts = [model.source, model.family]
    if model.weights_dtype != torch.float32:
        parts.append(str(model.weights_dtype))
    if path.is_dir():
        for weight in sorted(path.rglob("*.safetensors")) + sorted(path.rglob("*.bin")):
            stat = weight.stat()
            parts.append(f"{weight.relative_to(path)}:{stat.st_size}:{int(stat.st_mtime)}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


class GenerationCache:
    """Pretrained generations on disk; `get_or_generate` fills what is missing in one batch.

    Bounded: after each write the files are brought under `max_bytes` (HOTFIX_CACHE_MAX_GB), least
    recently used first. A read marks its file used (its modification time; access times are
    often not kept on servers), so a hot prompt stays while a one-off sweep's entries go. Several
    job processes may share the folder: a file evicted under another reader is simply generated
    again, and another writer's temporary file is never touched. A full disk skips the write."""

    def __init__(self, root: Path | None = None, max_bytes: int | None = None):
        self.root = Path(root or settings.current().cache_dir) / "generations"
        self.max_bytes = int(settings.current().cache_max_gb * 1e9) if max_bytes is None else int(max_bytes)

    def size(self) -> int:
        """Bytes the cache's entries take now."""
        return sum(size for _, size, _ in self._entries())

    def _entries(self) -> list[tuple[float, int, Path]]:
        """(last use, size, path) of every cached file; another writer's temporary file is left out."""
        entries = []
        if not self.root.is_dir():
            return entries
        for folder in self.root.iterdir():
            if not folder.is_dir():
                continue
            for file in folder.iterdir():
                if file.name.startswith("."):
                    continue
                try:
                    stat = file.stat()
                except OSError:  # evicted by another process meanwhile
                    continue
                entries.append((stat.st_mtime, stat.st_size, file))
        return entries

    def evict(self) -> list[Path]:
        """Remove least recently used files until the cache fits `max_bytes`; returns what went."""
        entries = sorted(self._entries(), key=lambda entry: entry[0])
        total = sum(size for _, size, _ in entries)
        removed = []
        for _, size, file in entries:
            if total <= self.max_bytes:
                break
            file.unlink(missing_ok=True)
            total -= size
            removed.append(file)
            try:
                file.parent.rmdir()  # the entry's folder, once empty
            except OSError:
                pass
        return removed

    @staticmethod
    def _used(file: Path) -> None:
        try:
            os.utime(file)
        except OSError:
            pass

    @staticmethod
    def _keep(file: Path, data: bytes) -> bool:
        """Write a cache file; False (nothing written) when the disk is full: the cache is optional."""
        try:
            write_bytes_atomic(file, data)
        except DiskFull:
            return False
        return True

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
                    self._used(file)
                except OSError:
                    file.unlink(missing_ok=True)
        missing = [seed for seed in seeds if seed not in images]
        if missing:
            with model.adapter_disabled():
                generated = model.generate(prompt, missing, steps, guidance)
            for image, provenance in generated:
                images[provenance.seed] = image
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                self._keep(folder / f"seed_{provenance.seed}.png", buffer.getvalue())
            self.evict()
        return [images[seed] for seed in seeds], len(missing)

    def missing_images(self, model: DiffusionModel, prompt: str, seeds: list[int], steps: int, guidance: float) -> int:
        """How many of `seeds`' images `get_or_generate` would have to sample."""
        folder = self._folder(model, prompt, steps, guidance)
        return sum(not (folder / f"seed_{seed}.png").is_file() for seed in seeds)

    def has_record(self, model: DiffusionModel, prompt: str, seeds: list[int], steps: int, guidance: float) -> bool:
        """Whether `get_or_record` would read these seeds' sampling back instead of sampling it."""
        return self._record_file(model, prompt, seeds, steps, guidance).is_file()

    def _record_file(self, model: DiffusionModel, prompt: str, seeds: list[int], steps: int, guidance: float) -> Path:
        return self._folder(model, prompt, steps, guidance) / f"states_{hashlib.sha256(json.dumps(seeds).encode()).hexdigest()[:16]}.safetensors"

    def get_or_record(self, model: DiffusionModel, prompt: str, seeds: list[int], steps: int, guidance: float) -> SamplingRecord:
        """The frozen model's recorded sampling of `seeds` (`DiffusionModel.record_sampling`, adapter
        disabled), read back from disk when an earlier job recorded the same seeds; a new record is
        written there. Stored in float32, so a read-back record equals the one sampled."""
        file = self._record_file(model, prompt, seeds, steps, guidance)
        if file.is_file():
            try:
                record = _record_from_tensors(load(file.read_bytes()), prompt)  # read into memory, not mapped: a later job may replace the file
                self._used(file)
                return record
            except (SafetensorError, OSError, KeyError, ValueError):
                file.unlink(missing_ok=True)  # a torn, foreign or just evicted file: record again
        with model.adapter_disabled():
            record = model.record_sampling(prompt, seeds, steps, guidance)
        tensors = _record_tensors(record)
        if sum(t.numel() * t.element_size() for t in tensors.values()) <= RECORD_CACHE_LIMIT:
            self._keep(file, save(tensors))
            self.evict()
        return record


def _record_tensors(record: SamplingRecord) -> dict[str, torch.Tensor]:
    """A record as named tensors (safetensors stores no Python objects): states, predictions,
    conditioning rows, and the final images as uint8."""
    tensors = {"x_t": record.x_t, "timesteps": record.timesteps, "out_cond": record.out_cond, "images": torch.from_numpy(np.stack([np.asarray(image.convert("RGB")) for image in record.images]))}
    if record.out_uncond is not None:
        tensors["out_uncond"] = record.out_uncond
    tensors |= {f"cond.{key}": value for key, value in record.cond.items()}
    tensors |= {f"uncond.{key}": value for key, value in (record.uncond or {}).items()}
    return {name: tensor.contiguous() for name, tensor in tensors.items()}


def _record_from_tensors(tensors: dict[str, torch.Tensor], prompt: str) -> SamplingRecord:
    def group(prefix):
        return {name.removeprefix(prefix): value for name, value in tensors.items() if name.startswith(prefix)}

    return SamplingRecord(
        x_t=tensors["x_t"], timesteps=tensors["timesteps"], out_cond=tensors["out_cond"], out_uncond=tensors.get("out_uncond"),
        cond=group("cond."), uncond=group("uncond.") or None, images=[Image.fromarray(array) for array in tensors["images"].numpy()], prompt=prompt,
    )
