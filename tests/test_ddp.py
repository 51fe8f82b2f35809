"""Two processes under torchrun (CPU, gloo) train the adapter a single process trains with the
same global batch, and the run folder is written once."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from benchmarks.app_server import free_port
from unlearn_core.models import load_model

PROMPT = "flag of japan"


def _unlearn_args(model: str, surrogate: str, out: str, per_process_batch: int) -> list[str]:
    return ["unlearn", f"--model={model}", f"--prompt={PROMPT}", "--seed=7", f"--surrogate={surrogate}", f"--out={out}", "--device=cpu",
            "--steps=3", "--learning-rate=0.05", "--remember-count=2", "--eval-seeds=0", "--generation-steps=3", "--guidance-scale=2.0",
            "--checkpoint-every=0", f"--batch-size={per_process_batch}", f"--remember-batch-size={per_process_batch}",
            f"--remember-renoised={per_process_batch}"]


@pytest.mark.timeout(600)
def test_two_processes_train_what_one_process_trains(tiny_models, tmp_path):
    model_dir = str(tiny_models["sd"])
    target = load_model(model_dir, "cpu").generate(PROMPT, [7], 3, 2.0)[0][0]
    surrogate = tmp_path / "surrogate.png"
    Image.fromarray(255 - np.asarray(target)).save(surrogate)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HOTFIX_CACHE": str(tmp_path / "cache")}
    single = subprocess.run([sys.executable, "-m", "unlearn_core", *_unlearn_args(model_dir, str(surrogate), str(tmp_path / "one"), 4)],
                            env=env, capture_output=True, text=True, timeout=500)
    assert single.returncode == 0, single.stderr[-3000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}", "-m", "unlearn_core"]
    double = subprocess.run([*torchrun, *_unlearn_args(model_dir, str(surrogate), str(tmp_path / "two"), 2)], env=env, capture_output=True, text=True, timeout=500)
    assert double.returncode == 0, double.stderr[-3000:]

    one, two = (load_file(str(tmp_path / name / "pytorch_lora_weights.safetensors")) for name in ("one", "two"))
    assert one.keys() == two.keys()
    assert any(float(value.abs().max()) > 0 for key, value in two.items() if "lora_B" in key), "the two processes trained nothing"
    worst = max(float((one[key] - two[key]).abs().max()) for key in one)
    scale = max(float(value.abs().max()) for value in one.values())
    # All-reduce sums in another order than one process does, and Adam divides by √v, so rounding
    # shows at the 1e-3 level of the weights; a different batch (or no all-reduce) differs by ~1.
    assert worst < 1e-2 * scale, f"the 2-process adapter differs from the 1-process one by {worst} (weights up to {scale})"

    rows = (tmp_path / "two" / "loss_log.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 3, "one log row per step, written by one process"
    leftovers = [path.name for path in (tmp_path / "two").rglob("*") if path.name.endswith((".tmp", ".part"))]
    assert not leftovers, leftovers
    assert (tmp_path / "two" / "metrics.json").is_file() and (tmp_path / "two" / "README.md").is_file()
