"""Our loss terms, stateless: each takes the step's context and its weights as arguments and
returns a scalar. Forgetting aims x̂0 at the surrogate on the painted pixels (and at the frozen
model's own estimate elsewhere) or at the whole surrogate; remembering distils the frozen model at
its own sampling states, or is the ordinary diffusion loss (the paper's Eq. 8)."""

from __future__ import annotations

from typing import Callable

import torch

from unlearn_core import objectives
from unlearn_core.training.draws import StepContext

Schedule = Callable[[torch.Tensor], torch.Tensor]  # λ(s): the forget share at noise level s
Box = tuple[tuple[slice, ...], tuple[slice, ...]]  # (x0 cells, image pixels) a pixel-space forget loss decodes
PAINTED_BOX_MARGIN = 8  # x0 cells of context around the painted region (the decoder's receptive field)


def painted_box(ctx: StepContext, painted: bool) -> Box:
    """The x0 cells and image pixels to decode: the painted cells of every target widened by
    PAINTED_BOX_MARGIN cells, or everything when forgetting aims at the whole surrogate."""
    everything = (slice(None),) * 4
    mask = ctx.sets.paint_mask
    if not painted or mask is None:
        return everything, everything
    rows, columns = torch.nonzero(mask.amax(dim=(0, 1)), as_tuple=True)
    if rows.numel() == 0:
        return everything, everything
    height, width = mask.shape[-2:]
    top, left = max(int(rows.min()) - PAINTED_BOX_MARGIN, 0), max(int(columns.min()) - PAINTED_BOX_MARGIN, 0)
    bottom, right = min(int(rows.max()) + 1 + PAINTED_BOX_MARGIN, height), min(int(columns.max()) + 1 + PAINTED_BOX_MARGIN, width)
    scale = ctx.model.pixels_per_x0_cell
    cells = (slice(None), slice(None), slice(top, bottom), slice(left, right))
    pixels = (slice(None), slice(None), slice(top * scale, bottom * scale), slice(left * scale, right * scale))
    return cells, pixels


def in_loss_space(ctx: StepContext, error: torch.Tensor, a, b, loss_space: str) -> torch.Tensor:
    """A per-sample prediction error restated as the clean-image error it implies (loss_space
    'pixels' or 'x0'), so λ(s), not SNR(t), decides where along t a loss acts."""
    if loss_space in ("pixels", "x0"):
        return error * objectives.x0_error_weight(ctx.model.prediction_type, a, b).flatten()
    return error


def pixel_forget_error(ctx: StepContext, prediction, x_t, a, b, label, frozen, box: Box) -> torch.Tensor:
    """The forget error on the images x̂0 decodes to, inside the painted box.

    A latent model's colours are a nonlinear function of its latents, and a brush edge is finer than
    a latent cell: decoding x̂0 (the VAE's own decoder, gradients flowing through it) lets the loss
    see what the operator painted. Only the box is decoded, so the cost follows the correction's size."""
    pt, (cells, pixels) = ctx.model.prediction_type, box
    decoded = ctx.model.decode_x0(objectives.implied_x0(pt, x_t, prediction, a, b)[cells])
    aim = ctx.sets.surrogate_pixels[label][pixels]
    if frozen is not None:
        with torch.no_grad():
            frozen_pixels = ctx.model.decode_x0(objectives.implied_x0(pt, x_t, frozen, a, b)[cells])
        aim = objectives.painted_aim(frozen_pixels, aim, ctx.sets.paint_mask_pixels[label][pixels])
    return objectives.per_sample_mse(decoded, aim)


def forget_error(ctx: StepContext, prediction, x_t, a, b, label, frozen, loss_space: str, box: Box) -> torch.Tensor:
    """Per-sample distance of the prediction's x0-estimate to its aim: the surrogate on the painted
    pixels and the frozen model's estimate (from its prediction `frozen`) elsewhere, or the whole
    surrogate when `frozen` is None; on decoded pixels, on x0, or in the prediction's own space."""
    if loss_space == "pixels":
        return pixel_forget_error(ctx, prediction, x_t, a, b, label, frozen, box)
    pt, aim = ctx.model.prediction_type, ctx.sets.surrogate_x0[label]
    if frozen is not None:
        aim = objectives.painted_aim(objectives.implied_x0(pt, x_t, frozen, a, b), aim, ctx.sets.paint_mask[label])
    error = objectives.per_sample_mse(prediction, objectives.surrogate_target(pt, x_t, aim, a, b))
    return in_loss_space(ctx, error, a, b, loss_space)


def forget_on_trajectory(ctx: StepContext, batch: int, lam: Schedule, loss_space: str, guidance: float, painted: bool, box: Box, rows: torch.Tensor | None = None) -> torch.Tensor:
    """At the target seeds' own guided sampling states (of `rows` of the pool only, if given): make
    the *guided* prediction imply x_s. The unconditional half is the recorded one (no gradient), so
    the change lands in the target prompt's conditional branch, which only that prompt's images use."""
    pool = ctx.sets.target_states
    index = ctx.draws.indices(len(pool), batch) if rows is None else rows[ctx.draws.indices(len(rows), batch)]
    x_t, t, cond, unconditional, label = pool.take(index, ctx.model.device)
    a, b, s, conditional = ctx.predict_at(x_t, t, cond)
    guided = objectives.guided_prediction(unconditional, conditional, guidance) if pool.guided else conditional
    frozen = pool.frozen[index].to(x_t.device) if painted else None
    return (lam(s) * forget_error(ctx, guided, x_t, a, b, label, frozen, loss_space, box)).mean()


def forget_at_random_states(ctx: StepContext, batch: int, lam: Schedule, loss_space: str, painted: bool, box: Box, seed_noise_fraction: float) -> torch.Tensor:
    """The paper's form: x_t drawn from q(x_t | x_f) at random t, a share `seed_noise_fraction` of
    the samples noised with the target seed's own initial noise (tying the change to that seed)."""
    t, a, b, s = ctx.draws.levels(ctx.model, batch)
    index, x_f, _, cond = ctx.forget_batch(batch)
    noise = ctx.draws.noise_like(x_f)
    if ctx.sets.target_noise is not None and seed_noise_fraction > 0:
        use_seed = (ctx.draws.uniform(x_f.shape[0]) < seed_noise_fraction).to(x_f.device).view(-1, 1, 1, 1)
        noise = torch.where(use_seed, ctx.sets.target_noise[index].to(x_f.device), noise)
    x_t = objectives.noisy_sample(x_f, noise, a, b)
    prediction = ctx.predict(x_t, t, cond)
    frozen = ctx.predict_frozen(x_t, t, cond) if painted else None
    return (lam(s) * forget_error(ctx, prediction, x_t, a, b, index, frozen, loss_space, box)).mean()


def renoised_samples(ctx: StepContext, batch: int):
    """(x_t, t, cond, teacher) at fresh noisings x_t = a·x0 + b·ε of remember images, at random t:
    the frozen model's prediction there, computed now, is the teacher."""
    t, a, b, _ = ctx.draws.levels(ctx.model, batch)
    x0, cond = ctx.remember_batch(batch)
    x_t = objectives.noisy_sample(x0, ctx.draws.noise_like(x0), a, b)
    return x_t, t, cond, ctx.predict_frozen(x_t, t, cond)


def remember_distilled(ctx: StepContext, batch: int, lam: Schedule, weight: float, large_t_boost: float, loss_space: str, renoised: int = 0) -> torch.Tensor:
    """Match the frozen model's prediction at its own sampling states of other seeds and prompts
    (and at `renoised` fresh noisings of their final images, in the same forward pass), with weight
    w·(1 − λ(s))·(1 + k·s): held hardest at large t, where every seed's layout is decided."""
    pool = ctx.sets.remember_states
    x_t, t, cond, teacher, _ = pool.take(ctx.draws.indices(len(pool), batch), ctx.model.device)
    if renoised:
        more_x_t, more_t, more_cond, more_teacher = renoised_samples(ctx, renoised)
        x_t, t, teacher = torch.cat([x_t, more_x_t]), torch.cat([t, more_t.to(t.dtype)]), torch.cat([teacher, more_teacher])
        cond = {key: torch.cat([value, more_cond[key]]) for key, value in cond.items()}
    a, b, s, prediction = ctx.predict_at(x_t, t, cond)
    error = in_loss_space(ctx, objectives.per_sample_mse(prediction, teacher), a, b, loss_space)
    return weight * ((1 - lam(s)) * (1 + large_t_boost * s) * error).mean()


def denoise_error(ctx: StepContext, x0, cond, t, a, b) -> torch.Tensor:
    """Per-sample ordinary diffusion loss (squared error to T(x0, ε)) at the given noise levels."""
    noise = ctx.draws.noise_like(x0)
    prediction = ctx.predict(objectives.noisy_sample(x0, noise, a, b), t, cond)
    return objectives.per_sample_mse(prediction, objectives.training_target(ctx.model.prediction_type, x0, noise, a, b))


def remember_denoised(ctx: StepContext, batch: int, lam: Schedule, weight: float) -> torch.Tensor:
    """The ordinary diffusion loss on remember images (Eq. 8), weighted w·(1 − λ(s)), in the space
    diffusers trains each family in (ε/v for SD and DDPM, x0 for SD3)."""
    t, a, b, s = ctx.draws.levels(ctx.model, batch)
    error = denoise_error(ctx, *ctx.remember_batch(batch), t, a, b)
    return weight * ((1 - lam(s)) * ctx.model.remember_loss_weight(a, b).flatten() * error).mean()
