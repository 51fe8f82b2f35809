"""The unlearning fine-tune and its baselines, on one trainer.

Methods (`UnlearnConfig.method`):
- ours: surrogate forget loss + remember loss, weighted per sample by λ(s) / 1 − λ(s), with
  gradient projection of g_f against g_r when they conflict. By default (each part an option,
  each measured in docs/QUALITY.md):
  * forgetting at the target seed's own guided sampling states, re-recorded every few steps,
    with x̂0 aimed at the surrogate on the painted pixels and at the frozen model elsewhere;
  * remembering by distillation: the frozen model's predictions at its sampling states of other
    seeds of the target prompt and of the empty prompt, and at fresh noisings of those seeds'
    final images;
  * both losses stated on the clean image x̂0 they imply, so λ(s) (not SNR(t)) decides where
    along t each acts; the forget loss on x̂0 decoded to pixels (a latent model's VAE decoder),
    where the operator painted;
  * training stops once the target seed's output has moved `stop_at_r` toward the surrogate, and
    goes on past `steps` (up to `extend_until_fixed` more, the remember loss weighted
    `extend_remember_factor` meanwhile) while it is not yet fixed;
  * once it is fixed, `consolidate_steps` more steps with a heavier remember loss pull back the
    other seeds the fix spilled onto, keeping the last weights that still fix the target.
  * while r climbs slowly, the target's nearest remember seeds are re-sampled now and then
    (`neighbour_checks`): untouched, the remember loss is lightened; leaving, it is restored.
- neggrad: gradient ascent on the target's diffusion loss plus descent on the remember loss;
- siss: SISS's importance-sampled mixture, deletion gradient rescaled to a fixed norm;
- erasediff: EraseDiff's uniform-noise forget target, step g_r + λ·g_f.

Forget and remember terms are two forward/backward passes, so g_f and g_r come without a second
backward over the same graph. Works under `accelerate launch` (DDP all-reduces each backward)
and on one CPU.
"""

from __future__ import annotations

import functools
import io
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from unlearn_core import objectives
from unlearn_core.baselines import BaselineLosses
from unlearn_core.config import UnlearnConfig
from unlearn_core.files import write_bytes_atomic
from unlearn_core.models import DiffusionModel
from unlearn_core.runfolder import RunFolder
from unlearn_core.sets import FixedSets, StatePool, record_target_states

PAINTED_BOX_MARGIN = 8  # x0 cells of context around the painted region that the pixel forget loss decodes
# How far below the r at which the target was fixed consolidation may let it fall. A correction's
# r falls under the heavier remember loss (chad, italy: 0.81 → 0.70 in 15 steps) while its other
# seeds were already kept; an edit against the concept (the crosses) holds its r and gets its
# other seeds back (docs/QUALITY.md). The first refresh below ends consolidation.
CONSOLIDATION_R_SLACK = 0.05
# `neighbour_checks`: the target climbs slowly when r gains less than NEIGHBOUR_CHECK_CLIMB over
# NEIGHBOUR_CHECK_EVERY steps; its nearest remember seeds then decide the remember weight's scale.
# A slow climb is the remember loss holding the target (netherlands-62: r 0.5–0.65 from step 25 to
# 90), which only costs something if the seeds it holds are near leaving: netherlands-62's nearest
# seeds kept SSIM ≥ 0.96 there, belgium-77's had fallen to 0.85 (docs/QUALITY.md).
NEIGHBOUR_CHECK_EVERY = 10
NEIGHBOUR_CHECK_CLIMB = 0.05
NEIGHBOURS_KEPT_SSIM = 0.95  # every checked seed at or above: the remember weight is halved
NEIGHBOURS_LOST_SSIM = 0.9  # one below: it is doubled back, up to the configured weight
MIN_REMEMBER_SCALE = 0.125


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
    toward_surrogate: float | None = None  # r of the target seed's output, as last re-recorded
    remember_scale: float = 1.0  # the share of remember_weight in use (`neighbour_checks`)
    neighbours_ssim: float | None = None  # the least SSIM of the target's nearest seeds, when checked at this step

    def to_dict(self) -> dict:
        return asdict(self)


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


class UnlearnTrainer(BaselineLosses):
    """Runs `config.steps` steps on a model that already carries a LoRA (or full weights)."""

    def __init__(
        self,
        model: DiffusionModel,
        config: UnlearnConfig,
        sets: FixedSets,
        folder: RunFolder | str | Path | None = None,
        on_step: Callable[[StepReport], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ):
        from accelerate import Accelerator

        self.model, self.config, self.sets = model, config, sets
        self.folder = RunFolder(folder) if folder is not None and not isinstance(folder, RunFolder) else folder
        self.on_step = on_step or (lambda report: None)
        self.should_stop = should_stop or (lambda: False)
        # Mixed precision is the config's bf16 autocast (`_autocast`), whatever an accelerate config
        # says: fp16's GradScaler skips overflowing steps, which the NaN check would take for
        # divergence. "no" here, always, because accelerate fixes it for the life of the process.
        self.accelerator = Accelerator(cpu=model.device.type == "cpu", mixed_precision="no")
        if config.full_finetune:
            model.denoiser.requires_grad_(True)
            self.params = [p for p in model.denoiser.parameters()]
        else:
            self.params = [p for p in model.denoiser.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters: call model.add_lora(...) first")
        missing = self._missing_sets()
        if missing:
            raise ValueError(f"these settings need {missing}, which the prepared sets lack: prepare them with run.prepare_sets")
        if config.gradient_checkpointing and hasattr(model.denoiser, "enable_gradient_checkpointing"):
            model.denoiser.enable_gradient_checkpointing()
        model.denoiser.train()
        optimizer = torch.optim.AdamW(self.params, lr=config.learning_rate, weight_decay=0.0)
        self.denoiser, self.optimizer = self.accelerator.prepare(model.denoiser, optimizer)
        # One generator, the same in every process: each draws the global batch and keeps its share
        # (`_shared_draw`), so N processes train exactly as one process with an N× batch would.
        self.generator = torch.Generator("cpu").manual_seed(config.seed * 1000)
        self.step = 0
        self.log: list[dict] = []
        self.target_r: list[float | None] = []  # each target's r at the last refresh
        self.consolidating_since: int | None = None  # the step at which the target was fixed and consolidation began
        self.fixed_weights: dict | None = None  # {"step", "target_r", "weights"} of the last refresh, while consolidating, that held the fix
        self.consolidation_floor: float | None = None  # the r those weights must keep
        self.kept_step: int | None = None  # set when the saved weights are those of an earlier step than the last
        self._siss_norm: float | None = None
        self.remember_scale = 1.0  # `neighbour_checks` halves or doubles it
        self.last_neighbour_check = 0
        self.neighbours_settled = False  # a check at the full weight found the neighbours already leaving: no more checks
        self.held: bool | None = None  # decided at the first refresh past `steps` (`_note_held`)

    def _missing_sets(self) -> str:
        config, sets = self.config, self.sets
        if config.method != "ours":
            return "remember images" if sets.remember_x0 is None else ""
        needs = {
            "the target seeds' sampling states": config.forget_states == "trajectory" and sets.target_states is None,
            "the painted mask": config.forget_target == "painted" and (sets.paint_mask is None or sets.paint_mask_pixels is None),
            "remember sampling states": config.remember_loss == "distill" and sets.remember_states is None,
            "remember images": (config.remember_loss == "denoise" or config.renoised_seed_count > 0) and sets.remember_x0 is None,
        }
        return ", ".join(name for name, lacking in needs.items() if lacking)

    # -- losses --------------------------------------------------------------------------------
    def _autocast(self):
        enabled = self.config.mixed_precision == "bf16"
        return torch.autocast(self.model.device.type, dtype=torch.bfloat16, enabled=enabled)

    def _shared_draw(self, draw: Callable[[int], torch.Tensor | tuple], batch: int):
        """`draw(n)` for the global batch (batch × processes) from the shared generator, cut to this
        process's rows (a tuple of tensors is cut alike). With one process: `draw(batch)`."""
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        drawn = draw(batch * world)
        rows = slice(rank * batch, (rank + 1) * batch)
        return tuple(part[rows] for part in drawn) if isinstance(drawn, tuple) else drawn[rows]

    def _anywhere(self, flag: bool) -> bool:
        """True if the flag is set in any process: cancelling, a NaN and the early stop end every
        process at the same step (one leaving alone would leave the others waiting in all-reduce)."""
        if self.accelerator.num_processes == 1:
            return flag
        return bool(self.accelerator.reduce(torch.tensor([float(flag)], device=self.accelerator.device), reduction="sum").item() > 0)

    def _forward(self, x0, cond, timesteps, a, b, noise):
        x_t = objectives.noisy_sample(x0, noise, a, b)
        with self._autocast():
            prediction = self.model.predict(self.denoiser, x_t, timesteps, cond)
        return x_t, prediction.float()

    def _draw(self, pool_size: int, batch: int | None = None):
        return self._shared_draw(lambda n: torch.randint(0, pool_size, (n,), generator=self.generator), batch or self.config.batch_size)

    def _noise_like(self, x0: torch.Tensor) -> torch.Tensor:
        return self._shared_draw(lambda n: torch.randn((n, *x0.shape[1:]), generator=self.generator), x0.shape[0]).to(x0.device)

    def _levels(self, batch: int | None = None):
        t, a, b, s = self._shared_draw(lambda n: self.model.sample_noise_levels(n, self.generator), batch or self.config.batch_size)
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
        use_seed = (self._shared_draw(lambda n: torch.rand(n, generator=self.generator), x_f.shape[0]) < fraction).to(x_f.device).view(-1, 1, 1, 1)
        return torch.where(use_seed, self.sets.target_noise[self._forget_index].to(x_f.device), noise)

    def _remember_batch(self, batch: int | None = None):
        index = self._draw(self.sets.remember_x0.shape[0], batch)
        return self.sets.remember_x0[index], _take(self.sets.remember_cond, index)

    def _gradient(self, loss: torch.Tensor, retain_graph: bool = False) -> torch.Tensor:
        """Backward one loss (through accelerate, so DDP averages it) and return the flat gradient."""
        if self._anywhere(not torch.isfinite(loss)):
            raise TrainingDiverged(f"loss became {loss.item()} at step {self.step + 1}; the last good checkpoint is kept")
        self.optimizer.zero_grad(set_to_none=True)
        self.accelerator.backward(loss, retain_graph=retain_graph)
        return _flat([p.grad for p in self.params], self.params)

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

    @functools.cached_property
    def painted_box(self) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
        """Index of x0 cells and of image pixels to decode: the painted cells of every target,
        widened by PAINTED_BOX_MARGIN cells (the decoder's context), or everything when forgetting
        aims at the whole surrogate. The masks are fixed, so it is found once."""
        everything = (slice(None),) * 4
        if self.config.forget_target != "painted":
            return everything, everything
        rows, columns = torch.nonzero(self.sets.paint_mask.amax(dim=(0, 1)), as_tuple=True)
        if rows.numel() == 0:
            return everything, everything
        height, width = self.sets.paint_mask.shape[-2:]
        top, left = max(int(rows.min()) - PAINTED_BOX_MARGIN, 0), max(int(columns.min()) - PAINTED_BOX_MARGIN, 0)
        bottom, right = min(int(rows.max()) + 1 + PAINTED_BOX_MARGIN, height), min(int(columns.max()) + 1 + PAINTED_BOX_MARGIN, width)
        scale = self.model.pixels_per_x0_cell
        cells = (slice(None), slice(None), slice(top, bottom), slice(left, right))
        pixels = (slice(None), slice(None), slice(top * scale, bottom * scale), slice(left * scale, right * scale))
        return cells, pixels

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

    def _unfixed_target_rows(self) -> torch.Tensor | None:
        """Rows of the target pool whose target is not yet fixed, when some targets are fixed and
        others not: a job with several targets spends its forget batch on the ones still short of
        `stop_at_r` (it stops only once all are fixed). A target that slips back is drawn again.
        None: every row."""
        moved = self.target_r
        if self.config.stop_at_r <= 0 or not moved or len(moved) < 2:
            return None
        unfixed = [index for index, r in enumerate(moved) if r is None or r < self.config.stop_at_r]
        if not unfixed or len(unfixed) == len(moved):
            return None
        return torch.nonzero(torch.isin(self.sets.target_states.label, torch.tensor(unfixed)), as_tuple=True)[0]

    def _refresh_target_states(self) -> None:
        """Re-record the targets' trajectories with the adapter as trained so far: the states the
        model now visits from the target seeds are the ones that decide the output. The recorded
        outputs give r, how far each target has moved toward its surrogate (the least is kept)."""
        from unlearn_core.metrics import toward_surrogate

        self.denoiser.eval()
        config = self.config
        self.sets.target_states = record_target_states(self.model, self.sets.targets, config.generation_steps, config.guidance_scale)
        self.denoiser.train()
        if self.sets.pictures:
            self.target_r = [toward_surrogate(image, target, surrogate).r for image, (target, surrogate) in zip(self.sets.target_states.images, self.sets.pictures)]

    def _climbing_slowly(self) -> bool:
        """Whether to check the neighbours now: checks are on, the target is short of stop_at_r and
        not being consolidated, r gained less than NEIGHBOUR_CHECK_CLIMB over the last
        NEIGHBOUR_CHECK_EVERY steps, and the last check was at least that long ago."""
        config, r = self.config, self.toward_surrogate
        earlier = self._r_at(self.step - NEIGHBOUR_CHECK_EVERY)
        if not (config.neighbour_checks and self.sets.neighbours and config.stop_at_r > 0) or self.consolidating_since is not None:
            return False
        if r is None or earlier is None or r >= config.stop_at_r or self.step - self.last_neighbour_check < NEIGHBOUR_CHECK_EVERY or self.neighbours_settled:
            return False
        return r - earlier < NEIGHBOUR_CHECK_CLIMB

    def _r_at(self, step: int) -> float | None:
        """The least target r as it stood at `step` (the log's row of it; None before step 1 or before a refresh)."""
        return self.log[step - 1]["toward_surrogate"] if 1 <= step <= len(self.log) else None

    def _neighbours_least_ssim(self) -> float:
        """Sample the target's nearest remember seeds with the adapter as trained so far; the least
        SSIM of one to its frozen image."""
        from unlearn_core import metrics

        neighbours, worst = self.sets.neighbours, 1.0
        self.denoiser.eval()
        for prompt in dict.fromkeys(prompt for prompt, _, _ in neighbours):
            seeds, frozen = [seed for p, seed, _ in neighbours if p == prompt], [image for p, _, image in neighbours if p == prompt]
            after = [image for image, _ in self.model.generate(prompt, seeds, self.config.generation_steps, self.config.guidance_scale)]
            worst = min(worst, min(metrics.ssim(frozen, after).per_pair))
        self.denoiser.train()
        return worst

    def _check_neighbours(self) -> float | None:
        """While the target climbs slowly: halve the remember weight if its nearest seeds all keep
        SSIM ≥ NEIGHBOURS_KEPT_SSIM (the slow climb buys nothing), double it back if one fell under
        NEIGHBOURS_LOST_SSIM. The least SSIM, or None when not checked at this step."""
        if not self._climbing_slowly():
            return None
        self.last_neighbour_check = self.step
        worst = self._neighbours_least_ssim()
        scale = self.remember_scale
        if worst >= NEIGHBOURS_KEPT_SSIM:
            self.remember_scale = max(scale / 2, MIN_REMEMBER_SCALE)
        else:
            if worst < NEIGHBOURS_LOST_SSIM:
                self.remember_scale = min(scale * 2, 1.0)
            self.neighbours_settled = scale == 1.0
        return worst

    @property
    def toward_surrogate(self) -> float | None:
        """The least r of the targets at the last refresh (None before one)."""
        return min((r for r in self.target_r if r is not None), default=None)

    def _measures_r_while_training(self) -> bool:
        """Whether this run re-records the targets' trajectories (and so measures r while training)."""
        return self.config.method == "ours" and self.config.forget_states == "trajectory" and self.config.trajectory_refresh > 0

    def _trajectory_due(self) -> bool:
        return self._measures_r_while_training() and self.step % self.config.trajectory_refresh == 0

    def _fixed(self) -> bool:
        """Early stop: the target seeds' outputs have reached `stop_at_r` (checked at each refresh)."""
        return self.config.stop_at_r > 0 and self.toward_surrogate is not None and self.toward_surrogate >= self.config.stop_at_r

    @property
    def _fixed_floor(self) -> float:
        """The verdict 'fixed', or stop_at_r if set lower."""
        from unlearn_core.metrics import FIXED_AT

        return min(self.config.stop_at_r, FIXED_AT)

    def _forgetting_done(self) -> bool:
        """Where training used to end with the target fixed: r ≥ stop_at_r, or r ≥ the verdict
        'fixed' at or past `steps` (an extension that got there, or a target fixed but short of
        stop_at_r at `steps`)."""
        r = self.toward_surrogate
        return self._fixed() or (self.config.stop_at_r > 0 and r is not None and self.step >= self._planned_steps and r >= self._fixed_floor)

    @property
    def _planned_steps(self) -> int:
        """`steps`, or `steps_when_held` for a target the remember loss holds (`_note_held`)."""
        return max(self.config.steps, self.config.steps_when_held) if self.held else self.config.steps

    def _note_held(self) -> None:
        """At the first refresh at or past `steps`: the target is held if it is not yet fixed there
        and the neighbour checks found its nearest seeds leaving under the full remember weight.
        Such a target crosses r 0.7 slowly while the remember loss pulls its neighbours back, and
        stopping it the moment it crosses leaves them half pulled (belgium-77, training seed 1:
        11/16 same-prompt seeds kept when stopped at step 80 as it reached r 0.70, 14/16 at step 95,
        r 0.73; docs/QUALITY.md), so it trains to `steps_when_held` before a fix ends the job."""
        from unlearn_core.metrics import FIXED_AT

        if self.held is None and self.step >= self.config.steps and self.consolidating_since is None:
            self.held = self.neighbours_settled and self.toward_surrogate is not None and self.toward_surrogate < FIXED_AT

    def _consolidates(self) -> bool:
        return self._measures_r_while_training() and self.config.consolidate_steps > 0

    def _begin_consolidation(self) -> bool:
        """The target is fixed: from the next step on, the heavier remember loss (`_remember_weight`)
        for `consolidate_steps` steps (`step_budget`), or until r falls more than
        CONSOLIDATION_R_SLACK below where it stands now. These weights are the first kept, measured
        now if the last refresh was before this step. False, and no consolidation, when r has less
        than CONSOLIDATION_R_SLACK to spare above `_fixed_floor`: such a fix has no r to trade
        (belgium-77 kept one seed fewer for it, docs/QUALITY.md), and its job ends sooner."""
        if not self._trajectory_due():
            self._refresh_target_states()
        r = self.toward_surrogate
        if r is None or r - CONSOLIDATION_R_SLACK < self._fixed_floor:
            return False
        self.consolidating_since = self.step
        self.consolidation_floor = r - CONSOLIDATION_R_SLACK
        self._keep_if_holding()
        return True

    def _keep_if_holding(self) -> bool:
        """While consolidating, at each refresh: remember these weights if the fix holds (r at or
        above the floor); False if it does not."""
        if self.toward_surrogate is None or self.toward_surrogate < self.consolidation_floor:
            return False
        self.fixed_weights = {"step": self.step, "target_r": list(self.target_r), "weights": self._trainable_state()}
        return True

    def _end_consolidation(self) -> None:
        """Measure the last weights (re-recording the target if this step did not) and, if the
        heavier remember loss has pulled the target under the floor, restore the last weights that
        held it. Every process holds the same weights and r, so all restore alike."""
        if not self._trajectory_due():
            self._refresh_target_states()
            self._keep_if_holding()
        kept = self.fixed_weights
        if kept is None or kept["step"] == self.step:
            return
        self._load_trainable_state(kept["weights"])
        self.target_r, self.kept_step = kept["target_r"], kept["step"]

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

    @property
    def _remember_weight(self) -> float:
        """remember_weight times the scale the neighbour checks set (`_check_neighbours`); times
        consolidate_remember_factor while consolidating; times extend_remember_factor once training
        runs past `steps` (unless the checks found the target's neighbours leaving), which it
        does only while a target is not yet fixed (`step_budget`): netherlands-62 (in the quality
        suite), -75 (held back) and -81 (scratch) settle near r 0.65–0.7 under the full weight and
        take 140–170 steps to reach 'fixed'; at half the weight they are fixed by step 100–135,
        keeping every other seed (docs/QUALITY.md)."""
        config = self.config
        weight = config.remember_weight * self.remember_scale
        if self.consolidating_since is not None:
            return weight * config.consolidate_remember_factor
        lighter = self.step >= config.steps and not self.neighbours_settled
        return weight * (config.extend_remember_factor if lighter else 1.0)

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

    def _denoise_error(self, x0, cond, t, a, b) -> torch.Tensor:
        """Per-sample ordinary diffusion loss (squared error to T(x0, ε)) at the given noise levels."""
        noise = self._noise_like(x0)
        _, prediction = self._forward(x0, cond, t, a, b, noise)
        return objectives.per_sample_mse(prediction, objectives.training_target(self.model.prediction_type, x0, noise, a, b))

    # -- the loop ------------------------------------------------------------------------------
    def train_step(self) -> StepReport:
        started = time.perf_counter()
        losses = {"ours": self._losses_ours, "erasediff": self._losses_erasediff, "neggrad": self._losses_neggrad, "siss": self._losses_siss}
        loss_forget, loss_remember, g_forget, g_remember = losses[self.config.method]()
        cos = objectives.cosine(g_forget, g_remember)
        projected = False
        if self.config.method == "ours":  # the baselines combine their gradients as published, unprojected
            g_remember = objectives.without_rounding_noise(g_remember, g_forget)
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
        checked = None
        if self._trajectory_due():
            self._refresh_target_states()
            checked = self._check_neighbours()
            self._note_held()
        report = StepReport(self.step, max(self.step_budget, self.step), float(loss_forget.detach()), float(loss_remember.detach()), cos, projected, time.perf_counter() - started, self.toward_surrogate, self.remember_scale, checked)
        self.log.append(report.to_dict())
        return report

    @property
    def step_budget(self) -> int:
        """`config.steps` (`steps_when_held` for a target `_note_held` found held), or up to
        `extend_until_fixed` more once there while a target is still
        short of the verdict 'fixed' (r < FIXED_AT at the last refresh): the operator came for
        the fix, and a slow correction is often on its way (held-back netherlands-75: r 0.57 at
        step 90, fixed at step 130, the remember weight halved meanwhile: `_remember_weight`). A
        target already fixed but short of `stop_at_r` stops at `steps`, so the other seeds pay no
        more for it, and so does a run with stop_at_r 0. Once the target is fixed, the
        `consolidate_steps` after that step."""
        from unlearn_core.metrics import FIXED_AT

        config = self.config
        if self.consolidating_since is not None:
            return self.consolidating_since + config.consolidate_steps
        measured = self._measures_r_while_training() and config.stop_at_r > 0  # stop_at_r 0 asks for exactly `steps`
        short = measured and self.toward_surrogate is not None and self.toward_surrogate < FIXED_AT
        return config.steps + config.extend_until_fixed if self.step >= config.steps and short else self._planned_steps

    def train(self) -> list[dict]:
        """Run to `step_budget`, resuming from the run folder's checkpoint if there is one."""
        if self.folder and not self.load_checkpoint() and self.accelerator.is_main_process:
            self._rewrite_log()  # a fresh start: the log of an earlier run in this folder (the same --out twice) is replaced, not continued
        while self.step < self.step_budget:
            if self._anywhere(self.should_stop()):
                if self.folder:
                    self.save_checkpoint()
                raise TrainingCancelled(f"cancelled at step {self.step}")
            report = self.train_step()
            if self.accelerator.is_main_process:  # one writer of the log and the status, however many processes train
                if self.folder:
                    self._append_log(report)
                self.on_step(report)
            if self.consolidating_since is None and self._anywhere(self._forgetting_done()):
                if not (self._consolidates() and self._begin_consolidation()):
                    break
            elif self.consolidating_since is not None and self._trajectory_due() and self._anywhere(not self._keep_if_holding()):
                break
            every = self.config.checkpoint_every
            if self.folder and every and self.step % every == 0 and self.step < self.step_budget:
                self.save_checkpoint()
        if self.consolidating_since is not None:
            self._end_consolidation()
        self.model.denoiser.eval()
        return self.log

    # -- checkpoints ---------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.folder.checkpoint

    def _trainable_names(self) -> list[str]:
        names = {id(p): n for n, p in self.model.denoiser.named_parameters()}
        return [names[id(p)] for p in self.params]

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().cpu().clone() for name, p in zip(self._trainable_names(), self.params)}

    def _load_trainable_state(self, weights: dict[str, torch.Tensor]) -> None:
        params = dict(self.model.denoiser.named_parameters())
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value.to(params[name].device))

    def save_checkpoint(self) -> None:
        if not self.accelerator.is_main_process:
            return
        state = {"step": self.step, "weights": self._trainable_state(), "optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state(), "log": self.log, "config": self.config.to_dict(), "siss_norm": self._siss_norm, "consolidating_since": self.consolidating_since, "consolidation_floor": self.consolidation_floor, "fixed_weights": self.fixed_weights, "remember_scale": self.remember_scale, "last_neighbour_check": self.last_neighbour_check, "neighbours_settled": self.neighbours_settled, "held": self.held}
        buffer = io.BytesIO()
        torch.save(state, buffer)
        write_bytes_atomic(self.checkpoint_path, buffer.getvalue())

    def load_checkpoint(self) -> bool:
        if not self.checkpoint_path.is_file():
            return False
        state = torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)
        if set(state["weights"]) != set(self._trainable_names()):
            self.checkpoint_path.unlink()  # written by another version's LoRA layout: training starts over
            return False
        self._load_trainable_state(state["weights"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.step, self.log, self._siss_norm = state["step"], state["log"], state.get("siss_norm")
        self.consolidating_since, self.fixed_weights = state.get("consolidating_since"), state.get("fixed_weights")
        self.consolidation_floor = state.get("consolidation_floor")
        self.remember_scale = state.get("remember_scale", 1.0)
        self.last_neighbour_check, self.neighbours_settled = state.get("last_neighbour_check", 0), state.get("neighbours_settled", False)
        self.held = state.get("held")
        if self.folder and self.accelerator.is_main_process:
            self._rewrite_log()
        if self.config.method == "ours" and self.config.forget_states == "trajectory":
            self._refresh_target_states()
        return True

    def _append_log(self, report: StepReport) -> None:
        self.folder.append_loss_row(report.to_dict())

    def _rewrite_log(self) -> None:
        self.folder.rewrite_loss_log(self.log, list(StepReport.__dataclass_fields__))
