"""The unlearning loop: one step draws the method's two gradients, combines them, and steps
AdamW; a stop rule may end training early; checkpoints save every stateful part.

Methods (`UnlearnConfig.method`, `training.methods`): ours (surrogate forget loss + remember loss,
weighted λ(s) / 1 − λ(s), g_f projected against g_r when they conflict), NegGrad, SISS and
EraseDiff. Forget and remember are two forward/backward passes, so g_f and g_r come without a
second backward over one graph. Works under `accelerate launch` (DDP all-reduces each backward)
and on one CPU.
"""

from __future__ import annotations

import io
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from unlearn_core import objectives
from unlearn_core.config import UnlearnConfig
from unlearn_core.files import write_bytes_atomic
from unlearn_core.models import DiffusionModel
from unlearn_core.runfolder import RunFolder
from unlearn_core.sets import FixedSets
from unlearn_core.training.control import StopWhenFixed
from unlearn_core.training.draws import SharedDraws, StepContext
from unlearn_core.training.methods import make_method


class TrainingDiverged(RuntimeError):
    """A loss or gradient became NaN/inf; the last good checkpoint is kept."""


class TrainingCancelled(RuntimeError):
    """The operator cancelled the job."""


@dataclass
class StepReport:
    """What the progress callback receives after each step."""

    step: int
    total: int  # the most steps this run takes (`steps`); a stop rule may end it sooner
    loss_forget: float
    loss_remember: float
    cosine: float
    projected: bool
    seconds_per_step: float
    toward_surrogate: float | None = None  # r of the target seeds' outputs, as last re-recorded

    def to_dict(self) -> dict:
        return asdict(self)


def _flat(grads: list[torch.Tensor | None], params) -> torch.Tensor:
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def _unflat(vector: torch.Tensor, params) -> list[torch.Tensor]:
    out, offset = [], 0
    for p in params:
        out.append(vector[offset : offset + p.numel()].view_as(p))
        offset += p.numel()
    return out


class UnlearnTrainer:
    """Runs up to `config.steps` steps on a model that already carries a LoRA (or full weights)."""

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
        # Mixed precision is the config's bf16 autocast, whatever an accelerate config says: fp16's
        # GradScaler skips overflowing steps, which the NaN check would take for divergence.
        self.accelerator = Accelerator(cpu=model.device.type == "cpu", mixed_precision="no")
        if config.full_finetune:
            model.denoiser.requires_grad_(True)
        self.params = [p for p in model.denoiser.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters: call model.add_lora(...) first")
        if config.gradient_checkpointing and hasattr(model.denoiser, "enable_gradient_checkpointing"):
            model.denoiser.enable_gradient_checkpointing()
        model.denoiser.train()
        optimizer = torch.optim.AdamW(self.params, lr=config.learning_rate, weight_decay=0.0)
        self.denoiser, self.optimizer = self.accelerator.prepare(model.denoiser, optimizer)
        self.draws = SharedDraws(config.seed, self.accelerator.num_processes, self.accelerator.process_index)
        self.context = StepContext(model, self.denoiser, sets, self.draws, self._gradient, config.mixed_precision == "bf16")
        trajectory = config.method == "ours" and config.forget_states == "trajectory"
        self.stop_rule = StopWhenFixed(config.trajectory_refresh, config.stop_at_r, config.generation_steps, config.guidance_scale) if trajectory else None
        self.method = make_method(config, self.context, self._rows_to_forget)
        missing = self.method.missing(self.context)
        if missing:
            raise ValueError(f"these settings need {missing}, which the prepared sets lack: prepare them with run.prepare_sets")
        self.step = 0
        self.log: list[dict] = []

    def _rows_to_forget(self):
        return self.stop_rule.rows_to_forget(self.context) if self.stop_rule else None

    @property
    def toward_surrogate(self) -> float | None:
        """The least target r at the last re-recording (None when not measured)."""
        return self.stop_rule.r if self.stop_rule else None

    def _anywhere(self, flag: bool) -> bool:
        """True if the flag is set in any process: cancelling, a NaN and the early stop end every
        process at the same step (one leaving alone would leave the others waiting in all-reduce)."""
        if self.accelerator.num_processes == 1:
            return flag
        return bool(self.accelerator.reduce(torch.tensor([float(flag)], device=self.accelerator.device), reduction="sum").item() > 0)

    def _gradient(self, loss: torch.Tensor, retain_graph: bool = False) -> torch.Tensor:
        """Backward one loss (through accelerate, so DDP averages it) and return the flat gradient."""
        if self._anywhere(not torch.isfinite(loss)):
            raise TrainingDiverged(f"loss became {loss.item()} at step {self.step + 1}; the last good checkpoint is kept")
        self.optimizer.zero_grad(set_to_none=True)
        self.accelerator.backward(loss, retain_graph=retain_graph)
        return _flat([p.grad for p in self.params], self.params)

    # -- the loop ------------------------------------------------------------------------------
    def train_step(self) -> StepReport:
        started = time.perf_counter()
        loss_forget, loss_remember, g_forget, g_remember = self.method.gradients(self.context)
        cosine = objectives.cosine(g_forget, g_remember)
        total, projected = self.method.combine(g_forget, g_remember)
        if not torch.isfinite(total).all():
            raise TrainingDiverged(f"gradient became NaN/inf at step {self.step + 1}; the last good checkpoint is kept")
        for p, g in zip(self.params, _unflat(total, self.params)):
            p.grad = g.clone()
        if self.config.max_grad_norm > 0:
            self.accelerator.clip_grad_norm_(self.params, self.config.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.stop_rule:
            self.stop_rule.on_step_end(self.step, self.context)
        report = StepReport(self.step, self.config.steps, float(loss_forget.detach()), float(loss_remember.detach()), cosine, projected, time.perf_counter() - started, self.toward_surrogate)
        self.log.append(report.to_dict())
        return report

    def train(self) -> list[dict]:
        """Run to `config.steps` or the stop rule, resuming from the run folder's checkpoint if there is one."""
        if self.folder and not self.load_checkpoint() and self.accelerator.is_main_process:
            self._rewrite_log()  # a fresh start: the log of an earlier run in this folder (the same --out twice) is replaced
        while self.step < self.config.steps:
            if self._anywhere(self.should_stop()):
                if self.folder:
                    self.save_checkpoint()
                raise TrainingCancelled(f"cancelled at step {self.step}")
            report = self.train_step()
            if self.accelerator.is_main_process:  # one writer of the log and the status, however many processes train
                if self.folder:
                    self.folder.append_loss_row(report.to_dict())
                self.on_step(report)
            if self.stop_rule and self._anywhere(self.stop_rule.should_stop()):
                break
            every = self.config.checkpoint_every
            if self.folder and every and self.step % every == 0 and self.step < self.config.steps:
                self.save_checkpoint()
        self.model.denoiser.eval()
        return self.log

    # -- checkpoints: the weights, the optimizer and every stateful part's state_dict -------------
    @property
    def checkpoint_path(self) -> Path:
        return self.folder.checkpoint

    def _stateful(self) -> dict:
        parts = {"draws": self.draws, "method": self.method}
        return {**parts, "stop_rule": self.stop_rule} if self.stop_rule else parts

    def _trainable_names(self) -> list[str]:
        names = {id(p): n for n, p in self.model.denoiser.named_parameters()}
        return [names[id(p)] for p in self.params]

    def save_checkpoint(self) -> None:
        if not self.accelerator.is_main_process:
            return
        weights = {name: p.detach().cpu().clone() for name, p in zip(self._trainable_names(), self.params)}
        parts = {name: part.state_dict() for name, part in self._stateful().items()}
        state = {"step": self.step, "log": self.log, "config": self.config.to_dict(), "weights": weights, "optimizer": self.optimizer.state_dict(), "parts": parts}
        buffer = io.BytesIO()
        torch.save(state, buffer)
        write_bytes_atomic(self.checkpoint_path, buffer.getvalue())

    def load_checkpoint(self) -> bool:
        if not self.checkpoint_path.is_file():
            return False
        state = torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)
        if "parts" not in state or set(state["weights"]) != set(self._trainable_names()):
            self.checkpoint_path.unlink()  # written by another version (or LoRA layout): training starts over
            return False
        params = dict(self.model.denoiser.named_parameters())
        with torch.no_grad():
            for name, value in state["weights"].items():
                params[name].copy_(value.to(params[name].device))
        self.optimizer.load_state_dict(state["optimizer"])
        for name, part in self._stateful().items():
            part.load_state_dict(state["parts"].get(name, {}))
        self.step, self.log = state["step"], state["log"]
        if self.folder and self.accelerator.is_main_process:
            self._rewrite_log()
        if self.stop_rule and self.stop_rule.every:
            self.stop_rule.refresh(self.context)  # the states the resumed adapter visits, and its r
        return True

    def _rewrite_log(self) -> None:
        self.folder.rewrite_loss_log(self.log, list(StepReport.__dataclass_fields__))
