"""How many GPU slots the README's default job takes when it runs as a chain (ZeroGPU), and whether
the chain gives the straight run's adapter.

    python -m benchmarks.gpu_slots [--slot-s 120] [--cache DIR] [--device auto]

Runs the default chad job twice on the same cache: straight (`job_process.execute`), then as a
chain of slots (`gpu_slots.SlotChain`, through the `spaces` decorator: a no-op off a Space, so the
slots run on this machine's device). Prints each one's wall time, the number of slots, the steps
trained and the largest difference between the two adapters' weights.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file

from benchmarks.__main__ import CHAD, ROOT
from unlearn_core.config import DEMO_MODEL, UnlearnConfig
from unlearn_core.gpu_slots import SlotChain
from unlearn_core.job_process import execute
from unlearn_core.runfolder import RunFolder


def run_folder(path: Path) -> RunFolder:
    prompt, seed, surrogate = CHAD
    folder = RunFolder(path).create()
    target = ROOT / "assets" / "examples" / "chad_seed40_target.png"
    folder.write_request(DEMO_MODEL, UnlearnConfig().to_dict(), [{"prompt": prompt, "seed": seed, "surrogate_path": str(surrogate), "target_path": str(target)}])
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slot-s", type=float, default=120.0, help="the length of one GPU slot (HOTFIX_GPU_SLOT_S)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=None, help="where the two run folders go (default: a temporary folder)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="gpu-slots-"))
    straight = run_folder(out / "straight")
    started = time.time()
    execute(straight, args.device)
    straight_s = time.time() - started
    chained = run_folder(out / "chained")
    started = time.time()
    chain = SlotChain(chained, args.device, args.slot_s)
    code = chain.wait()
    chained_s = time.time() - started
    one, other = load_file(straight.path / "pytorch_lora_weights.safetensors"), load_file(chained.path / "pytorch_lora_weights.safetensors")
    steps = json.loads((chained.path / "metrics.json").read_text())["timing"]["steps_run"]
    print(json.dumps({"slot_s": args.slot_s, "exit": code, "slots": chain.slots, "steps": steps, "straight_s": round(straight_s, 1), "chained_s": round(chained_s, 1),
                      "largest_weight_difference": max(float((one[key] - other[key]).abs().max()) for key in one)}, indent=1))


if __name__ == "__main__":
    main()
