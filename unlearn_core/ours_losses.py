"""The losses of `ours`, mixed into `UnlearnTrainer` (as `baselines.BaselineLosses` is), whose
sampling helpers (`_draw`, `_levels`, `_forget_batch`, `_remember_batch`, `_gradient`, `painted_box`)
they use: the λ(s)-weighted surrogate forget loss, at the target seeds' sampling states or at random
ones, measured on the decoded pixels, on x0 or in the prediction's own space; and the (1 − λ(s))-
weighted remember loss, distilled from the frozen model (with fresh noisings of its images) or the
ordinary diffusion loss. `_losses_ours` returns them as two gradients."""

from __future__ import annotations

import torch

from unlearn_core import objectives
from unlearn_core.sets import StatePool


class OursLosses:
    def _losses_ours(self):
        """λ(s)-weighted surrogate forget loss and (1 − λ(s))-weighted remember loss, as two gradients."""
        loss_forget = self._forget_loss_trajectory() if self.config.forget_states == "trajectory" else self._forget_loss_random()
        g_forget = self._gradient(loss_forget)
        loss_remember = self._remember_loss_distill() if self.config.remember_loss == "distill" else self._remember_loss_denoise()
        return loss_forget, loss_remember, g_forget, self._gradient(loss_remember)

    def _lambda(self, s: torch.Tensor) -> torch.Tensor:
        config = self.config
        return objectives.forget_weight(s, config.lambda_schedule, config.gamma, config.constant_lambda)

    def _forget_error(self, prediction, x_t, a, b, label, frozen=None) -> torch.Tensor:
        """Per-sample distance of the prediction's x0-estimate to its aim: the surrogate on the
        painted pixels and the frozen model's estimate (from its prediction `frozen`) elsewhere, or
        the whole surrogate when `frozen` is None. Measured on the decoded image (loss_space
        'pixels'), on x0 (so λ(s), not SNR(t), decides where forgetting acts) or in the prediction's
        own space."""
        pt = self.model.prediction_type
        if self.config.loss_space == "pixels":
            return self._pixel_forget_error(prediction, x_t, a, b, label, frozen)
        aim = self.sets.surrogate_x0[label]
        if frozen is not None:
            aim = objectives.painted_aim(objectives.implied_x0(pt, x_t, frozen, a, b), aim, self.sets.paint_mask[label])
        return self._in_loss_space(objectives.per_sample_mse(prediction, objectives.surrogate_target(pt, x_t, aim, a, b)), a, b)

    def _pixel_forget_error(self, prediction, x_t, a, b, label, frozen=None) -> torch.Tensor:
        """The forget error on the images x̂0 decodes to, inside the painted box.

        A latent model's colours are a nonlinear function of its latents: fitting the surrogate's
        latents to 86 % left the painted stripe of the demo's romania case only 66 % of the way to
        the surrogate's colour, and the one-pixel brush edge of a correction is finer than a latent
        cell. Decoding x̂0 (the VAE's own decoder, gradients flowing through it) lets the loss see
        what the operator painted. Only the painted box is decoded (`painted_box`), so the cost
        follows the correction's size, not the image's."""
        pt = self.model.prediction_type
        cells, pixels = self.painted_box
        decoded = self.model.decode_x0(objectives.implied_x0(pt, x_t, prediction, a, b)[cells])
        aim = self.sets.surrogate_pixels[label][pixels]
        if frozen is not None:
            with torch.no_grad():
                frozen_pixels = self.model.decode_x0(objectives.implied_x0(pt, x_t, frozen, a, b)[cells])
            aim = objectives.painted_aim(frozen_pixels, aim, self.sets.paint_mask_pixels[label][pixels])
        return objectives.per_sample_mse(decoded, aim)

    def _in_loss_space(self, error: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """A per-sample prediction error, restated as the clean-image error it implies (loss_space
        pixels or x0: the remember loss stays on x0 either way)."""
        if self.config.loss_space in ("pixels", "x0"):
            return error * objectives.x0_error_weight(self.model.prediction_type, a, b).flatten()
        return error

    def _forget_loss_trajectory(self):
        """At the target seed's own guided sampling states: make the *guided* prediction imply x_s.

        The unconditional half is the recorded one (no gradient), so the change lands in the
        target prompt's conditional branch, which only that prompt's images use.
        """
        pool = self.sets.target_states
        index, x_t, a, b, s, unconditional, label, conditional = self._predict_on_pool(pool, self.config.batch_size, self._unfixed_target_rows())
        guided = objectives.guided_prediction(unconditional, conditional, self.config.guidance_scale) if pool.guided else conditional
        frozen = pool.frozen[index].to(x_t.device) if self.config.forget_target == "painted" else None
        return (self._lambda(s) * self._forget_error(guided, x_t, a, b, label, frozen)).mean()

    def _forget_loss_random(self):
        """The paper's form: x_t drawn from q(x_t | x_f) at random t (a share of samples noised with
        the target seed's own initial noise, tying the change to that seed)."""
        t, a, b, s = self._levels()
        x_f, _, cond_f = self._forget_batch()
        x_t, prediction = self._forward(x_f, cond_f, t, a, b, self._forget_noise(x_f))
        frozen = None
        if self.config.forget_target == "painted":
            with torch.no_grad(), self.model.adapter_disabled():
                frozen = self.model.predict(self.denoiser, x_t, t, cond_f).float()
        return (self._lambda(s) * self._forget_error(prediction, x_t, a, b, self._forget_index, frozen)).mean()

    def _remember_loss_distill(self):
        """Match the frozen model's prediction at its own sampling states of other seeds and prompts
        (conditional and unconditional), and at `remember_renoised` fresh noisings of their images,
        in the same space and with weight w·(1 − λ(s))·(1 + k·s).

        The factor (1 + k·s) holds the large-t predictions hardest: there every seed of the prompt
        decides its layout, and a small change shifts the whole flag of seeds the operator never
        flagged, while the target's colours are still free to change at mid and small t."""
        pool = self.sets.remember_states
        index = self._draw(len(pool), self.config.remember_batch_size)
        x_t, t, cond, teacher, _ = pool.take(index, self.model.device)
        if self.config.remember_renoised:  # one forward for both kinds of samples: fewer, larger passes
            more_x_t, more_t, more_cond, more_teacher = self._renoised_remember_samples(self.config.remember_renoised)
            x_t, t, teacher = torch.cat([x_t, more_x_t]), torch.cat([t, more_t.to(t.dtype)]), torch.cat([teacher, more_teacher])
            cond = {key: torch.cat([value, more_cond[key]]) for key, value in cond.items()}
        a, b, s, prediction = self._predict_at(x_t, t, cond)
        error = self._in_loss_space(objectives.per_sample_mse(prediction, teacher), a, b)
        return self._remember_weight * ((1 - self._lambda(s)) * (1 + self.config.remember_large_t_boost * s) * error).mean()

    def _renoised_remember_samples(self, batch: int):
        """Distillation at fresh noisings x_t = a·x0 + b·ε of remember images, at random t: the
        frozen model's prediction there, computed now, is the teacher. (x_t, t, cond, teacher)

        The recorded states are a few hundred fixed points, each seen once or twice in a job: the
        adapter learns to leave *them* alone (belgium-77: its 16 remember seeds kept 14/16 at SSIM
        ≥ 0.9, 16 unseen seeds of the prompt 8/16). Fresh noise at every step covers the
        neighbourhood of the prompt's images instead (docs/QUALITY.md, `no renoised remember`)."""
        t, a, b, _ = self._levels(batch)
        x0, cond = self._remember_batch(batch)
        x_t = objectives.noisy_sample(x0, self._noise_like(x0), a, b)
        with torch.no_grad(), self.model.adapter_disabled(), self._autocast():
            teacher = self.model.predict(self.denoiser, x_t, t, cond).float()
        return x_t, t, cond, teacher

    def _predict_on_pool(self, pool: StatePool, batch: int, rows: torch.Tensor | None = None):
        """A random batch of a state pool (of its `rows` only, if given), its noise levels (a, b
        shaped for broadcasting, s flat) and the model's prediction there: (index, x_t, a, b, s,
        reference, label, prediction)."""
        index = self._draw(len(pool), batch) if rows is None else rows[self._draw(len(rows), batch)]
        x_t, t, cond, reference, label = pool.take(index, self.model.device)
        a, b, s, prediction = self._predict_at(x_t, t, cond)
        return index, x_t, a, b, s, reference, label, prediction

    def _predict_at(self, x_t, t, cond):
        """The noise levels of timesteps t (a, b shaped for broadcasting, s flat) and the model's prediction at x_t."""
        a, b, s = self.model.noise_levels_at(t)
        with self._autocast():
            prediction = self.model.predict(self.denoiser, x_t, t, cond).float()
        return a.view(-1, 1, 1, 1), b.view(-1, 1, 1, 1), s, prediction

    def _remember_loss_denoise(self):
        """The ordinary diffusion loss on remember images (Eq. 8), weighted w·(1 − λ(s)) with the same
        remember weight as distillation (extension and consolidation included), in the space
        diffusers trains each family in (ε/v for SD and DDPM, x0 for SD3) whatever `loss_space` says."""
        t, a, b, s = self._levels(self.config.remember_batch_size)
        error = self._denoise_error(*self._remember_batch(self.config.remember_batch_size), t, a, b)
        return self._remember_weight * ((1 - self._lambda(s)) * self.model.remember_loss_weight(a, b).flatten() * error).mean()
