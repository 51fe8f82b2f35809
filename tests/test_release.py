"""A release merges fixes into one adapter: the fixes' LoRAs stacked along the rank, so its update is
exactly their sum, and every fix re-checked in it. The two fixes are real default jobs of the demo
model, kept in assets/examples/fixes/ (made with `python -m unlearn_core unlearn`, see its README)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from unlearn_core import cli
from unlearn_core.errors import InvalidInput
from unlearn_core.release import concatenated_lora, make_release

ROOT = Path(__file__).resolve().parents[1]
FIXES = [ROOT / "assets" / "examples" / "fixes" / name for name in ("chad-40", "italy-77")]


def test_the_concatenated_lora_s_update_is_the_sum_of_the_fixes_updates():
    generator = torch.Generator().manual_seed(0)

    def lora(rank: int, layers: tuple[str, ...]):
        state = {}
        for layer in layers:
            state[f"{layer}.lora_A.weight"] = torch.randn(rank, 6, generator=generator)
            state[f"{layer}.lora_B.weight"] = torch.randn(5, rank, generator=generator)
        return state, {layer: 0.5 * rank for layer in layers}

    parts = [lora(2, ("a", "b")), lora(3, ("a",))]  # the second fix lacks layer b
    merged, rank = concatenated_lora(parts)
    assert rank == 5
    for layer in ("a", "b"):
        expected = sum(scales[layer] * state[f"{layer}.lora_B.weight"] @ state[f"{layer}.lora_A.weight"] for state, scales in parts if f"{layer}.lora_A.weight" in state)
        torch.testing.assert_close(merged[f"{layer}.lora_B.weight"] @ merged[f"{layer}.lora_A.weight"], expected)


def test_a_release_of_two_flags_keeps_both_fixed_in_plain_diffusers(tmp_path, capsys):
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    from unlearn_core.metrics import toward_surrogate

    out = tmp_path / "release"
    assert cli.entry(["release", *map(str, FIXES), "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "every fix holds" in printed
    summary = json.loads((out / "release.json").read_text())
    assert [(fix["prompt"], fix["seed"]) for fix in summary["fixes"]] == [("flag of chad", 40), ("flag of italy", 77)]
    for prompt in ("flag of chad", "flag of italy"):
        assert summary["integrity"][prompt]["kept"] >= 14 and summary["integrity"][prompt]["seeds"] == 16
    card = (out / "README.md").read_text()
    assert "flag of chad" in card and "flag of italy" in card

    pipe = StableDiffusionPipeline.from_pretrained(ROOT / "assets" / "demo-model")
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(out))  # plain diffusers, the release's own file
    for fix, folder in zip(summary["fixes"], FIXES):
        image = pipe(fix["prompt"], num_inference_steps=25, guidance_scale=5.0, generator=torch.Generator().manual_seed(fix["seed"])).images[0]
        moved = toward_surrogate(image, Image.open(folder / "target_0.png"), Image.open(folder / "surrogate_0.png"))
        assert moved.r >= 0.7, f"{fix['prompt']} no longer fixed in the release loaded by diffusers: r {moved.r}"
        assert moved.r == pytest.approx(fix["r_release"], abs=0.02), "the release.json r is the loaded adapter's"
    assert np.asarray(Image.open(out / "before_after.png")).shape[0] > 0


def test_a_release_refuses_no_fix_and_fixes_of_other_models(tmp_path):
    with pytest.raises(InvalidInput, match="at least one"):
        make_release([], tmp_path / "none")
    other = tmp_path / "other-model"
    other.mkdir()
    for path in FIXES[1].iterdir():
        (other / path.name).write_bytes(path.read_bytes())
    request = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**request, "model": "someone/another-model"}))
    with pytest.raises(InvalidInput, match="different models"):
        make_release([FIXES[0], other], tmp_path / "mixed")


def test_the_ledger_keeps_fixed_jobs_per_owner_across_restarts_and_retires_them(tmp_path):
    import shutil

    from unlearn_core.ledger import Ledger

    runs = tmp_path / "runs"
    ledger = Ledger(runs)
    chad = ledger.add(FIXES[0], owner="hf:alice")
    italy = ledger.add(FIXES[1], owner="hf:bob")
    own = json.loads((FIXES[0] / "metrics.json").read_text())["integrity"]["flag of chad"]
    assert (chad.prompt, chad.seed, chad.kept) == ("flag of chad", 40, f"{own['ssim_at_least_0.9']}/16") and chad.r == pytest.approx(0.77, abs=0.01)
    with pytest.raises(InvalidInput, match="already"):
        ledger.add(FIXES[0], owner="hf:alice")
    unfixed = tmp_path / "unfixed"
    shutil.copytree(FIXES[0], unfixed)
    metrics = json.loads((unfixed / "metrics.json").read_text())
    metrics["forgetting"]["verdict"] = "partly fixed"
    (unfixed / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(InvalidInput, match="verdict is 'fixed'"):
        ledger.add(unfixed, owner="hf:alice")
    again = Ledger(runs)  # a restart: the ledger is a table of the runs folder's store
    assert [fix.id for fix in again.list("hf:alice")] == [chad.id] and [fix.id for fix in again.list()] == [chad.id, italy.id]
    with pytest.raises(InvalidInput, match="no fix"):
        again.retire(italy.id, owner="hf:alice")  # another owner's fix is not there for alice
    again.retire(chad.id, owner="hf:alice")
    assert again.list("hf:alice") == [] and again.list("hf:alice", include_retired=True)[0].retired > 0


def test_the_cli_adds_to_the_ledger_and_releases_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOTFIX_RUNS_DIR", str(tmp_path / "runs"))
    assert cli.entry(["ledger", "add", str(FIXES[0])]) == 0
    capsys.readouterr()
    assert cli.entry(["ledger", "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["seed"] == 40
    assert cli.entry(["ledger", "list"]) == 0
    assert "'flag of chad' seed 40" in capsys.readouterr().out
    assert cli.entry(["release", "--ledger", "--out", str(tmp_path / "release"), "--device", "cpu"]) == 0
    assert json.loads((tmp_path / "release" / "release.json").read_text())["fixes"][0]["verdict"] == "fixed"
