"""How each method gets its two gradients and combines them into one step.

Ours projects g_f against g_r where they conflict (the paper's Eq. 12–13); the baselines combine
theirs as published, unprojected. A method with state (SISS's deletion norm) saves it through
`state_dict`, like every other stateful part of the trainer."""

from __future__ import annotations

import functools
from typing import Callable

import torch

from unlearn_core import objectives
from unlearn_core.config import UnlearnConfig
from unlearn_core.training import baselines, losses
from unlearn_core.training.draws import StepContext


class Method:
    """The baselines' default: g = g_forget + g_remember, no state."""

    def missing(self, ctx: StepContext) -> str:
        """What this method needs that the prepared sets lack ('' when nothing)."""
        return "remember images" if ctx.sets.remember_x0 is None else ""

    def gradients(self, ctx: StepContext):
        """(loss_forget, loss_remember, g_forget, g_remember) of one step."""
        raise NotImplementedError

    def combine(self, g_forget: torch.Tensor, g_remember: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """The step's gradient, and whether a projection changed it."""
        return g_forget + g_remember, False

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class Ours(Method):
    """λ(s)-weighted surrogate forget loss and (1 − λ(s))-weighted remember loss, g_f projected
    against g_r when they conflict (`projection`: none | forget | both)."""

    def __init__(self, config: UnlearnConfig, ctx: StepContext, rows_to_forget: Callable[[], torch.Tensor | None] = lambda: None):
        self.config, self.rows_to_forget = config, rows_to_forget
        self.lam = functools.partial(objectives.forget_weight, schedule=config.lambda_schedule, gamma=config.gamma, constant=config.constant_lambda)
        self.painted = config.forget_target == "painted"
        self.box = losses.painted_box(ctx, self.painted)

    def missing(self, ctx: StepContext) -> str:
        config, sets = self.config, ctx.sets
        needs = {
            "the target seeds' sampling states": config.forget_states == "trajectory" and sets.target_states is None,
            "the painted mask": self.painted and (sets.paint_mask is None or sets.paint_mask_pixels is None),
            "remember sampling states": config.remember_loss == "distill" and sets.remember_states is None,
            "remember images": (config.remember_loss == "denoise" or config.remember_renoised > 0) and sets.remember_x0 is None,
        }
        return ", ".join(name for name, lacking in needs.items() if lacking)

    def forget_loss(self, ctx: StepContext) -> torch.Tensor:
        config = self.config
        if config.forget_states == "trajectory":
            return losses.forget_on_trajectory(ctx, config.batch_size, self.lam, config.loss_space, config.guidance_scale, self.painted, self.box, self.rows_to_forget())
        return losses.forget_at_random_states(ctx, config.batch_size, self.lam, config.loss_space, self.painted, self.box, config.seed_noise_fraction)

    def remember_loss(self, ctx: StepContext) -> torch.Tensor:
        config = self.config
        if config.remember_loss == "distill":
            return losses.remember_distilled(ctx, config.remember_batch_size, self.lam, config.remember_weight, config.remember_large_t_boost, config.loss_space, config.remember_renoised)
        return losses.remember_denoised(ctx, config.remember_batch_size, self.lam, config.remember_weight)

    def gradients(self, ctx: StepContext):
        loss_forget = self.forget_loss(ctx)
        g_forget = ctx.gradient(loss_forget)
        loss_remember = self.remember_loss(ctx)
        return loss_forget, loss_remember, g_forget, ctx.gradient(loss_remember)

    def combine(self, g_forget, g_remember):
        g_remember = objectives.without_rounding_noise(g_remember, g_forget)
        g_forget, g_remember, projected = objectives.project_conflicting(g_forget, g_remember, self.config.projection)
        return g_forget + g_remember, projected


class NegGrad(Method):
    def __init__(self, config: UnlearnConfig):
        self.batch = config.batch_size

    def gradients(self, ctx):
        return baselines.neggrad(ctx, self.batch)


class EraseDiff(Method):
    def __init__(self, config: UnlearnConfig):
        self.batch, self.weight = config.batch_size, config.erasediff_weight

    def gradients(self, ctx):
        return baselines.erasediff(ctx, self.batch, self.weight)


class SISS(Method):
    """SISS's mixture; the deletion gradient rescaled to norm `siss_deletion_norm` (0: 10 % of the
    first remember-gradient norm, SISS's README advice, kept from the first step on) and subtracted."""

    def __init__(self, config: UnlearnConfig):
        self.batch, self.mixture, self.norm = config.batch_size, config.siss_mixture, config.siss_deletion_norm or None

    def gradients(self, ctx):
        loss_forget, loss_remember, g_deletion, g_remember = baselines.siss(ctx, self.batch, self.mixture)
        if self.norm is None:
            self.norm = 0.1 * float(g_remember.norm())
        return loss_forget, loss_remember, -self.norm / (g_deletion.norm() + 1e-12) * g_deletion, g_remember

    def state_dict(self) -> dict:
        return {"norm": self.norm}

    def load_state_dict(self, state: dict) -> None:
        self.norm = state.get("norm", self.norm)


def make_method(config: UnlearnConfig, ctx: StepContext, rows_to_forget: Callable[[], torch.Tensor | None] = lambda: None) -> Method:
    if config.method == "ours":
        return Ours(config, ctx, rows_to_forget)
    return {"neggrad": NegGrad, "erasediff": EraseDiff, "siss": SISS}[config.method](config)
