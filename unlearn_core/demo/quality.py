"""Quality check of the demo model: which flag did it draw?

    python -m unlearn_core.demo.quality train-classifier --out assets/flag-classifier.safetensors
    python -m unlearn_core.demo.quality check --model assets/demo-model --seeds 16 --out docs/demo-quality

The judge is a small CNN trained only on the procedural renderer's photos (never on model
outputs), with extra noise and blur so it tolerates generated images. `check` generates each
flag's default prompt over N seeds at default settings, classifies, and reports per-flag accuracy
and a sample grid.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from unlearn_core.demo import flags


class FlagClassifier(nn.Module):
    """Four strided conv layers and a linear head over a 4×4 layout map: keeps where colours are."""

    def __init__(self, classes: int = len(flags.FLAGS)):
        super().__init__()
        layers, channels = [], 3
        for width in (32, 64, 96, 128):
            layers += [nn.Conv2d(channels, width, 3, stride=2, padding=1), nn.GroupNorm(8, width), nn.SiLU()]
            channels = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(128 * 4 * 4, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits for images in [-1, 1], shape (B, 3, 64, 64)."""
        return self.head(self.features(images).flatten(1))


def _degrade(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    batch = images.shape[0]
    noise = torch.rand(batch, 1, 1, 1, generator=generator, device=images.device) * 0.12
    images = images + noise * torch.randn(images.shape, generator=generator, device=images.device)
    blurred = F.avg_pool2d(images, 3, stride=1, padding=1, count_include_pad=False)
    pick = (torch.rand(batch, 1, 1, 1, generator=generator, device=images.device) < 0.4).float()
    return (pick * blurred + (1 - pick) * images).clamp(-1, 1)


def train_classifier(out: Path, steps: int = 3000, batch: int = 128, time_budget_s: float = 600, device: str = "auto") -> dict:
    """Train the judge on rendered flags and save it as safetensors; return its held-out accuracy."""
    from safetensors.torch import save_file

    device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    torch.manual_seed(0)
    generator = torch.Generator(device=device).manual_seed(123)
    bank, _ = flags.canonical_bank()
    bank = bank.to(device)
    model = FlagClassifier().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    started, step = time.time(), 0
    while step < steps and time.time() - started < time_budget_s:
        labels = torch.randint(0, len(flags.FLAGS), (batch,), generator=generator, device=device)
        images = _degrade(flags.augment_batch(bank, labels, generator), generator)
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
    model.eval()
    held_out = torch.Generator(device=device).manual_seed(999)
    with torch.no_grad():
        labels = torch.arange(len(flags.FLAGS), device=device).repeat(20)
        accuracy = (model(flags.augment_batch(bank, labels, held_out)).argmax(1) == labels).float().mean().item()
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(out))
    return {"steps": step, "seconds": round(time.time() - started, 1), "held_out_render_accuracy": round(accuracy, 4)}


def load_classifier(path: Path) -> FlagClassifier:
    from safetensors.torch import load_file

    model = FlagClassifier()
    model.load_state_dict(load_file(str(path)))
    return model.eval()


def classify(model: FlagClassifier, images: np.ndarray) -> list[str]:
    """Flag names for uint8/float images of shape (B, H, W, 3)."""
    tensor = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    if tensor.max() > 1.5:
        tensor = tensor / 255.0
    tensor = tensor.permute(0, 3, 1, 2) * 2 - 1
    tensor = F.interpolate(tensor, size=(64, 64), mode="bilinear", align_corners=False)
    with torch.no_grad():
        return [flags.FLAG_NAMES[i] for i in model(tensor).argmax(1).tolist()]


JUDGE_FILE = Path(__file__).resolve().parents[2] / "assets" / "flag-classifier.safetensors"


def judge_marks(prompt: str, images: list[Image.Image]) -> list[str | None] | None:
    """For a `flag of NAME` grid of the demo model: per image, the flag the judge sees where it is not
    NAME ("looks like: romania"), else None. None for a prompt that names no flag the judge knows
    (it knows only the demo's flags, so it has nothing to say about other prompts or models)."""
    name = prompt.strip().lower().removeprefix("flag of ").removeprefix("the ").strip()
    if not prompt.strip().lower().startswith("flag of") or name not in flags.FLAG_NAMES or not JUDGE_FILE.is_file():
        return None
    seen = classify(_judge(), np.stack([np.asarray(image.convert("RGB").resize((64, 64))) for image in images]))
    return [None if flag == name else f"looks like: {flag}" for flag in seen]


@functools.lru_cache(maxsize=1)
def _judge() -> FlagClassifier:
    return load_classifier(JUDGE_FILE)


def check(model_path: str, classifier_path: Path, seeds: int, out: Path, steps: int = 25, guidance: float = 5.0) -> dict:
    """Generate `flag of NAME` for each flag over `seeds` seeds and report per-flag accuracy."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_path)
    pipe.set_progress_bar_config(disable=True)
    judge = load_classifier(classifier_path)
    out.mkdir(parents=True, exist_ok=True)
    per_flag, confusions, rows = {}, {}, []
    started = time.time()
    for name in flags.FLAG_NAMES:
        prompt = f"flag of {name}"
        generators = [torch.Generator().manual_seed(seed) for seed in range(seeds)]
        images = pipe([prompt] * seeds, num_inference_steps=steps, guidance_scale=guidance, generator=generators, output_type="np").images
        predicted = classify(judge, images)
        per_flag[name] = sum(p == name for p in predicted) / seeds
        confusions[name] = {p: predicted.count(p) for p in set(predicted) if p != name}
        rows.append((images * 255).round().astype(np.uint8)[: min(seeds, 8)])
    seconds = time.time() - started
    grid = np.concatenate([np.concatenate(list(row), axis=1) for row in rows], axis=0)
    Image.fromarray(grid).save(out / "samples.png")
    report = {
        "model": model_path,
        "seeds": seeds,
        "steps": steps,
        "guidance": guidance,
        "mean_accuracy": round(float(np.mean(list(per_flag.values()))), 4),
        "min_accuracy": round(float(min(per_flag.values())), 4),
        "per_flag": per_flag,
        "confusions": confusions,
        "seconds": round(seconds, 1),
    }
    (out / "quality.json").write_text(json.dumps(report, indent=2))
    return report


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Train the flag judge or check the demo model's quality.")
    sub = parser.add_subparsers(dest="verb", required=True)
    train = sub.add_parser("train-classifier")
    train.add_argument("--out", type=Path, default=Path("assets/flag-classifier.safetensors"))
    train.add_argument("--steps", type=int, default=3000)
    train.add_argument("--time-budget-s", type=float, default=600)
    train.add_argument("--device", default="auto")
    run = sub.add_parser("check")
    run.add_argument("--model", default="assets/demo-model")
    run.add_argument("--classifier", type=Path, default=Path("assets/flag-classifier.safetensors"))
    run.add_argument("--seeds", type=int, default=16)
    run.add_argument("--steps", type=int, default=25)
    run.add_argument("--guidance", type=float, default=5.0)
    run.add_argument("--out", type=Path, default=Path("docs/demo-quality"))
    return parser.parse_args(argv)


def main(args) -> None:
    if args.verb == "train-classifier":
        result = train_classifier(args.out, args.steps, time_budget_s=args.time_budget_s, device=args.device)
    else:
        result = check(args.model, args.classifier, args.seeds, args.out, args.steps, args.guidance)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main(parse_args())
