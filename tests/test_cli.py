"""Every CLI verb end to end on a tiny model, then the files it wrote."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from unlearn_core.cli import main, parse_args

ROOT = Path(__file__).resolve().parent.parent


def test_help_lists_the_verbs():
    out = subprocess.run([sys.executable, "-m", "unlearn_core", "--help"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for verb in ("generate", "surrogate", "unlearn", "evaluate", "probe"):
        assert verb in out
    for verb in ("generate", "surrogate", "unlearn", "evaluate", "probe"):  # each verb's own help, with every setting's text
        own = subprocess.run([sys.executable, "-m", "unlearn_core", verb, "--help"], cwd=ROOT, capture_output=True, text=True)
        assert own.returncode == 0 and "usage:" in own.stdout, own.stderr[-300:]


def test_generate_surrogate_unlearn_evaluate(tiny_models, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOTFIX_CACHE", str(tmp_path / "cache"))
    model = str(tiny_models["sd"])
    grid = tmp_path / "grid"
    assert main(parse_args(["generate", "--model", model, "--prompt", "flag of japan", "--seeds", "0-2", "--steps", "3", "--out", str(grid)])) == 0
    manifest = json.loads((grid / "manifest.json").read_text())
    assert [r["seed"] for r in manifest["images"]] == [0, 1, 2]
    assert manifest["images"][0]["prompt"] == "flag of japan" and manifest["images"][0]["steps"] == 3
    target = grid / manifest["images"][0]["file"]

    for method in ("sdedit", "flip", "noise"):
        out = tmp_path / f"{method}.png"
        args = ["surrogate", "--model", model, "--method", method, "--image", str(target), "--out", str(out), "--strength", "0.5", "--steps", "3"]
        assert main(parse_args(args)) == 0
        assert Image.open(out).size == Image.open(target).size
    assert np.array_equal(np.asarray(Image.open(tmp_path / "flip.png")), np.asarray(Image.open(target))[:, ::-1])

    run = tmp_path / "run"
    args = ["unlearn", "--model", model, "--prompt", "flag of japan", "--seed", "0", "--surrogate", str(tmp_path / "flip.png"), "--out", str(run),
            "--steps", "2", "--remember-count", "2", "--eval-seeds", "2", "--generation-steps", "3", "--batch-size", "2"]
    assert main(parse_args(args)) == 0
    assert json.loads((run / "status.json").read_text())["state"] == "done"
    assert (run / "pytorch_lora_weights.safetensors").is_file() and (run / "metrics.json").is_file()
    assert re.search(r"verdict: (fixed|partly fixed|not fixed) — the painted pixels moved -?\d+% of the way", capsys.readouterr().out)

    ev = tmp_path / "eval"
    args = ["evaluate", "--model", model, "--adapter", str(run), "--prompt", "flag of japan", "--seed", "0", "--out", str(ev), "--eval-seeds", "2", "--steps", "3", "--remember-count", "2"]
    assert main(parse_args(args)) == 0
    report = json.loads((ev / "metrics.json").read_text())
    assert report["targets"][0]["after_vs_target"]["ssim"]["available"]
    assert (ev / "before_after.png").is_file()
    assert report["forgetting"]["verdict"] in capsys.readouterr().out


def test_bad_input_gives_a_message_not_a_traceback(tiny_models, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    code = main(parse_args(["surrogate", "--method", "flip", "--image", str(bad), "--out", str(tmp_path / "o.png"), "--size", "16"]))
    assert code == 2 and "not an image" in capsys.readouterr().err
    code = main(parse_args(["generate", "--model", str(tmp_path / "nowhere"), "--seeds", "0", "--out", str(tmp_path / "g")]))
    assert code == 2 and "cannot load model" in capsys.readouterr().err
    code = main(parse_args(["unlearn", "--model", str(tiny_models["sd"]), "--prompt", "x", "--seed", "0", "--surrogate", str(bad), "--out", str(tmp_path / "r"), "--steps", "0"]))
    assert code == 2 and "steps must be between" in capsys.readouterr().err
    code = main(parse_args(["generate", "--model", str(tiny_models["sd"]), "--seeds", "9-1", "--out", str(tmp_path / "g")]))
    assert code == 2 and "cannot read seeds" in capsys.readouterr().err
