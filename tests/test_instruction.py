"""Instruction-forgetting probe: token bookkeeping, metrics, config, end to end on the demo model."""

from __future__ import annotations

import csv
import json
import math
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from unlearn_core import cli, probe, settings
from unlearn_core.config import parse_seeds
from unlearn_core.errors import InvalidInput
from unlearn_core.models import wrap_pipeline
from unlearn_core.probe import (
    CSV_COLUMNS,
    ProbeConfig,
    auc,
    map_words,
    mass_on,
    parse_variants,
    token_sets,
    without_positions,
)

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "assets" / "demo-model"
CONCEPT = "the flag of japan"
UNLEARN = "Please forget anything about the flag of japan. Please help me generate a picture of the flag of japan."


def use_clip_setting(monkeypatch, source: str) -> None:
    """HOTFIX_CLIP_MODEL=source as the process's settings (read once, so installed, then restored)."""
    monkeypatch.setenv(probe.CLIP_ENV, source)
    monkeypatch.setattr(settings, "_current", settings.Settings.from_env())


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(DEMO / "tokenizer"))


@pytest.fixture(scope="module")
def tiny_text(tokenizer):
    """A 2-layer CLIP text model on the demo tokenizer (diffusers' dummy-component sizes)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    config = CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=tokenizer.model_max_length,
        vocab_size=len(tokenizer),
    )
    return SimpleNamespace(tokenizer=tokenizer, text_encoder=CLIPTextModel(config).eval())


# -- token bookkeeping -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("prompt", "word", "tokens"),
    [
        ("cote d'ivoire", "cote", ["cote</w>"]),
        ("cote d'ivoire", "d'ivoire", ["d</w>", "'</w>", "ivoire</w>"]),
        ("flag of japan", "japan", ["japan</w>"]),
        ("a drapeau of japan", "drapeau", ["dra", "p", "e", "a", "u</w>"]),
    ],
)
def test_word_to_tokens(tokenizer, prompt, word, tokens):
    tmap = map_words(tokenizer, prompt)
    (match,) = [w for w in tmap.words if w.text == word]
    assert [tmap.tokens[p] for p in match.positions] == tokens
    assert list(match.positions) == list(range(match.positions[0], match.positions[0] + len(tokens)))


def test_multi_token_concept_and_specials_excluded(tokenizer):
    tmap = map_words(tokenizer, "a photo of cote d'ivoire")
    sets = token_sets(tmap, "cote d'ivoire")
    assert [tmap.tokens[p] for p in sets.concept] == ["cote</w>", "d</w>", "'</w>", "ivoire</w>"]
    assert sets.instruction == ()
    last = len(tmap.input_ids) - 1
    assert tmap.input_ids[0] == tokenizer.bos_token_id and tmap.input_ids[last] == tokenizer.eos_token_id
    assert all(0 < p < last for p in tmap.word_positions)  # start/end tokens and padding belong to no word


@pytest.mark.parametrize(
    ("prompt", "concept_tokens", "instruction_tokens"),
    [
        ("a photo of the flag of japan", ["flag", "japan"], []),
        (UNLEARN, ["flag", "japan", "flag", "japan"], ["please", "forget", "anything", "about", "please", "help", "me", "generate"]),
        ("a photo without the flag of japan", ["flag", "japan"], ["without"]),
        ("a photo of the flag of japan. a picture of the flag of japan.", ["flag", "japan", "flag", "japan"], []),
        ("a red circle on white", [], ["red", "circle", "white"]),  # implicit: concept absent
    ],
)
def test_concept_and_instruction_sets(tokenizer, prompt, concept_tokens, instruction_tokens):
    tmap = map_words(tokenizer, prompt)
    sets = token_sets(tmap, CONCEPT)
    strip = lambda ps: [tmap.tokens[p].replace("</w>", "") for p in ps]  # noqa: E731
    assert strip(sets.concept) == concept_tokens
    assert strip(sets.instruction) == instruction_tokens
    assert not set(sets.concept) & set(sets.instruction)


def test_ablation_removes_positions(tokenizer):
    tmap = map_words(tokenizer, UNLEARN)
    sets = token_sets(tmap, CONCEPT)
    kept = without_positions(tmap, sets.concept)
    assert len(kept) == len(tmap.input_ids) - 4
    assert kept[0] == tokenizer.bos_token_id and kept[-1] == tokenizer.eos_token_id
    assert tokenizer.convert_tokens_to_ids("japan</w>") not in kept


def test_prompt_too_long_is_refused(tokenizer):
    with pytest.raises(InvalidInput, match="at most 40"):
        map_words(tokenizer, " ".join(["flag of japan"] * 20))


# -- metrics -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("curve", "expected"),
    [(np.ones(25), 1.0), (np.linspace(0, 1, 25), 0.5), (np.linspace(0, 1, 2), 0.5), (np.linspace(1, 0, 7), 0.5), ([0.3], 0.3), (np.zeros(5), 0.0)],
)
def test_auc_known_curves(curve, expected):
    assert auc(curve) == pytest.approx(expected, abs=1e-12)


def test_auc_empty_curve():
    with pytest.raises(ValueError):
        auc([])


def test_mass_on_token_sets():
    mass = np.zeros((3, 5))  # (steps, tokens)
    mass[:, 1], mass[:, 2], mass[:, 4] = 0.5, 0.2, 0.3
    np.testing.assert_allclose(mass_on(mass, [1, 2]), [0.7, 0.7, 0.7])
    np.testing.assert_allclose(mass_on(mass, []), [0.0, 0.0, 0.0])
    np.testing.assert_allclose(mass_on(mass[None], [4]), [[0.3, 0.3, 0.3]])


# -- seeds, variants, config -------------------------------------------------------------------
@pytest.mark.parametrize(("spec", "seeds"), [("0-3", [0, 1, 2, 3]), ("0,2,5", [0, 2, 5]), ("7", [7]), (" 1 - 2 ", [1, 2]), ([4, 5], [4, 5])])
def test_parse_seeds(spec, seeds):
    assert parse_seeds(spec) == seeds


@pytest.mark.parametrize("spec", ["", "a-b", "3-1", "1,,x", "-4"])
def test_parse_seeds_rejects(spec):
    with pytest.raises(ValueError):
        parse_seeds(spec)


def test_parse_variants_names():
    variants = parse_variants(probe.default_variants_text() + "\n\nnote: do not draw {concept}\n{concept} in the rain\n")
    assert [v.name for v in variants] == ["baseline", "unlearning", "negation", "repeat", "note", "custom1"]
    assert variants[1].prompt(CONCEPT) == UNLEARN
    assert parse_variants(["a photo of {concept}"])[0].name == "baseline"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"concept": ""}, "concept is empty"),
        ({"concept": "   "}, "concept is empty"),
        ({"concept": "..."}, "no words"),
        ({"seeds": ""}, "seed"),
        ({"seeds": []}, "seed"),
        ({"steps": 0}, "steps"),
        ({"steps": 201}, "steps"),
        ({"steps": 2.5}, "whole number"),
        ({"guidance": float("nan")}, "guidance"),
        ({"guidance": -1}, "guidance"),
        ({"guidance": "x"}, "guidance"),
        ({"variants": ""}, "at least one"),
        ({"variants": "a: x {concept}\na: y {concept}"}, "unique"),
        ({"heatmap_resolution": 2}, "heatmap_resolution"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_probe_config_rejects(changes, message):
    with pytest.raises(InvalidInput, match=message):
        ProbeConfig(**changes)


def test_probe_config_defaults():
    config = ProbeConfig(seeds="0-1", steps=3.0)
    assert config.seeds == (0, 1) and config.steps == 3
    assert [v.name for v in config.variant_list] == ["baseline", "unlearning", "negation", "repeat"]
    assert config.anchor_prompt == "a photo of the flag of japan"
    json.dumps(config.to_dict())


# -- text side ---------------------------------------------------------------------------------
def test_text_analysis(tiny_text):
    prompts = {v.name: v.prompt(CONCEPT) for v in parse_variants(probe.DEFAULT_VARIANTS)}
    scores = probe.text_analysis(tiny_text.tokenizer, tiny_text.text_encoder, CONCEPT, "a photo of the flag of japan", prompts)
    assert scores["baseline"].cosine == pytest.approx(1.0, abs=1e-5)
    assert scores["baseline"].cosine_mean == pytest.approx(1.0, abs=1e-5)
    assert scores["baseline"].drop_without_instruction == pytest.approx(0.0, abs=1e-6)  # nothing to remove
    assert scores["repeat"].drop_without_instruction == pytest.approx(0.0, abs=1e-6)
    for s in scores.values():
        assert all(math.isfinite(x) for x in vars(s).values())
        assert -1.0 - 1e-5 <= s.cosine <= 1.0 + 1e-5


def test_encode_matches_pipeline_padding(tiny_text):
    """Our id sequences, padded, are what the pipeline's tokenizer call produces."""
    tok = tiny_text.tokenizer
    tmap = map_words(tok, UNLEARN)
    padded = tok(UNLEARN, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
    assert probe.padded(tok, tmap.input_ids, tok.model_max_length) == padded


def test_clip_unavailable_reports_reason(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    scorer, reason = probe.load_clip(str(tmp_path / "no-clip-here"))
    assert scorer is None and isinstance(reason, str) and reason


def test_clip_source_comes_from_the_settings(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    use_clip_setting(monkeypatch, str(tmp_path / "clip-from-settings"))
    scorer, reason = probe.load_clip()
    assert scorer is None and "clip-from-settings" in reason


def test_clip_failures_are_not_remembered(monkeypatch):
    from collections import OrderedDict

    from unlearn_core.probe import text

    calls = []

    def load(source):
        calls.append(source)
        if len(calls) == 1:
            raise text.ClipUnavailable("not there yet")
        return "scorer"

    monkeypatch.setattr(text, "_load_clip", load)
    monkeypatch.setattr(text, "_LOADED", OrderedDict())
    assert probe.load_clip("some/clip") == (None, "not there yet")
    assert probe.load_clip("some/clip") == ("scorer", None)  # tried again after a failure
    assert probe.load_clip("some/clip") == ("scorer", None) and len(calls) == 2  # a success is kept


def test_text_probe_refuses_unconditional_models():
    from tests.tiny import tiny_ddpm

    with pytest.raises(InvalidInput, match="text-to-image"):
        probe.text_encoder_of(wrap_pipeline(tiny_ddpm(), "tiny-ddpm", "cpu"))


# -- end to end on the demo model --------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_probe(tmp_path_factory):
    from diffusers import StableDiffusionPipeline

    mp = pytest.MonkeyPatch()
    use_clip_setting(mp, str(tmp_path_factory.mktemp("clip") / "missing"))
    mp.setenv("HF_HUB_OFFLINE", "1")
    model = wrap_pipeline(StableDiffusionPipeline.from_pretrained(str(DEMO)), str(DEMO), "cpu")
    out = tmp_path_factory.mktemp("probe")
    calls = []
    try:
        result = probe.run_probe(model, CONCEPT, seeds=[0], steps=2, out_dir=out, progress=lambda d, t: calls.append((d, t)))
    finally:
        mp.undo()
    return result, out, calls


def test_probe_writes_csv_and_figures(demo_probe):
    result, out, calls = demo_probe
    with open(out / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0].keys()) == CSV_COLUMNS
    assert [r["variant"] for r in rows] == ["baseline", "unlearning", "negation", "repeat"]
    assert all(r["seed"] == "0" and r["image_similarity"] == "" for r in rows)
    baseline = rows[0]
    assert float(baseline["text_cosine_tokens"]) == pytest.approx(1.0, abs=1e-5)
    assert float(baseline["text_cosine_pooled"]) == pytest.approx(1.0, abs=1e-5)
    for r in rows:
        assert 0.0 <= float(r["concept_auc"]) <= 1.0 and 0.0 <= float(r["instruction_auc"]) <= 1.0
    assert float(rows[1]["instruction_auc"]) > 0.0  # the unlearning prompt's instruction tokens are attended
    for name in ("similarity.png", "attention_mass.png", "images.png", "heatmaps_unlearning.png", "images/unlearning_seed0.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["image_similarity"] is None and summary["image_similarity_unavailable"]
    assert calls[-1] == (8, 8)  # 4 variants x 2 steps


def test_the_probe_concludes_in_one_line_from_its_own_numbers(demo_probe):
    """The conclusion names the least share of the baseline's attention on the concept that any
    variant keeps, as the run measured it."""
    result, _, _ = demo_probe
    base = np.mean(result.variants["baseline"].concept_auc)
    shares = {name: np.mean(v.concept_auc) / base for name, v in result.variants.items() if name != "baseline"}
    least = min(shares, key=shares.get)
    line = probe.conclusion(result)
    assert f"{shares[least]:.0%}" in line and least in line
    assert ("does not remove" in line) == (shares[least] >= 0.5)
    assert probe.summary_lines(result)[0] == line


def test_probe_attention_and_heatmaps(demo_probe):
    result, out, _ = demo_probe
    v = result.variants["unlearning"]
    assert v.concept_curves.shape == (1, 2) and v.heatmaps.shape == (2, len(v.tokens), 16, 16)
    assert np.all(v.token_mass.sum(axis=-1) <= 1.0 + 1e-5)
    assert result.image_similarity_reason and v.image_similarity is None
    choices = probe.token_choices(result, "unlearning")
    assert choices[0] == ("1: please (instruction)", 1)
    image = probe.heatmap_image(result, "unlearning", v.concept_positions[0], 1)
    assert image.mode == "RGB" and image.size[0] >= 400  # the variant's image under the map, plus a colour bar
    pixels = np.asarray(image)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100  # a picture, not a flat fill
    archive = probe.export_zip(result)
    names = set(zipfile.ZipFile(archive).namelist())
    assert {"results.csv", "summary.json", "attention_mass.png", "images/baseline_seed0.png"} <= names


def test_cli_probe(tmp_path, monkeypatch, capsys):
    use_clip_setting(monkeypatch, str(tmp_path / "missing-clip"))
    out = tmp_path / "cli"
    args = cli.parse_args(
        ["probe", "--model", str(DEMO), "--concept", CONCEPT, "--seeds", "0", "--steps", "1", "--out", str(out), "--no-default-variants", "--variant", "forget: forget {concept}"]
    )
    assert args.func is cli.cmd_probe
    assert cli.main(args) == 0
    rows = list(csv.DictReader(open(out / "results.csv", newline="")))
    assert [r["variant"] for r in rows] == ["forget"] and rows[0]["prompt"] == "forget the flag of japan"
    assert "forget" in capsys.readouterr().out


def test_cli_defaults():
    args = cli.parse_args(["probe", "--concept", "x", "--out", "o"])
    assert (args.model, args.seeds, args.steps, args.guidance, args.variant) == ("assets/demo-model", "0-3", 25, 5.0, None)


def test_cli_probe_bad_input_is_an_operator_error(tmp_path, capsys):
    args = cli.parse_args(["probe", "--concept", "...", "--out", str(tmp_path / "o")])
    assert cli.main(args) == 2
    assert "no words" in capsys.readouterr().err


# -- the UI tab builds -------------------------------------------------------------------------
def test_instruction_tab_renders():
    import gradio as gr

    from ui import instruction_tab

    with gr.Blocks() as demo:
        with gr.Tab("Instruction forgetting"):
            instruction_tab.render(gr.State("assets/demo-model"))
    ids = {getattr(block, "elem_id", None) for block in demo.blocks.values()}
    assert {"instr-run", "instr-gallery", "instr-table", "instr-heatmap", "instr-token", "instr-step", "instr-export"} <= ids
    assert "instr-model" not in ids  # the page's own model box serves this tab too
    with pytest.raises(gr.Error, match="concept"):
        instruction_tab._config("", "a photo of {concept}", "0", 2, 5.0)
    with pytest.raises(gr.Error, match="seeds"):
        instruction_tab._config("flag", "a photo of {concept}", "zero", 2, 5.0)
    with pytest.raises(gr.Error, match="Cannot load"):
        instruction_tab._load("/nonexistent/model/folder")
