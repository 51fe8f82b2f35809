"""What training reads, prepared once with the frozen model: the encoded targets, surrogates and
remember images (`FixedSets`), and pools of sampling states (`StatePool`) — the target seeds' own
trajectories for forgetting, the frozen model's predictions on other seeds for distillation."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from unlearn_core import objectives
from unlearn_core.models import DiffusionModel, SamplingRecord


@dataclass
class StatePool:
    """Sampling states to train at, one row each: x_t, its timestep, its conditioning (a row of
    `conds`), a reference prediction and a label.

    Remember pools hold the frozen model's own prediction there (the teacher to match); target
    pools hold the unconditional prediction (for classifier-free guidance) and the target index.
    """

    x_t: torch.Tensor
    timesteps: torch.Tensor
    cond_index: torch.Tensor
    reference: torch.Tensor
    label: torch.Tensor
    conds: dict[str, torch.Tensor]
    guided: bool = False  # target pools: the pipeline combined [unconditional, conditional] here
    frozen: torch.Tensor | None = None  # target pools: the frozen model's guided prediction
    images: list | None = None  # target pools: each target seed's output when recorded

    def __len__(self) -> int:
        return self.x_t.shape[0]

    def to_tensors(self) -> dict:
        """The pool as tensors only (images as uint8 arrays), for a checkpoint that loads with
        `torch.load(weights_only=True)`."""
        import numpy as np

        fields = {name: getattr(self, name) for name in ("x_t", "timesteps", "cond_index", "reference", "label", "conds", "frozen")}
        images = [torch.from_numpy(np.array(image.convert("RGB"))) for image in self.images] if self.images is not None else None
        return {**fields, "guided": torch.tensor(self.guided), "images": images}

    @classmethod
    def from_tensors(cls, saved: dict) -> "StatePool":
        from PIL import Image

        images = [Image.fromarray(image.numpy()) for image in saved["images"]] if saved["images"] is not None else None
        return cls(**{**saved, "guided": bool(saved["guided"]), "images": images})

    def take(self, index: torch.Tensor, device: torch.device):
        cond = {key: value[self.cond_index[index]].to(device) for key, value in self.conds.items()}
        return self.x_t[index].to(device), self.timesteps[index].to(device), cond, self.reference[index].to(device), self.label[index].to(device)


def _pool(parts: list[tuple[SamplingRecord, str, int]]) -> StatePool:
    """Rows of (record, which prediction — 'cond' or 'uncond' — is the reference and which
    conditioning row applies, label). Conditioning rows are stored once per part."""
    rows: dict[str, list] = {"x_t": [], "timesteps": [], "cond_index": [], "reference": [], "label": []}
    conds: list[dict[str, torch.Tensor]] = []
    for record, branch, label in parts:
        size = len(record)
        cond = record.cond if branch == "cond" else record.uncond
        conds.append({key: value[:1] for key, value in cond.items()})
        rows["x_t"].append(record.x_t)
        rows["timesteps"].append(record.timesteps)
        rows["cond_index"].append(torch.full((size,), len(conds) - 1))
        rows["reference"].append(record.out_cond if branch == "cond" else record.out_uncond)
        rows["label"].append(torch.full((size,), label))
    return StatePool(**{key: torch.cat(value) for key, value in rows.items()}, conds={key: torch.cat([c[key] for c in conds]) for key in conds[0]})


def remember_pool(records: list[SamplingRecord]) -> StatePool:
    """The frozen model's predictions on its own sampling states: the distillation targets. Both
    branches of guidance are kept (the unconditional one serves every prompt), except for the empty
    prompt, whose two branches are the same."""
    parts = [(record, "cond", -1) for record in records]
    parts += [(record, "uncond", -1) for record in records if record.out_uncond is not None and record.prompt]
    return _pool(parts)


def target_pool(records: list[SamplingRecord], guided: bool) -> StatePool:
    """The target seeds' own sampling states (record i = target i), with the unconditional
    prediction the pipeline combined there (guidance) as the reference."""
    pool = _pool([(record, "cond", index) for index, record in enumerate(records)])
    if guided:
        pool.reference = torch.cat([record.out_uncond for record in records])
    pool.guided = guided
    return pool


def with_frozen_outputs(model: DiffusionModel, record: SamplingRecord) -> SamplingRecord:
    """The same states with the frozen model's predictions there (every LoRA layer off): the
    teacher at states the adapted model visits."""

    def predict(cond):
        rows = {key: value[:1].expand(len(record), *value.shape[1:]).to(model.device) for key, value in cond.items()}
        return model.predict(model.denoiser, record.x_t.to(model.device), record.timesteps.to(model.device), rows).float().cpu()

    with model.adapter_disabled(), torch.no_grad():
        return dataclasses.replace(record, out_cond=predict(record.cond), out_uncond=predict(record.uncond) if record.out_uncond is not None else None)


def record_target_states(model: DiffusionModel, targets: list[tuple[str, int]], steps: int, guidance: float) -> StatePool:
    """Each target's (prompt, seed) sampled and recorded with the model as it is now, plus the
    frozen model's guided prediction at every recorded state (`StatePool.frozen`) and the image
    each target seed now gives (`StatePool.images`)."""
    records = [model.record_sampling(prompt, [seed], steps, guidance) for prompt, seed in targets]
    guided = records[0].out_uncond is not None
    pool = target_pool(records, guided)
    frozen = [with_frozen_outputs(model, record) for record in records]
    pool.frozen = torch.cat([objectives.guided_prediction(f.out_uncond, f.out_cond, guidance) if guided else f.out_cond for f in frozen])
    pool.images = [record.images[0] for record in records]
    return pool


@dataclass
class FixedSets:
    """Prepared once before training: x0 of targets, surrogates and remember images and their
    prompts; for trajectory forgetting and distillation remembering, the sampling states."""

    target_x0: torch.Tensor
    surrogate_x0: torch.Tensor
    target_cond: dict[str, torch.Tensor]
    remember_x0: torch.Tensor | None = None
    remember_cond: dict[str, torch.Tensor] | None = None
    target_noise: torch.Tensor | None = None  # each target seed's unit initial noise, when known
    remember_states: StatePool | None = None
    target_states: StatePool | None = None
    targets: list[tuple[str, int]] | None = None  # (prompt, seed) of each target, to re-record its trajectory
    paint_mask: torch.Tensor | None = None  # (targets, 1, h, w) at x0's resolution: where x_s differs from x_f
    paint_mask_pixels: torch.Tensor | None = None  # (targets, 1, H, W): the same at the images' resolution
    surrogate_pixels: torch.Tensor | None = None  # (targets, 3, H, W) in [-1, 1]: x_s as painted, for the pixel-space forget loss
    pictures: list[tuple] | None = None  # (target, surrogate) images, to measure r while training
    neighbours: list[tuple] | None = None  # (prompt, seed, frozen image) of the flagged prompts' nearest remember seeds (`neighbour_checks`)


def encode_sets(model: DiffusionModel, targets, surrogates, target_prompts, remember_images, remember_prompts, target_seeds=None) -> FixedSets:
    """Encode images and prompts once (latents via the VAE, text via the text encoder)."""
    from unlearn_core.images import to_tensor

    def cond_for(prompts):
        return model.encode_prompts(prompts) if model.conditional else {}

    surrogate_pixels = to_tensor(surrogates)
    with torch.no_grad():
        return FixedSets(
            target_x0=model.encode_images(to_tensor(targets)),
            surrogate_x0=model.encode_images(surrogate_pixels),
            surrogate_pixels=surrogate_pixels.to(model.device),
            target_cond=cond_for(target_prompts),
            remember_x0=model.encode_images(to_tensor(remember_images)) if remember_images else None,
            remember_cond=cond_for(remember_prompts) if remember_images else None,
            target_noise=model.initial_noise(list(target_seeds)) if target_seeds is not None else None,
            targets=list(zip(target_prompts, target_seeds)) if target_seeds is not None else None,
        )
