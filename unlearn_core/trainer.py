"""The unlearning fine-tune (DESIGN §2) and its baselines, on one trainer.

Methods (`UnlearnConfig.method`):
- ours: surrogate forget loss + remember loss, weighted per sample by λ(s) / 1 − λ(s), with
  gradient projection of g_f against g_r when they conflict;
- neggrad: gradient ascent on the ordinary diffusion loss of the target;
- siss: SISS-style importance-sampled mixture (x_t drawn from the remember/forget mixture,
  each term reweighted by its posterior responsibility, forget term subtracted with a superfactor);
- erasediff: EraseDiff-style — the forget target is fresh Gaussian noise, plus the remember loss.

The forget and remember halves are run as two forward/backward passes of half the total batch,
so g_f and g_r come without a second backward over the same graph. Works unchanged under
`accelerate launch` (DDP all-reduces each backward) and on one CPU.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from unlearn_core import objectives
from unlearn_core.config import UnlearnConfig
from unlearn_core.models import DiffusionModel


class TrainingDiverged(RuntimeError):
    """A loss or gradient became NaN/inf; the last good checkpoint is kept."""


class TrainingCancelled(RuntimeError):
    """The operator cancelled the job."""


@dataclass
class StepReport:
    """What the progress callback receives after each step."""

    step: int
    total: int
    loss_forget: float
    loss_remember: float
    cosine: float
    projected: bool
    seconds_per_step: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class FixedSets:
    """Encoded once before training: x0 of targets, surrogates and remember images, and their prompts."""

    target_x0: torch.Tensor
    surrogate_x0: torch.Tensor
    target_cond: dict[str, torch.Tensor]
    remember_x0: torch.Tensor
    remember_cond: dict[str, torch.Tensor]
    target_noise: torch.Tensor | None = None  # each target seed's initial noise, when known


def encode_sets(model: DiffusionModel, targets, surrogates, target_prompts, remember_images, remember_prompts, target_seeds=None) -> FixedSets:
    """Encode images and prompts once (latents via the VAE, text via the text encoder)."""
    from unlearn_core.images import to_tensor

    def cond_for(prompts):
        return model.encode_prompts(prompts) if model.conditional else {}

    with torch.no_grad():
        return FixedSets(
            target_x0=model.encode_images(to_tensor(targets)),
            surrogate_x0=model.encode_images(to_tensor(surrogates)),
            target_cond=cond_for(target_prompts),
            remember_x0=model.encode_images(to_tensor(remember_images)),
            remember_cond=cond_for(remember_prompts),
            target_noise=model.initial_noise(list(target_seeds)) if target_seeds is not None else None,
        )


def _take(cond: dict[str, torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
    return {key: value[index] for key, value in cond.items()}


def _flat(grads: list[torch.Tensor | None], params) -> torch.Tensor:
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def _unflat(vector: torch.Tensor, params) -> list[torch.Tensor]:
    out, offset = [], 0
    for p in params:
        out.append(vector[offset : offset + p.numel()].view_as(p))
        offset += p.numel()
    return out


class UnlearnTrainer:
    """Runs `config.steps` steps on a model that already carries a LoRA (or full weights)."""

    def __init__(
        self,
        model: DiffusionModel,
        config: UnlearnConfig,
        sets: FixedSets,
        run_dir: Path | None = None,
        on_step: Callable[[StepReport], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ):
        from accelerate import Accelerator

        self.model, self.config, self.sets = model, config, sets
        self.run_dir = Path(run_dir) if run_dir else None
        self.on_step = on_step or (lambda report: None)
        self.should_stop = should_stop or (lambda: False)
        self.accelerator = Accelerator(cpu=model.device.type == "cpu")
        if config.full_finetune:
            model.denoiser.requires_grad_(True)
            self.params = [p for p in model.denoiser.parameters()]
        else:
            self.params = [p for p in model.denoiser.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters: call model.add_lora(...) first")
        if config.gradient_checkpointing and hasattr(model.denoiser, "enable_gradient_checkpointing"):
            model.denoiser.enable_gradient_checkpointing()
        model.denoiser.train()
        optimizer = torch.optim.AdamW(self.params, lr=config.learning_rate, weight_decay=0.0)
        self.denoiser, self.optimizer = self.accelerator.prepare(model.denoiser, optimizer)
        rank = self.accelerator.process_index
        self.generator = torch.Generator("cpu").manual_seed(config.seed * 1000 + rank)
        self.step = 0
        self.log: list[dict] = []

    # -- losses --------------------------------------------------------------------------------
    def _autocast(self):
        enabled = self.config.mixed_precision == "bf16"
        return torch.autocast(self.model.device.type, dtype=torch.bfloat16, enabled=enabled)

    def _forward(self, x0, cond, timesteps, a, b, noise):
        x_t = objectives.noisy_sample(x0, noise, a, b)
        with self._autocast():
            prediction = self.model.predict(self.denoiser, x_t, timesteps, cond)
        return x_t, prediction.float()

    def _draw(self, pool_size: int):
        return torch.randint(0, pool_size, (self.config.batch_size,), generator=self.generator)

    def _noise_like(self, x0: torch.Tensor) -> torch.Tensor:
        return torch.randn(x0.shape, generator=self.generator).to(x0.device)

    def _levels(self):
        t, a, b, s = self.model.sample_noise_levels(self.config.batch_size, self.generator)
        shape = (-1, 1, 1, 1)
        return t, a.view(shape), b.view(shape), s

    def _forget_batch(self):
        index = self._draw(self.sets.target_x0.shape[0])
        self._forget_index = index
        return self.sets.target_x0[index], self.sets.surrogate_x0[index], _take(self.sets.target_cond, index)

    def _forget_noise(self, x_f: torch.Tensor) -> torch.Tensor:
        """Random noise, with a share replaced by the target seed's own initial noise.

        Generation from that seed starts at this noise, so training on it ties the change to the
        target's own trajectory instead of every trajectory of the prompt.
        """
        noise = self._noise_like(x_f)
        fraction = self.config.seed_noise_fraction
        if self.sets.target_noise is None or fraction <= 0:
            return noise
        use_seed = (torch.rand(x_f.shape[0], generator=self.generator) < fraction).to(x_f.device).view(-1, 1, 1, 1)
        return torch.where(use_seed, self.sets.target_noise[self._forget_index].to(x_f.device), noise)

    def _remember_batch(self):
        index = self._draw(self.sets.remember_x0.shape[0])
        return self.sets.remember_x0[index], _take(self.sets.remember_cond, index)

    def _gradient(self, loss: torch.Tensor) -> torch.Tensor:
        """Backward one loss (through accelerate, so DDP averages it) and return the flat gradient."""
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"loss became {loss.item()} at step {self.step + 1}; the last good checkpoint is kept")
        self.optimizer.zero_grad(set_to_none=True)
        self.accelerator.backward(loss)
        return _flat([p.grad for p in self.params], self.params)

    def _losses_ours(self):
        """Per-sample λ(s)-weighted surrogate forget loss and remember loss at shared noise levels."""
        config, pt = self.config, self.model.prediction_type
        t, a, b, s = self._levels()
        weight = objectives.forget_weight(s, config.lambda_schedule, config.gamma, config.constant_lambda)
        x_f, x_s, cond_f = self._forget_batch()
        x_t, prediction = self._forward(x_f, cond_f, t, a, b, self._forget_noise(x_f))
        target = objectives.surrogate_target(pt, x_t, x_s, a, b)
        loss_forget = (weight * objectives.per_sample_mse(prediction, target)).mean()
        g_forget = self._gradient(loss_forget)
        x_r, cond_r = self._remember_batch()
        noise = self._noise_like(x_r)
        _, prediction = self._forward(x_r, cond_r, t, a, b, noise)
        loss_remember = ((1 - weight) * objectives.per_sample_mse(prediction, objectives.training_target(pt, x_r, noise, a, b))).mean()
        g_remember = self._gradient(loss_remember)
        return loss_forget, loss_remember, g_forget, g_remember

    def _losses_erasediff(self):
        config, pt = self.config, self.model.prediction_type
        t, a, b, _ = self._levels()
        x_f, _, cond_f = self._forget_batch()
        _, prediction = self._forward(x_f, cond_f, t, a, b, self._noise_like(x_f))
        random_target = self._noise_like(x_f)
        loss_forget = config.erasediff_weight * objectives.per_sample_mse(prediction, random_target).mean()
        g_forget = self._gradient(loss_forget)
        x_r, cond_r = self._remember_batch()
        noise = self._noise_like(x_r)
        _, prediction = self._forward(x_r, cond_r, t, a, b, noise)
        loss_remember = objectives.per_sample_mse(prediction, objectives.training_target(pt, x_r, noise, a, b)).mean()
        return loss_forget, loss_remember, g_forget, self._gradient(loss_remember)

    def _losses_neggrad(self):
        pt = self.model.prediction_type
        t, a, b, _ = self._levels()
        x_f, _, cond_f = self._forget_batch()
        noise = self._noise_like(x_f)
        _, prediction = self._forward(x_f, cond_f, t, a, b, noise)
        loss_forget = objectives.per_sample_mse(prediction, objectives.training_target(pt, x_f, noise, a, b)).mean()
        g_ascent = self._gradient(-loss_forget)
        return loss_forget, torch.tensor(float("nan")), g_ascent, torch.zeros_like(g_ascent)

    def _losses_siss(self):
        """x_t from the remember or forget image (half each); each term reweighted by q(x_t|x)/q_mix(x_t)."""
        config, pt = self.config, self.model.prediction_type
        t, a, b, _ = self._levels()
        x_f, _, cond_f = self._forget_batch()
        x_r, cond_r = self._remember_batch()
        from_forget = (torch.rand(config.batch_size, generator=self.generator) < config.siss_mixture).to(x_f.device)
        pick = from_forget.view(-1, 1, 1, 1)
        x_t = objectives.noisy_sample(torch.where(pick, x_f, x_r), self._noise_like(x_f), a, b)
        # Conditioning of the remember sample: the mixture is over images of the same prompt.
        cond = {key: torch.where(from_forget.view(-1, *[1] * (value.dim() - 1)), cond_f[key], value) for key, value in cond_r.items()}
        log_q_r = -((x_t - a * x_r) ** 2).flatten(1).sum(1) / (2 * b.flatten() ** 2)
        log_q_f = -((x_t - a * x_f) ** 2).flatten(1).sum(1) / (2 * b.flatten() ** 2)
        log_mix = torch.logaddexp(math.log(1 - config.siss_mixture) + log_q_r, math.log(config.siss_mixture) + log_q_f)
        w_r, w_f = (log_q_r - log_mix).exp().clamp(max=1e3).detach(), (log_q_f - log_mix).exp().clamp(max=1e3).detach()
        with self._autocast():
            prediction = self.model.predict(self.denoiser, x_t, t, cond).float()
        loss_remember = (w_r * objectives.per_sample_mse(prediction, objectives.training_target(pt, x_r, (x_t - a * x_r) / b, a, b))).mean()
        loss_forget = (w_f * objectives.per_sample_mse(prediction, objectives.training_target(pt, x_f, (x_t - a * x_f) / b, a, b))).mean()
        gradient = self._gradient(loss_remember - config.siss_superfactor * loss_forget)
        return loss_forget, loss_remember, gradient, torch.zeros_like(gradient)

    # -- the loop ------------------------------------------------------------------------------
    def train_step(self) -> StepReport:
        started = time.perf_counter()
        losses = {"ours": self._losses_ours, "erasediff": self._losses_erasediff, "neggrad": self._losses_neggrad, "siss": self._losses_siss}
        loss_forget, loss_remember, g_forget, g_remember = losses[self.config.method]()
        two_gradients = self.config.method in ("ours", "erasediff")
        cos = objectives.cosine(g_forget, g_remember) if two_gradients else 0.0
        projected = False
        if two_gradients:
            g_forget, g_remember, projected = objectives.project_conflicting(g_forget, g_remember, self.config.projection)
        total = g_forget + g_remember
        if not torch.isfinite(total).all():
            raise TrainingDiverged(f"gradient became NaN/inf at step {self.step + 1}; the last good checkpoint is kept")
        for p, g in zip(self.params, _unflat(total, self.params)):
            p.grad = g.clone()
        if self.config.max_grad_norm > 0:
            self.accelerator.clip_grad_norm_(self.params, self.config.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        report = StepReport(self.step, self.config.steps, float(loss_forget.detach()), float(loss_remember.detach()), cos, projected, time.perf_counter() - started)
        self.log.append(report.to_dict())
        return report

    def train(self) -> list[dict]:
        """Run to `config.steps`, resuming from the run folder's checkpoint if there is one."""
        if self.run_dir:
            self.load_checkpoint()
        while self.step < self.config.steps:
            if self.should_stop():
                if self.run_dir:
                    self.save_checkpoint()
                raise TrainingCancelled(f"cancelled at step {self.step}")
            report = self.train_step()
            if self.run_dir:
                self._append_log(report)
            self.on_step(report)
            every = self.config.checkpoint_every
            if self.run_dir and every and self.step % every == 0 and self.step < self.config.steps:
                self.save_checkpoint()
        self.model.denoiser.eval()
        return self.log

    # -- checkpoints ---------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / "checkpoint.pt"

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        names = {id(p): n for n, p in self.model.denoiser.named_parameters()}
        return {names[id(p)]: p.detach().cpu().clone() for p in self.params}

    def save_checkpoint(self) -> None:
        if not self.accelerator.is_main_process:
            return
        state = {"step": self.step, "weights": self._trainable_state(), "optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state(), "log": self.log, "config": self.config.to_dict()}
        tmp = self.checkpoint_path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.checkpoint_path)

    def load_checkpoint(self) -> bool:
        if not self.checkpoint_path.is_file():
            return False
        state = torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)
        params = dict(self.model.denoiser.named_parameters())
        with torch.no_grad():
            for name, value in state["weights"].items():
                params[name].copy_(value.to(params[name].device))
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.step, self.log = state["step"], state["log"]
        if self.run_dir:
            self._rewrite_log()
        return True

    def _append_log(self, report: StepReport) -> None:
        path = self.run_dir / "loss_log.csv"
        new = not path.exists()
        with open(path, "a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(report.to_dict()))
            if new:
                writer.writeheader()
            writer.writerow(report.to_dict())

    def _rewrite_log(self) -> None:
        path = self.run_dir / "loss_log.csv"
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(StepReport.__dataclass_fields__))
            writer.writeheader()
            writer.writerows(self.log)
        os.replace(tmp, path)


def summarise(log: list[dict]) -> dict:
    """Loss and conflict summary of a finished run."""
    if not log:
        return {}
    return {
        "final_loss_forget": log[-1]["loss_forget"],
        "final_loss_remember": log[-1]["loss_remember"],
        "conflict_rate": sum(r["projected"] for r in log) / len(log),
        "mean_cosine": sum(r["cosine"] for r in log) / len(log),
        "mean_seconds_per_step": sum(r["seconds_per_step"] for r in log) / len(log),
    }


def write_json_atomic(path: Path, data) -> None:
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)
