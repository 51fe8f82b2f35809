"""The table of bad inputs for the fault and abuse suite (tests/test_hardening.py) and its report
(scripts/reliability_report.py).

Each `Case` knocks on one door with one bad (or awkward-but-valid) input:

- door "api":  a named endpoint through gradio_client (`call` = (api_name, args));
- door "http": the same endpoint through raw HTTP, for values gradio_client cannot send (NaN, inf
  are not JSON, but Starlette's parser accepts them);
- door "cli":  `unlearn_core.cli.main(parse_args(argv))` must return 2 (argparse's own refusals
  exit 2 too) with the message on stderr, or 0 for inputs that must work;
- door "core": a core function (`call` = (function name, args)).

`expect` is a regular expression the error message must match, or None: the input must WORK.
Arguments `File("name")` are files made by `make_files()`; `"{tmp}"` in a CLI argument is a fresh
output folder.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

# Door, fault family and what the refusal must say. `expect=None`: must work.


@dataclass(frozen=True)
class File:
    name: str


@dataclass(frozen=True)
class Case:
    id: str
    door: str
    fault: str
    call: tuple
    expect: str | None
    note: str = ""
    tags: tuple = field(default=())


GOOD, NUMS = File("good"), {"nan": float("nan"), "inf": float("inf")}
SUR = ("flip", GOOD, "", 0.6, 0.2, 0, 4, None)  # make_surrogate args: method, target, prompt, strength, sigma, seed, steps, image


def sur(**changes) -> tuple:
    names = ["method", "target", "prompt", "strength", "sigma", "seed", "steps", "image"]
    values = dict(zip(names, SUR))
    values.update(changes)
    return tuple(values[n] for n in names)


def start(prompt="flag of ireland", seed=1, surrogate=GOOD, target=None, config="{}") -> tuple:
    return (prompt, seed, surrogate, target, config)


LONG = "flag of ireland " * 625  # 10 000 characters
UNICODE = "drapeau de la Côte d’Ivoire 🇨🇮 国旗 флаг \u202e"

CASES: list[Case] = [
    # -- images ------------------------------------------------------------------------------
    Case("api-target-truncated-png", "api", "image", ("/make_surrogate", sur(target=File("truncated"))), r"broken or truncated"),
    Case("api-target-zero-bytes", "api", "image", ("/make_surrogate", sur(target=File("empty"))), r"empty|not an image"),
    Case("api-target-text-named-png", "api", "image", ("/make_surrogate", sur(target=File("text"))), r"not an image file|cannot identify image"),
    Case("api-target-1x1", "api", "image", ("/make_surrogate", sur(target=File("one_pixel"))), r"too small"),
    Case("api-target-20000x20000-bomb", "api", "image", ("/make_surrogate", sur(target=File("bomb"))), r"too large"),
    Case("api-target-12000x12000-bomb", "api", "image", ("/make_surrogate", sur(target=File("bomb_mid"))), r"too large"),
    Case("api-target-cmyk-jpeg", "api", "image", ("/make_surrogate", sur(target=File("cmyk"))), None, "CMYK must work"),
    Case("api-target-palette", "api", "image", ("/make_surrogate", sur(target=File("palette"))), None, "palette must work"),
    Case("api-surrogate-16bit", "api", "image", ("/make_surrogate", sur(method="image", image=File("sixteen_bit"))), None, "16-bit must work (not clipped to a blank)"),
    Case("api-surrogate-alpha", "api", "image", ("/make_surrogate", sur(method="image", image=File("alpha"))), None, "alpha must work"),
    Case("api-surrogate-blank-canvas", "api", "image", ("/make_surrogate", sur(method="image", image=File("blank"))), r"single flat colour"),
    Case("api-surrogate-flat-red", "api", "image", ("/make_surrogate", sur(method="image", image=File("flat_red"))), r"single flat colour", "a flat non-grey colour is blank too"),
    Case("api-start-truncated-surrogate", "api", "image", ("/start_unlearning", start(surrogate=File("truncated"))), r"broken or truncated"),
    Case("api-start-text-surrogate", "api", "image", ("/start_unlearning", start(surrogate=File("text"))), r"not an image file|cannot identify image"),
    Case("api-start-bomb-target", "api", "image", ("/start_unlearning", start(target=File("bomb"))), r"too large"),
    Case("cli-surrogate-truncated", "cli", "image", ("surrogate", "--method", "flip", "--image", File("truncated"), "--out", "{tmp}/o.png", "--size", "64"), r"broken or truncated"),
    Case("cli-surrogate-bomb", "cli", "image", ("surrogate", "--method", "flip", "--image", File("bomb"), "--out", "{tmp}/o.png", "--size", "64"), r"too large"),
    Case("cli-surrogate-zero-bytes", "cli", "image", ("surrogate", "--method", "flip", "--image", File("empty"), "--out", "{tmp}/o.png", "--size", "64"), r"empty"),
    Case("cli-surrogate-cmyk", "cli", "image", ("surrogate", "--method", "flip", "--image", File("cmyk"), "--out", "{tmp}/o.png", "--size", "64"), None),
    Case("cli-surrogate-16bit", "cli", "image", ("surrogate", "--method", "noise", "--image", File("sixteen_bit"), "--out", "{tmp}/o.png", "--size", "64"), None),
    Case("core-open-float-tiff", "core", "image", ("open_image", File("float_tiff")), None, "32-bit float images must work"),
    Case("core-array-with-nan", "core", "image", ("open_image_array_nan",), r"NaN or infinite"),
    # -- numbers -----------------------------------------------------------------------------
    Case("http-generate-nan-steps", "http", "number", ("generate", ["flag of ireland", "0", "NaN", 5.0]), r"Steps: must be a finite number, got nan"),
    Case("http-generate-inf-guidance", "http", "number", ("generate", ["flag of ireland", "0", 4, "Infinity"]), r"Guidance: must be a finite number, got inf"),
    Case("http-generate-nan-guidance", "http", "number", ("generate", ["flag of ireland", "0", 4, "NaN"]), r"Guidance: must be a finite number, got nan"),
    Case("api-generate-negative-guidance", "api", "number", ("/generate", ("flag of ireland", "0", 4, -3.0)), r"less than minimum"),
    Case("api-generate-absurd-steps", "api", "number", ("/generate", ("flag of ireland", "0", 10**9, 5.0)), r"greater than maximum"),
    Case("api-generate-negative-seed", "api", "number", ("/generate", ("flag of ireland", "-5", 4, 5.0)), r"non-negative"),
    Case("api-generate-huge-seed", "api", "number", ("/generate", ("flag of ireland", "99999999999999999999", 4, 5.0)), r"below 2\^63"),
    Case("api-generate-100001-seeds", "api", "number", ("/generate", ("flag of ireland", "0-100000", 4, 5.0)), r"too many seeds"),
    Case("http-surrogate-nan-strength", "http", "number", ("make_surrogate", ["sdedit", GOOD, "", "NaN", 0.2, 0, 2, None]), r"Strength: must be a finite number, got nan"),
    Case("api-surrogate-strength-5", "api", "number", ("/make_surrogate", sur(method="sdedit", strength=5.0)), r"greater than maximum"),
    Case("api-surrogate-seed-1e30", "api", "number", ("/make_surrogate", sur(method="sdedit", seed=1e30, steps=2)), r"whole number in \[0, 2\^63\)"),
    Case("api-surrogate-negative-seed", "api", "number", ("/make_surrogate", sur(method="noise", seed=-1)), r"less than minimum"),
    Case("api-surrogate-absurd-sigma", "api", "number", ("/make_surrogate", sur(method="noise", sigma=1e9)), r"greater than maximum"),
    Case("api-start-nan-steps", "api", "number", ("/start_unlearning", start(config='{"steps": NaN}')), r"steps must be a finite number"),
    Case("api-start-inf-learning-rate", "api", "number", ("/start_unlearning", start(config='{"learning_rate": Infinity}')), r"learning_rate must be a finite number"),
    Case("api-start-negative-learning-rate", "api", "number", ("/start_unlearning", start(config='{"learning_rate": -0.1}')), r"learning_rate must be between"),
    Case("api-start-absurd-rank", "api", "number", ("/start_unlearning", start(config='{"lora_rank": 100000}')), r"lora_rank must be between"),
    Case("api-start-absurd-guidance", "api", "number", ("/start_unlearning", start(config='{"guidance_scale": 1e6}')), r"guidance_scale must be between"),
    Case("api-start-negative-train-seed", "api", "number", ("/start_unlearning", start(config='{"seed": -1}')), r"seed must be between"),
    Case("api-start-huge-target-seed", "api", "number", ("/start_unlearning", start(seed=2**70)), r"whole number in \[0, 2\^63\)"),
    Case("http-start-nan-target-seed", "http", "number", ("start_unlearning", ["flag of ireland", "NaN", GOOD, None, "{}"]), r"Target seed: must be a finite number, got nan"),
    Case("api-start-steps-as-text", "api", "config", ("/start_unlearning", start(config='{"steps": "abc"}')), r"steps must be a whole number", "was accepted and failed later in the worker"),
    Case("api-start-fractional-steps", "api", "config", ("/start_unlearning", start(config='{"steps": 4.5}')), r"steps must be a whole number", "was accepted and failed later in the worker"),
    Case("api-start-bool-as-text", "api", "config", ("/start_unlearning", start(config='{"gradient_checkpointing": "yes"}')), r"true or false", "was accepted and failed later in the worker"),
    Case("api-start-unbounded-work", "api", "limits", ("/start_unlearning", start(config='{"steps": 20000, "remember_count": 1000, "eval_seeds": 256, "batch_size": 256}')), r"would take about [\d,]+ image-steps.*at most", "accepted in 0.5 s: days of work"),
    Case("api-start-40-remember-prompts", "api", "limits", ("/start_unlearning", start(config='{"remember_prompts": %s}' % json.dumps(["flag of france"] * 40))), r"takes at most 32", "1200 prompts died with Argument list too long"),
    Case("api-start-prompts-not-strings", "api", "config", ("/start_unlearning", start(config='{"remember_prompts": [1, 2]}')), r"list of prompts", "crashed with AttributeError"),
    Case("api-start-prompts-a-string", "api", "config", ("/start_unlearning", start(config='{"remember_prompts": "abc"}')), r"list of prompts", "was split into one prompt per letter"),
    Case("api-start-unknown-setting", "api", "config", ("/start_unlearning", start(config='{"stepz": 4}')), r"unknown setting"),
    Case("api-start-config-not-object", "api", "config", ("/start_unlearning", start(config="[1, 2]")), r"JSON object"),
    Case("api-start-remember-dir", "api", "config", ("/start_unlearning", start(config='{"remember_dir": "/etc"}')), r"not accepted from the web app"),
    Case("cli-generate-nan-guidance", "cli", "number", ("generate", "--guidance", "nan", "--seeds", "0", "--out", "{tmp}"), r"guidance must be a number"),
    Case("cli-generate-absurd-steps", "cli", "number", ("generate", "--steps", "100000", "--seeds", "0", "--out", "{tmp}"), r"steps must be an integer between"),
    Case("cli-unlearn-inf-learning-rate", "cli", "number", ("unlearn", "--prompt", "x", "--seed", "0", "--surrogate", GOOD, "--out", "{tmp}", "--learning-rate", "inf"), r"finite number"),
    Case("cli-unlearn-nan-steps", "cli", "number", ("unlearn", "--prompt", "x", "--seed", "0", "--surrogate", GOOD, "--out", "{tmp}", "--steps", "nan"), r"invalid int value"),
    Case("cli-unlearn-absurd-rank", "cli", "number", ("unlearn", "--prompt", "x", "--seed", "0", "--surrogate", GOOD, "--out", "{tmp}", "--lora-rank", "99999"), r"lora_rank must be between"),
    Case("cli-unlearn-negative-seed", "cli", "number", ("unlearn", "--prompt", "x", "--seed", "-1", "--surrogate", GOOD, "--out", "{tmp}"), r"seed must be"),
    Case("cli-unlearn-nan-guidance", "cli", "number", ("unlearn", "--prompt", "x", "--seed", "0", "--surrogate", GOOD, "--out", "{tmp}", "--guidance-scale", "nan"), r"finite number"),
    Case("cli-surrogate-absurd-size", "cli", "number", ("surrogate", "--method", "flip", "--image", GOOD, "--out", "{tmp}/o.png", "--size", "100000"), r"--size must be between", "allocated 30 GB"),
    Case("cli-surrogate-nan-sigma", "cli", "number", ("surrogate", "--method", "noise", "--image", GOOD, "--out", "{tmp}/o.png", "--size", "64", "--sigma", "nan"), r"sigma must be in"),
    Case("cli-surrogate-negative-seed", "cli", "number", ("surrogate", "--method", "noise", "--image", GOOD, "--out", "{tmp}/o.png", "--size", "64", "--seed", "-1"), r"whole number in"),
    # -- text --------------------------------------------------------------------------------
    Case("api-generate-10k-prompt", "api", "text", ("/generate", (LONG, "0", 4, 5.0)), r"prompt is 10000 characters"),
    Case("api-generate-non-ascii-prompt", "api", "text", ("/generate", (UNICODE, "0", 2, 5.0)), None, "must work"),
    Case("api-generate-nul-prompt", "api", "text", ("/generate", ("flag\x00of ireland", "0", 2, 5.0)), r"control characters"),
    Case("api-start-10k-prompt", "api", "text", ("/start_unlearning", start(prompt=LONG)), r"prompt is 10000 characters", "was queued"),
    Case("api-start-nul-prompt", "api", "text", ("/start_unlearning", start(prompt="flag\x00of ireland")), r"control characters", "was queued and failed in the worker (NUL in argv)"),
    Case("cli-generate-10k-prompt", "cli", "text", ("generate", "--prompt", LONG, "--seeds", "0", "--out", "{tmp}"), r"prompt is 10000 characters"),
    # -- models ------------------------------------------------------------------------------
    Case("core-model-unknown-id", "core", "model", ("load_model", "nobody-here/no-such-model-xyz"), r"cannot load model"),
    Case("core-model-etc", "core", "model", ("load_model", "/etc"), r"not a diffusers model folder"),
    Case("core-model-dotdot", "core", "model", ("load_model", "../../../../../etc"), r"not a diffusers model folder"),
    Case("core-model-nul", "core", "model", ("load_model", "assets/demo\x00model"), r"not a valid hub id"),
    Case("cli-generate-unknown-model", "cli", "model", ("generate", "--model", "nobody-here/no-such-model-xyz", "--seeds", "0", "--out", "{tmp}"), r"cannot load model"),
    Case("cli-generate-model-etc", "cli", "model", ("generate", "--model", "/etc", "--seeds", "0", "--out", "{tmp}"), r"not a diffusers model folder"),
    # -- paths -------------------------------------------------------------------------------
    Case("api-status-traversal", "api", "path", ("/job_status", ("../../etc/passwd",)), r"no job"),
    Case("api-download-traversal", "api", "path", ("/download_adapter", ("../../etc/passwd",)), r"no job"),
    Case("api-download-absolute", "api", "path", ("/download_adapter", ("/etc/passwd",)), r"no job"),
    Case("api-resume-traversal", "api", "path", ("/resume_job", ("../jobs.sqlite",)), r"no job"),
    Case("api-try-adapter-traversal", "api", "path", ("/try_adapter", ("../../etc", None, "", "0", 2)), r"no job"),
    # -- adapters ----------------------------------------------------------------------------
    Case("api-adapter-random-safetensors", "api", "adapter", ("/try_adapter", ("", File("random_safetensors"), "flag of ireland", "0", 2)), r"cannot load this adapter"),
    Case("api-adapter-text-safetensors", "api", "adapter", ("/try_adapter", ("", File("text_safetensors"), "flag of ireland", "0", 2)), r"cannot load this adapter"),
    Case("api-adapter-other-model", "api", "adapter", ("/try_adapter", ("", File("other_model_lora"), "flag of ireland", "0", 2)), r"cannot load this adapter.*another base model"),
    Case("api-adapter-wrong-extension", "api", "adapter", ("/try_adapter", ("", File("adapter_txt"), "flag of ireland", "0", 2)), r"safetensors"),
]


# -- the files the cases name -----------------------------------------------------------------------
def make_files(folder: Path) -> dict[str, Path]:
    """Every input file of the table, made small: the bombs are 1-bit PNGs of a few tens of kB."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    files: dict[str, Path] = {}

    def save(name: str, image, suffix=".png", **kwargs) -> None:
        path = folder / f"{name}{suffix}"
        image.save(path, **kwargs)
        files[name] = path

    pattern = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    save("good", Image.fromarray(pattern))
    buffer = io.BytesIO()
    Image.fromarray(pattern).save(buffer, format="PNG")
    (folder / "truncated.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    files["truncated"] = folder / "truncated.png"
    (folder / "empty.png").write_bytes(b"")
    files["empty"] = folder / "empty.png"
    (folder / "text.png").write_text("I am a text file with a .png name\n")
    files["text"] = folder / "text.png"
    save("one_pixel", Image.new("RGB", (1, 1), (255, 0, 0)))
    save("bomb", Image.new("1", (20000, 20000)), optimize=True)  # 400 megapixels, ~50 kB
    save("bomb_mid", Image.new("1", (12000, 12000)), optimize=True)  # 144 MP: under PIL's hard limit
    save("cmyk", Image.fromarray(pattern).convert("CMYK"), suffix=".jpg", quality=90)
    save("palette", Image.fromarray(pattern).convert("P", palette=Image.Palette.ADAPTIVE, colors=16))
    ramp = (np.add.outer(np.arange(64), np.arange(64)) * 500).astype(np.uint16)  # 0 .. 63 000
    save("sixteen_bit", Image.fromarray(ramp))
    rgba = np.concatenate([pattern, np.full((64, 64, 1), 128, np.uint8)], axis=-1)
    rgba[:32, :, 3] = 0  # half transparent, half translucent
    save("alpha", Image.fromarray(rgba, "RGBA"))
    save("blank", Image.new("RGB", (64, 64), (255, 255, 255)))
    save("flat_red", Image.new("RGB", (64, 64), (200, 30, 30)))
    save("float_tiff", Image.fromarray(rng.random((64, 64)).astype(np.float32)), suffix=".tiff")

    import torch
    from safetensors.torch import save_file

    (folder / "random").mkdir(exist_ok=True)
    files["random_safetensors"] = folder / "random" / "random.safetensors"
    save_file({"foo.weight": torch.randn(8, 8), "bar.bias": torch.randn(8)}, str(files["random_safetensors"]))
    files["text_safetensors"] = folder / "text.safetensors"
    files["text_safetensors"].write_text("not a safetensors file")
    files["adapter_txt"] = folder / "adapter.txt"
    files["adapter_txt"].write_text("hello")
    return files


def make_other_model_lora(folder: Path) -> Path:
    """A real LoRA saved from a tiny Stable Diffusion model (not the demo model)."""
    from tests.tiny import save_tiny
    from unlearn_core.models import load_model

    model = load_model(str(save_tiny("sd", folder / "tiny-sd")), "cpu")
    model.add_lora(4, 4.0)
    out = folder / "other-lora"
    out.mkdir(parents=True, exist_ok=True)
    model.save_lora(out)
    path = out / "other_model.safetensors"
    os.replace(out / "pytorch_lora_weights.safetensors", path)
    return path


# -- figures for the report -------------------------------------------------------------------------
STATS_ENV = "HOTFIX_HARDENING_STATS"


def record(kind: str, **values) -> None:
    """Append one line of figures (faults injected, jobs, load) for scripts/reliability_report.py."""
    path = os.environ.get(STATS_ENV)
    if not path:
        return
    with open(path, "a") as handle:
        handle.write(json.dumps({"kind": kind, **values}) + "\n")
