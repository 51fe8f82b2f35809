"""The run folder: the one place that names a run's files and writes them atomically.

A run folder is the only link between the web server and the job process, and the output of the
CLI's `unlearn` verb:

    config.json        the request: model, targets, UnlearnConfig (written once, before the run)
    inputs/            uploaded target and surrogate images (a job's, before it runs)
    status.json        state, phase, step/total (written by the run's own process only)
    CANCEL             present when the operator asked the run to stop
    loss_log.csv       one row per training step
    checkpoint.pt      resumable training state (removed when the run finishes)
    target_0.png  surrogate_0.png  ...   the images the run trained on
    pytorch_lora_weights.safetensors     the adapter (diffusers' name; peft's
                                         adapter_model.safetensors + adapter_config.json for DDPM)
    lora_kohya.safetensors               the same LoRA in kohya's format (UNet families)
    lora_interchange.safetensors         the same LoRA, alpha folded in, diffusers' key names (SD3)
    adapter_card.json  README.md         the adapter's card, as JSON and as a Hub model card
    metrics.json  before_after.png       the evaluation; the integrity grid (target seeds, then every seed, worst first)
    after_0.png  ...                     the target seed regenerated with the adapter
    worker.log         the job process's output (the one file appended, not replaced)

Every write goes through a temporary file in the same folder and a rename, so a reader (the
server polling a running job) never sees half a file.
"""

from __future__ import annotations

import csv
import io
import os
import time
from pathlib import Path

from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE
from peft.utils import CONFIG_NAME as PEFT_CONFIG_NAME
from peft.utils import SAFETENSORS_WEIGHTS_NAME as PEFT_WEIGHTS_NAME

from unlearn_core.errors import DamagedRunFile, NotReady
from unlearn_core.files import read_json, write_bytes_atomic, write_json_atomic

_MISSING = object()

ADAPTER_WEIGHT_NAMES = (LORA_WEIGHT_NAME_SAFE, PEFT_WEIGHTS_NAME)  # owned by diffusers and peft


class RunFolder:
    """Every file of one run, by purpose (see the module docstring for the layout)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def create(self) -> "RunFolder":
        self.path.mkdir(parents=True, exist_ok=True)
        return self

    # -- the request ---------------------------------------------------------------------------
    @property
    def config_file(self) -> Path:
        return self.path / "config.json"

    def write_request(self, model: str, config: dict, targets: list[dict]) -> None:
        write_json_atomic(self.config_file, {"model": model, "config": config, "targets": targets})

    def read_request(self) -> dict:
        request = read_json(self.config_file)
        if not isinstance(request, dict) or not {"model", "config", "targets"} <= set(request):
            raise NotReady(f"run folder {self.path.name} holds no valid config.json")
        return request

    def input_image(self, kind: str, index: int) -> Path:
        """Where an uploaded `target` or `surrogate` image of instance `index` is kept."""
        return self.path / "inputs" / f"{kind}_{index}.png"

    # -- status and control (status.json is written by the run's own process only) -----------
    @property
    def status_file(self) -> Path:
        return self.path / "status.json"

    def write_status(self, state: str, **extra) -> dict:
        status = {"state": state, "updated": time.time(), **extra}
        write_json_atomic(self.status_file, status)
        return status

    def read_status(self) -> dict:
        status = read_json(self.status_file)
        return status if isinstance(status, dict) else {"state": "unknown"}

    @property
    def cancel_flag(self) -> Path:
        return self.path / "CANCEL"

    def request_cancel(self) -> None:
        write_bytes_atomic(self.cancel_flag, b"cancel requested\n")

    def cancel_requested(self) -> bool:
        return self.cancel_flag.exists()

    def clear_cancel(self) -> None:
        self.cancel_flag.unlink(missing_ok=True)

    @property
    def worker_log(self) -> Path:
        return self.path / "worker.log"

    # -- training ------------------------------------------------------------------------------
    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint.pt"

    @property
    def loss_log(self) -> Path:
        return self.path / "loss_log.csv"

    def append_loss_row(self, row: dict) -> None:
        """One step's row (appended: a reader skips a line being written)."""
        new = not self.loss_log.exists()
        with open(self.loss_log, "a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)

    def rewrite_loss_log(self, rows: list[dict], columns: list[str]) -> None:
        """The whole log at once (after resuming from a checkpoint)."""
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
        write_bytes_atomic(self.loss_log, buffer.getvalue().encode())

    def read_loss_log(self) -> list[dict]:
        """Rows as numbers (`projected` as bool, empty cells as None); empty while the run prepares.
        A log that is not CSV text raises `DamagedRunFile`."""
        try:
            with open(self.loss_log, newline="", encoding="utf-8") as handle:
                rows = list(csv.DictReader(handle))
        except OSError:
            return []
        except (UnicodeDecodeError, csv.Error) as error:
            raise DamagedRunFile(f"{self.loss_log.name} of this run is damaged ({type(error).__name__}): its losses are not shown") from None
        parsed = []
        for row in rows:
            try:
                parsed.append({k: (v == "True" if k == "projected" else None if v == "" else float(v)) for k, v in row.items()})
            except (TypeError, ValueError):
                continue  # a line being written
        return parsed

    # -- outputs -------------------------------------------------------------------------------
    def training_image(self, kind: str, index: int) -> Path:
        """The `target` or `surrogate` image instance `index` was trained on."""
        return self.path / f"{kind}_{index}.png"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.json"

    def write_metrics(self, metrics: dict) -> None:
        write_json_atomic(self.metrics_file, metrics)

    def read_metrics(self) -> dict | None:
        """The evaluation; None before it is written; `DamagedRunFile` for a file that is not a JSON object."""
        return self._read_object(self.metrics_file)

    def _read_object(self, path: Path) -> dict | None:
        if not path.is_file():
            return None
        data = read_json(path, _MISSING)
        if not isinstance(data, dict):
            raise DamagedRunFile(f"{path.name} of this run is damaged (not a JSON object): what it holds is not shown")
        return data

    @property
    def picture(self) -> Path:
        """The before/after grid."""
        return self.path / "before_after.png"

    def after_image(self, index: int) -> Path:
        """Target `index`'s seed regenerated with the adapter (written by the evaluation)."""
        return self.path / f"after_{index}.png"

    @property
    def card_file(self) -> Path:
        return self.path / "adapter_card.json"

    @property
    def model_card(self) -> Path:
        return self.path / "README.md"

    @property
    def adapter_zip(self) -> Path:
        """The publishable files as one download."""
        return self.path / "adapter.zip"

    @property
    def kohya_weights(self) -> Path:
        return self.path / "lora_kohya.safetensors"

    @property
    def interchange_weights(self) -> Path:
        """The LoRA in diffusers' key names with alpha / rank folded into lora_B (SD3): loads at
        the trained strength where a loader ignores alpha."""
        return self.path / "lora_interchange.safetensors"

    def write_card(self, card: dict) -> None:
        write_json_atomic(self.card_file, card)

    def read_card(self) -> dict | None:
        """The adapter's card; None before it is written; `DamagedRunFile` for a damaged one."""
        return self._read_object(self.card_file)

    def adapter_weights(self) -> Path | None:
        """The adapter's weight file, once saved."""
        return next((self.path / name for name in ADAPTER_WEIGHT_NAMES if (self.path / name).is_file()), None)

    def adapter_files(self) -> list[Path]:
        """Weights, peft's config (DDPM) and the card: what a download of the adapter holds."""
        weights = self.adapter_weights()
        if weights is None:
            return []
        files = [weights]
        if weights.name == PEFT_WEIGHTS_NAME and (self.path / PEFT_CONFIG_NAME).is_file():
            files.append(self.path / PEFT_CONFIG_NAME)
        if self.card_file.is_file():
            files.append(self.card_file)
        return files
