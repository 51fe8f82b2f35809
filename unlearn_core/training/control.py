"""When training stops: a callback with its own state, in the manner of transformers'
`TrainerCallback` and Lightning's `EarlyStopping`.

`StopWhenFixed` re-records the targets' guided sampling trajectories every few steps with the
adapter as trained so far: the forget loss trains at the states the model now visits, and the
recorded outputs give r, how far each target has moved toward its surrogate. Training stops once
every target's r is at least `stop_at_r`; a job with several targets meanwhile spends its forget
batch on the ones still short of it."""

from __future__ import annotations

import torch

from unlearn_core.sets import record_target_states
from unlearn_core.training.draws import StepContext


class StopWhenFixed:
    def __init__(self, every: int, stop_at_r: float, generation_steps: int, guidance: float):
        self.every, self.stop_at_r = every, stop_at_r
        self.generation_steps, self.guidance = generation_steps, guidance
        self.target_r: list[float | None] = []  # each target's r at the last refresh

    @property
    def r(self) -> float | None:
        """The least r of the targets at the last refresh (None before one)."""
        return min((r for r in self.target_r if r is not None), default=None)

    def refresh(self, ctx: StepContext) -> None:
        """Re-record every target's trajectory with the model as it is now, and measure each r."""
        from unlearn_core.metrics import toward_surrogate

        sets = ctx.sets
        ctx.denoiser.eval()
        sets.target_states = record_target_states(ctx.model, sets.targets, self.generation_steps, self.guidance)
        ctx.denoiser.train()
        if sets.pictures:
            self.target_r = [toward_surrogate(image, target, surrogate).r for image, (target, surrogate) in zip(sets.target_states.images, sets.pictures)]

    def on_step_end(self, step: int, ctx: StepContext) -> None:
        if self.every and step % self.every == 0:
            self.refresh(ctx)

    def should_stop(self) -> bool:
        return self.stop_at_r > 0 and self.r is not None and self.r >= self.stop_at_r

    def rows_to_forget(self, ctx: StepContext) -> torch.Tensor | None:
        """Rows of the target pool whose target is still short of `stop_at_r`, when some targets
        are there and others not; None (every row) otherwise. A target that slips back is drawn again."""
        moved = self.target_r
        if self.stop_at_r <= 0 or len(moved) < 2:
            return None
        short = [index for index, r in enumerate(moved) if r is None or r < self.stop_at_r]
        if not short or len(short) == len(moved):
            return None
        return torch.nonzero(torch.isin(ctx.sets.target_states.label, torch.tensor(short)), as_tuple=True)[0]

    def state_dict(self) -> dict:
        return {"target_r": list(self.target_r)}

    def load_state_dict(self, state: dict) -> None:
        self.target_r = list(state.get("target_r", []))
