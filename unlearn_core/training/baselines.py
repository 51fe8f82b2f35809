"""The baselines' losses, as faithful to their repositories as one trainer allows: NegGrad, SISS
and EraseDiff. Each returns (loss_forget, loss_remember, g_forget, g_remember), the step being
g_forget + g_remember unprojected (`methods`)."""

from __future__ import annotations

import torch

from unlearn_core import objectives
from unlearn_core.training.draws import StepContext
from unlearn_core.training.losses import denoise_error


def erasediff(ctx: StepContext, batch: int, weight: float):
    """EraseDiff (github JingWu321/EraseDiff, DDPM code before Aug 2024): forget samples noised
    with *uniform* noise u ~ U[0, 1) and trained to predict it; the step is g_r + λ·g_f with
    λ = `weight` (their `lambda_bome`, 0.1), no projection, clipped at norm 1."""
    t, a, b, _ = ctx.draws.levels(ctx.model, batch)
    _, x_f, _, cond_f = ctx.forget_batch(batch)
    uniform = ctx.draws.uniform_like(x_f)
    prediction = ctx.predict(objectives.noisy_sample(x_f, uniform, a, b), t, cond_f)
    loss_forget = objectives.per_sample_mse(prediction, objectives.training_target(ctx.model.prediction_type, x_f, uniform, a, b)).mean()
    g_forget = weight * ctx.gradient(loss_forget)
    loss_remember = denoise_error(ctx, *ctx.remember_batch(batch), t, a, b).mean()
    return loss_forget, loss_remember, g_forget, ctx.gradient(loss_remember)


def neggrad(ctx: StepContext, batch: int):
    """NegGrad as the paper defines it: gradient ascent on the target's diffusion loss plus
    descent on the remember loss, g = −g_f + g_r."""
    t, a, b, _ = ctx.draws.levels(ctx.model, batch)
    _, x_f, _, cond_f = ctx.forget_batch(batch)
    loss_forget = denoise_error(ctx, x_f, cond_f, t, a, b).mean()
    g_ascent = ctx.gradient(-loss_forget)
    loss_remember = denoise_error(ctx, *ctx.remember_batch(batch), t, a, b).mean()
    return loss_forget, loss_remember, g_ascent, ctx.gradient(loss_remember)


def siss(ctx: StepContext, batch: int, mixture: float):
    """SISS (github claserken/SISS, `losses/ddpm_deletion_loss.py`): x_t is the remember or the
    forget sample noised with the *same* ε at the same t, picked per item with probability
    `mixture` (λ); each loss is importance-weighted by q(x_t | x)/q_mix(x_t) and summed over pixels.
    Returns the raw deletion gradient; `methods.SISS` rescales it."""
    t, a, b, _ = ctx.draws.levels(ctx.model, batch)
    _, x_f, _, cond_f = ctx.forget_batch(batch)
    x_r, cond_r = ctx.remember_batch(batch)
    noise = ctx.draws.noise_like(x_f)
    from_forget = (ctx.draws.uniform(batch) < mixture).to(x_f.device)
    x_t = torch.where(from_forget.view(-1, 1, 1, 1), objectives.noisy_sample(x_f, noise, a, b), objectives.noisy_sample(x_r, noise, a, b))
    # Conditioning of a forget pick is the target prompt's, of a remember pick the remember prompt's.
    cond = {key: torch.where(from_forget.view(-1, *[1] * (value.dim() - 1)), cond_f[key], value) for key, value in cond_r.items()}
    distance_r = ((x_t - a * x_r) ** 2).flatten(1).sum(1) / (2 * b.flatten() ** 2)
    distance_f = ((x_t - a * x_f) ** 2).flatten(1).sum(1) / (2 * b.flatten() ** 2)
    weight_r = (1 / ((1 - mixture) + mixture * torch.exp((distance_r - distance_f).clamp(max=80)))).detach()
    weight_f = (1 / ((1 - mixture) * torch.exp((distance_f - distance_r).clamp(max=80)) + mixture)).detach()
    prediction = ctx.predict(x_t, t, cond)
    pt = ctx.model.prediction_type

    def summed(x0, weight):
        target = objectives.training_target(pt, x0, (x_t - a * x0) / b, a, b)
        return (weight * (prediction - target).pow(2).flatten(1).sum(1)).sum() / batch

    loss_remember, loss_forget = summed(x_r, weight_r), summed(x_f, weight_f)
    g_remember = ctx.gradient(loss_remember, retain_graph=True)
    return loss_forget, loss_remember, ctx.gradient(loss_forget), g_remember
