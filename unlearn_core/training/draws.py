"""Random draws shared by every training process, and what a loss needs to run the model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from unlearn_core.models import DiffusionModel
from unlearn_core.sets import FixedSets


class SharedDraws:
    """One generator, the same in every process: each process draws the global batch (batch ×
    processes) and keeps its own rows, so N processes train exactly as one with an N× batch would."""

    def __init__(self, seed: int, processes: int = 1, rank: int = 0):
        self.generator = torch.Generator("cpu").manual_seed(seed * 1000)
        self.processes, self.rank = processes, rank

    def shared(self, draw: Callable[[int], torch.Tensor | tuple], batch: int):
        """`draw(n)` for the global batch, cut to this process's rows (a tuple of tensors alike)."""
        drawn = draw(batch * self.processes)
        rows = slice(self.rank * batch, (self.rank + 1) * batch)
        return tuple(part[rows] for part in drawn) if isinstance(drawn, tuple) else drawn[rows]

    def indices(self, size: int, batch: int) -> torch.Tensor:
        return self.shared(lambda n: torch.randint(0, size, (n,), generator=self.generator), batch)

    def noise_like(self, x0: torch.Tensor) -> torch.Tensor:
        return self.shared(lambda n: torch.randn((n, *x0.shape[1:]), generator=self.generator), x0.shape[0]).to(x0.device)

    def uniform_like(self, x0: torch.Tensor) -> torch.Tensor:
        return self.shared(lambda n: torch.rand((n, *x0.shape[1:]), generator=self.generator), x0.shape[0]).to(x0.device)

    def uniform(self, batch: int) -> torch.Tensor:
        return self.shared(lambda n: torch.rand(n, generator=self.generator), batch)

    def levels(self, model: DiffusionModel, batch: int):
        """Random timesteps t and their a, b (shaped for broadcasting) and s = t/T, for `batch` samples."""
        t, a, b, s = self.shared(lambda n: model.sample_noise_levels(n, self.generator), batch)
        return t, a.view(-1, 1, 1, 1), b.view(-1, 1, 1, 1), s

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


@dataclass
class StepContext:
    """What every loss reads: the model and its (prepared) denoiser, the fixed sets, the shared
    draws, the precision, and `gradient`, which backwards a loss and returns the flat gradient."""

    model: DiffusionModel
    denoiser: torch.nn.Module
    sets: FixedSets
    draws: SharedDraws
    gradient: Callable[..., torch.Tensor]
    bf16: bool = False

    def autocast(self):
        return torch.autocast(self.model.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def predict(self, x_t, t, cond) -> torch.Tensor:
        with self.autocast():
            return self.model.predict(self.denoiser, x_t, t, cond).float()

    def predict_frozen(self, x_t, t, cond) -> torch.Tensor:
        """The base model's prediction (every LoRA layer off), without gradient."""
        with torch.no_grad(), self.model.adapter_disabled():
            return self.predict(x_t, t, cond)

    def predict_at(self, x_t, t, cond):
        """The noise levels of timesteps t (a, b shaped for broadcasting, s flat) and the prediction at x_t."""
        a, b, s = self.model.noise_levels_at(t)
        return a.view(-1, 1, 1, 1), b.view(-1, 1, 1, 1), s, self.predict(x_t, t, cond)

    def forget_batch(self, batch: int):
        """(index, x_f, x_s, target conditioning) of `batch` forget samples."""
        sets = self.sets
        index = self.draws.indices(sets.target_x0.shape[0], batch)
        return index, sets.target_x0[index], sets.surrogate_x0[index], take(sets.target_cond, index)

    def remember_batch(self, batch: int):
        """(x0, conditioning) of `batch` remember images."""
        index = self.draws.indices(self.sets.remember_x0.shape[0], batch)
        return self.sets.remember_x0[index], take(self.sets.remember_cond, index)


def take(cond: dict[str, torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
    return {key: value[index] for key, value in cond.items()}
