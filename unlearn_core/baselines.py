"""The baselines' losses, as faithful to their repositories as one trainer allows: NegGrad, SISS
and EraseDiff. Mixed into `UnlearnTrainer`, whose sampling helpers (`_levels`, `_forget_batch`,
`_remember_batch`, `_forward`, `_gradient`, `_denoise_error`) they use; each returns
(loss_forget, loss_remember, g_forget, g_remember) like the trainer's own `_losses_ours`."""

from __future__ import annotations

import torch

from unlearn_core import objectives


class BaselineLosses:
    def _losses_erasediff(self):
        """EraseDiff (github JingWu321/EraseDiff, DDPM code before Aug 2024): forget samples noised
        with *uniform* noise u ~ U[0, 1) and trained to predict it; the step is g_r + λ·g_f with
        λ = `erasediff_weight` (their `lambda_bome`, 0.1), no projection, clipped at norm 1."""
        pt = self.model.prediction_type
        t, a, b, _ = self._levels()
        x_f, _, cond_f = self._forget_batch()
        uniform = self._shared_draw(lambda n: torch.rand((n, *x_f.shape[1:]), generator=self.generator), x_f.shape[0]).to(x_f.device)
        _, prediction = self._forward(x_f, cond_f, t, a, b, uniform)
        loss_forget = objectives.per_sample_mse(prediction, objectives.training_target(pt, x_f, uniform, a, b)).mean()
        g_forget = self.config.erasediff_weight * self._gradient(loss_forget)
        loss_remember = self._denoise_error(*self._remember_batch(), t, a, b).mean()
        return loss_forget, loss_remember, g_forget, self._gradient(loss_remember)

    def _losses_neggrad(self):
        """NegGrad as the paper defines it: gradient ascent on the target's diffusion loss plus
        descent on the remember loss, g = −g_f + g_r."""
        t, a, b, _ = self._levels()
        x_f, _, cond_f = self._forget_batch()
        loss_forget = self._denoise_error(x_f, cond_f, t, a, b).mean()
        g_ascent = self._gradient(-loss_forget)
        loss_remember = self._denoise_error(*self._remember_batch(), t, a, b).mean()
        return loss_forget, loss_remember, g_ascent, self._gradient(loss_remember)

    def _losses_siss(self):
        """SISS (github claserken/SISS, `losses/ddpm_deletion_loss.py`): x_t is the remember or the
        forget sample noised with the *same* ε at the same t, picked per item with probability
        `siss_mixture` (λ); each loss is importance-weighted by q(x_t | x)/q_mix(x_t) and summed
        over pixels. The deletion gradient is rescaled to norm `siss_deletion_norm` and subtracted;
        the step is then clipped at norm 1 (`max_grad_norm`)."""
        config = self.config
        t, a, b, _ = self._levels()
        x_f, _, cond_f = self._forget_batch()
        x_r, cond_r = self._remember_batch()
        noise = self._noise_like(x_f)
        from_forget = (self._shared_draw(lambda n: torch.rand(n, generator=self.generator), config.batch_size) < config.siss_mixture).to(x_f.device)
        x_t = torch.where(from_forget.view(-1, 1, 1, 1), objectives.noisy_sample(x_f, noise, a, b), objectives.noisy_sample(x_r, noise, a, b))
        # Conditioning of a forget pick is the target prompt's, of a remember pick the remember prompt's.
        cond = {key: torch.where(from_forget.view(-1, *[1] * (value.dim() - 1)), cond_f[key], value) for key, value in cond_r.items()}
        distance_r = ((x_t - a * x_r) ** 2).flatten(1).sum(1) / (2 * b.flatten() ** 2)
        distance_f = ((x_t - a * x_f) ** 2).flatten(1).sum(1) / (2 * b.flatten() ** 2)
        mix = config.siss_mixture
        weight_r = (1 / ((1 - mix) + mix * torch.exp((distance_r - distance_f).clamp(max=80)))).detach()
        weight_f = (1 / ((1 - mix) * torch.exp((distance_f - distance_r).clamp(max=80)) + mix)).detach()
        with self._autocast():
            prediction = self.model.predict(self.denoiser, x_t, t, cond).float()
        pt = self.model.prediction_type

        def summed(x0, weight):
            target = objectives.training_target(pt, x0, (x_t - a * x0) / b, a, b)
            return (weight * (prediction - target).pow(2).flatten(1).sum(1)).sum() / config.batch_size

        loss_remember, loss_forget = summed(x_r, weight_r), summed(x_f, weight_f)
        g_remember = self._gradient(loss_remember, retain_graph=True)
        g_deletion = self._gradient(loss_forget)
        if self._siss_norm is None:  # 0 in the config: 10 % of the first kept-data gradient norm (SISS's README advice)
            self._siss_norm = config.siss_deletion_norm or 0.1 * float(g_remember.norm())
        g_deletion = -self._siss_norm / (g_deletion.norm() + 1e-12) * g_deletion
        return loss_forget, loss_remember, g_deletion, g_remember
