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

The loop, its shared random draws and its checkpoints live here; ours' losses in `ours_losses`,
the baselines' in `baselines`, and when to stop and how much to remember in `control`, each a mixin
of `UnlearnTrainer` that reads and sets its state.

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
from unlearn_core.control import ControlPolicy
from unlearn_core.ours_losses import OursLosses
from unlearn_core.config import UnlearnConfig, max_training_steps
from unlearn_core.files import write_bytes_atomic
from unlearn_core.models import DiffusionModel
from unlearn_core.runfolder import RunFolder
from unlearn_core.sets import FixedSets, StatePool

PAINTED_BOX_MARGIN = 8  # x0 cells of context around the painted region that the pixel forget loss decodes



class TrainingDiverged(RuntimeError):
    """A loss or gradient became NaN/inf; the last good checkpoint is kept."""


class TrainingCancelled(RuntimeError):
    """The operator cancelled the job."""


class TrainingPaused(RuntimeError):
    """The job stopped at a checkpoint to go on later (the end of a ZeroGPU slot, `gpu_slots`)."""


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


class UnlearnTrainer(OursLosses, ControlPolicy, BaselineLosses):
    """Runs `config.steps` steps on a model that already carries a LoRA (or full weights)."""

    def __init__(
        self,
        model: DiffusionModel,
        config: UnlearnConfig,
        sets: FixedSets,
        folder: RunFolder | str | Path | None = None,
        on_step: Callable[[StepReport], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        should_pause: Callable[[], bool] | None = None,
    ):
        from accelerate import Accelerator

        self.model, self.config, self.sets = model, config, sets
        self.folder = RunFolder(folder) if folder is not None and not isinstance(folder, RunFolder) else folder
        self.on_step = on_step or (lambda report: None)
        self.should_stop = should_stop or (lambda: False)
        self.should_pause = should_pause or (lambda: False)
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
        self.finished = False  # training has ended (a checkpoint saved then resumes straight to what follows)

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
        report = StepReport(self.step, max(max_training_steps(self.config), self.step), float(loss_forget.detach()), float(loss_remember.detach()), cos, projected, time.perf_counter() - started, self.toward_surrogate, self.remember_scale, checked)
        self.log.append(report.to_dict())
        return report

    def train(self) -> list[dict]:
        """Run to `step_budget`, resuming from the run folder's checkpoint if there is one."""
        if self.folder and not self.load_checkpoint() and self.accelerator.is_main_process:
            self._rewrite_log()  # a fresh start: the log of an earlier run in this folder (the same --out twice) is replaced, not continued
        if self.finished:
            self.model.denoiser.eval()
            return self.log
        while self.step < self.step_budget:
            if self._anywhere(self.should_stop()):
                if self.folder:
                    self.save_checkpoint()
                raise TrainingCancelled(f"cancelled at step {self.step}")
            if self.folder and self._anywhere(self.should_pause()):
                self.save_checkpoint()
                raise TrainingPaused(f"paused at step {self.step}")
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
        self.finished = True
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
        state = {"step": self.step, "weights": self._trainable_state(), "optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state(), "log": self.log, "config": self.config.to_dict(), "siss_norm": self._siss_norm, "consolidating_since": self.consolidating_since, "consolidation_floor": self.consolidation_floor, "fixed_weights": self.fixed_weights, "remember_scale": self.remember_scale, "last_neighbour_check": self.last_neighbour_check, "neighbours_settled": self.neighbours_settled, "held": self.held,
                 # the controls' view of the target, as it stood: a resumed job goes on exactly as one never stopped
                 "target_r": self.target_r, "kept_step": self.kept_step, "finished": self.finished,
                 "target_states": self.sets.target_states.to_tensors() if self.sets.target_states is not None else None}
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
        self.target_r, self.kept_step, self.finished = state.get("target_r", self.target_r), state.get("kept_step"), state.get("finished", False)
        if state.get("target_states") is not None:
            self.sets.target_states = StatePool.from_tensors(state["target_states"])
        elif self.config.method == "ours" and self.config.forget_states == "trajectory":  # a checkpoint from before they were saved
            self._refresh_target_states()
        return True

    def _append_log(self, report: StepReport) -> None:
        self.folder.append_loss_row(report.to_dict())

    def _rewrite_log(self) -> None:
        self.folder.rewrite_loss_log(self.log, list(StepReport.__dataclass_fields__))
