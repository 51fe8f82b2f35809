"""What a run publishes: the kohya copy (loads at the trained strength in plain diffusers, labelled
for its base model as kohya sd-scripts labels it), SD3's interchange copy (alpha folded in), the
Hub model card, the zip of the adapter folder, and a push that never takes the flagged images
unless asked."""

import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from unlearn_core.cache import GenerationCache
from unlearn_core.config import InstanceTarget, UnlearnConfig
from unlearn_core.errors import InvalidInput
from unlearn_core.export import adapter_zip, publishable_files, push_to_hub, save_kohya
from unlearn_core.models import load_model, wrap_pipeline
from unlearn_core.run import run_unlearning
from unlearn_core.runfolder import RunFolder

PROMPT = "flag of japan"
KOHYA_KEY = re.compile(r"lora_unet_\w+\.(lora_down\.weight|lora_up\.weight|alpha)")


def tiny_sd2(prediction_type: str = "epsilon"):
    """SD2's shape in miniature: the tiny SD pipeline with a text encoder as wide as SD2's OpenCLIP
    ViT-H (1024) and a UNet that cross-attends to it through linear projections, as SD2's does."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from tests.tiny import tiny_sd

    pipe = tiny_sd(prediction_type)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**{**pipe.unet.config, "cross_attention_dim": 1024, "use_linear_projection": True})
    text_encoder = CLIPTextModel(CLIPTextConfig(**{**pipe.text_encoder.config.to_dict(), "hidden_size": 1024, "num_hidden_layers": 1}))
    return StableDiffusionPipeline(**{**pipe.components, "unet": unet, "text_encoder": text_encoder}, requires_safety_checker=False)


def a1111_version(metadata: dict) -> str:
    """How AUTOMATIC1111 files a LoRA (extensions-builtin/Lora/network.py, `detect_version`)."""
    if metadata.get("ss_base_model_version", "").startswith("sdxl_"):
        return "SDXL"
    return "SD2" if metadata.get("ss_v2") == "True" else "SD1" if metadata else "Unknown"


def short_run(model, tmp: Path, evaluate_after: bool, **settings):
    """A 3-step run in tmp/run on seed 7's inverted image, with convolution LoRA layers and
    lora_alpha (8) ≠ rank (2); returns the model, carrying the adapter."""
    target = model.generate(PROMPT, [7], 3, 2.0)[0][0]
    Image.fromarray(255 - np.asarray(target)).save(tmp / "surrogate.png")
    config = UnlearnConfig(steps=3, batch_size=2, learning_rate=0.05, remember_count=2, generation_steps=3, guidance_scale=2.0, lora_layers="all", lora_rank=2, lora_alpha=8.0, **settings)
    run_unlearning(model, [InstanceTarget(PROMPT, 7, str(tmp / "surrogate.png"))], config, tmp / "run", cache=GenerationCache(tmp / "cache"), evaluate_after=evaluate_after)
    return model


@pytest.fixture(scope="module")
def trained(tiny_models, tmp_path_factory):
    """A tiny SD run with convolution LoRA layers and lora_alpha (8) ≠ rank (2)."""
    tmp = tmp_path_factory.mktemp("export")
    model = short_run(load_model(str(tiny_models["sd"]), "cpu"), tmp, evaluate_after=True, eval_seeds=2,
                      review_seeds=[5, 7, 1001])  # 7 is the target and 1001 a remember seed: only 5 is checked as well
    output = np.asarray(model.generate(PROMPT, [7], 3, 2.0)[0][0], dtype=np.int16)
    return RunFolder(tmp / "run"), output


def test_the_operators_own_seeds_are_checked_first(trained):
    folder, _ = trained
    integrity = folder.read_metrics()["integrity"][PROMPT]
    assert integrity["your_seeds"] == [5] and integrity["seeds"][0] == 5 and len(integrity["seeds"]) == 3
    assert 7 not in integrity["seeds"] and 1001 not in integrity["seeds"]


def test_kohya_file_has_the_adapters_alpha_and_reloads_exactly(trained, tiny_models):
    from diffusers import DiffusionPipeline

    folder, output = trained
    state = load_file(str(folder.kohya_weights))
    modules = {key.split(".")[0] for key in state if ".lora_down." in key}
    alphas = {key.split(".")[0]: float(value) for key, value in state.items() if key.endswith(".alpha")}
    assert modules and set(alphas) == modules, "one .alpha per module"
    assert set(alphas.values()) == {8.0}, "the adapter's lora_alpha, not the rank diffusers' converter writes"
    assert all(key.startswith("lora_unet_") for key in state)
    pipe = DiffusionPipeline.from_pretrained(str(tiny_models["sd"]))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(folder.path), weight_name=folder.kohya_weights.name)
    reloaded = np.asarray(pipe(PROMPT, num_inference_steps=3, guidance_scale=2.0, generator=torch.Generator().manual_seed(7)).images[0], dtype=np.int16)
    assert np.abs(reloaded - output).max() <= 1


def test_the_default_decoder_adapter_reloads_exactly_from_both_files(tiny_models, tmp_path):
    """The default placement (the U-Net's up blocks, a regex target) touches no down or mid block and
    loads in plain diffusers from the diffusers file and from the kohya file, giving the trained output."""
    from diffusers import DiffusionPipeline

    model = load_model(str(tiny_models["sd"]), "cpu")
    target = model.generate(PROMPT, [7], 3, 2.0)[0][0]
    Image.fromarray(255 - np.asarray(target)).save(tmp_path / "surrogate.png")
    config = UnlearnConfig(steps=3, batch_size=2, learning_rate=0.05, remember_count=2, eval_seeds=1, generation_steps=3, guidance_scale=2.0, lora_rank=2)
    assert config.lora_layers == "decoder"
    run_unlearning(model, [InstanceTarget(PROMPT, 7, str(tmp_path / "surrogate.png"))], config, tmp_path / "run", cache=GenerationCache(tmp_path / "cache"))
    folder = RunFolder(tmp_path / "run")
    trained = np.asarray(model.generate(PROMPT, [7], 3, 2.0)[0][0], dtype=np.int16)
    modules = {key.split(".lora")[0] for key in load_file(str(folder.adapter_weights()))}
    assert modules and all(".up_blocks." in f".{name}" for name in modules), sorted(modules)[:3]
    assert any("conv1" in name for name in modules) and any("to_q" in name for name in modules)
    for weight_name in (folder.adapter_weights().name, folder.kohya_weights.name):
        pipe = DiffusionPipeline.from_pretrained(str(tiny_models["sd"]))
        pipe.set_progress_bar_config(disable=True)
        pipe.load_lora_weights(str(folder.path), weight_name=weight_name)
        reloaded = np.asarray(pipe(PROMPT, num_inference_steps=3, guidance_scale=2.0, generator=torch.Generator().manual_seed(7)).images[0], dtype=np.int16)
        assert np.abs(reloaded - trained).max() <= 1, weight_name


def test_model_card_has_hub_front_matter_and_no_flagged_image(trained, tiny_models):
    folder, _ = trained
    card = ModelCard.load(folder.model_card)
    assert {"lora", "diffusers", "text-to-image"} <= set(card.data.tags)
    assert card.data.license and card.data.library_name == "diffusers"
    assert "seed 7" in card.text and "load_lora_weights" in card.text and "lora_kohya.safetensors" in card.text
    assert "lora_interchange" not in card.text, "a UNet family gets the kohya copy, not the interchange one"
    assert "target_0.png" not in card.content and "surrogate_0.png" not in card.content
    assert str(tiny_models["sd"]) not in card.content and "<the base model's folder>" in card.text, "the trained-on folder is a server path: never in a published card"


def test_zip_and_push_leave_the_flagged_images_out_unless_asked(trained, tmp_path):
    folder, _ = trained
    names = {path.name for path in publishable_files(folder)}
    assert names == {"pytorch_lora_weights.safetensors", "adapter_card.json", "lora_kohya.safetensors", "README.md"}
    with zipfile.ZipFile(adapter_zip(folder, tmp_path / "adapter.zip")) as archive:
        assert set(archive.namelist()) == names
    assert {"target_0.png", "surrogate_0.png"} <= {path.name for path in publishable_files(folder, include_images=True)}
    with pytest.raises(InvalidInput, match="not a repository id"):
        push_to_hub(folder, "not a repo id!", token="x")
    with pytest.raises(InvalidInput, match="could not push"):  # no Hub here (or a bad token where there is one): a plain message
        push_to_hub(folder, "someone/hotfix-test", token="hf_invalid")


@pytest.mark.parametrize("kind, labels", [
    ("sd", {"ss_v2": "False", "ss_base_model_version": "sd_v1", "modelspec.architecture": "stable-diffusion-v1/lora", "modelspec.prediction_type": "epsilon", "A1111": "SD1"}),
    ("sd-v", {"ss_v2": "False", "ss_base_model_version": "sd_v1_v", "modelspec.architecture": "stable-diffusion-v1/lora", "modelspec.prediction_type": "v", "A1111": "SD1"}),
    ("sd2", {"ss_v2": "True", "ss_base_model_version": "sd_v2", "modelspec.architecture": "stable-diffusion-v2-512/lora", "modelspec.prediction_type": "epsilon", "A1111": "SD2"}),
    ("sd2-v", {"ss_v2": "True", "ss_base_model_version": "sd_v2_v", "modelspec.architecture": "stable-diffusion-v2-768-v/lora", "modelspec.prediction_type": "v", "A1111": "SD2"}),
    ("sdxl", {"ss_v2": "False", "ss_base_model_version": "sdxl_base_v1-0", "modelspec.architecture": "stable-diffusion-xl-v1-base/lora", "modelspec.prediction_type": "epsilon", "A1111": "SDXL"}),
])
def test_kohya_file_carries_sd_scripts_labels_for_its_base_model(kind, labels, tiny_models, tmp_path):
    """The values kohya sd-scripts writes for the same base (so AUTOMATIC1111 files the LoRA under
    the right model), and keys in kohya's naming with one `.alpha` per module."""
    model = wrap_pipeline(tiny_sd2("v_prediction" if kind == "sd2-v" else "epsilon"), "tiny-sd2", "cpu") if kind.startswith("sd2") else load_model(str(tiny_models[kind]), "cpu")
    model.add_lora(2, 8.0, "all")
    folder = RunFolder(tmp_path / "run").create()
    assert save_kohya(model, folder) == [folder.kohya_weights.name]
    with safe_open(str(folder.kohya_weights), "pt") as handle:
        metadata, keys = handle.metadata(), list(handle.keys())
    expected = {key: value for key, value in labels.items() if key != "A1111"}
    assert {key: metadata.get(key) for key in expected} == expected
    assert a1111_version(metadata) == labels["A1111"]
    assert metadata["ss_network_module"] == "networks.lora" and metadata["ss_network_dim"] == "2" and metadata["ss_network_alpha"] == "8.0"
    assert metadata["modelspec.sai_model_spec"] == "1.0.1" and metadata["modelspec.title"] and re.fullmatch(r"\d+x\d+", metadata["modelspec.resolution"])
    assert keys and all(KOHYA_KEY.fullmatch(key) for key in keys), [key for key in keys if not KOHYA_KEY.fullmatch(key)][:3]
    modules = {key.split(".")[0] for key in keys}
    assert set(keys) == {f"{module}.{suffix}" for module in modules for suffix in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert not folder.interchange_weights.exists()


@pytest.fixture(scope="module")
def trained_sd3(tiny_models, tmp_path_factory):
    """A tiny SD3 run with lora_alpha (8) ≠ rank (2): diffusers' file carries the scale only as metadata."""
    tmp = tmp_path_factory.mktemp("export-sd3")
    model = short_run(load_model(str(tiny_models["sd3"]), "cpu"), tmp, evaluate_after=False, eval_seeds=1)
    return RunFolder(tmp / "run"), model


def _sd3_output(pipe) -> np.ndarray:
    return pipe(PROMPT, num_inference_steps=3, guidance_scale=2.0, generator=torch.Generator().manual_seed(7), output_type="np").images[0]


def test_sd3_interchange_file_loads_at_the_trained_strength(trained_sd3, tiny_models):
    """alpha / rank folded into lora_B, no alpha anywhere in the file: a fresh pipeline that loads it
    with `load_lora_weights` gives the trained adapter's output (as would a loader that ignores alpha)."""
    from diffusers import DiffusionPipeline

    folder, model = trained_sd3
    assert folder.interchange_weights.is_file() and not folder.kohya_weights.exists()
    with safe_open(str(folder.interchange_weights), "pt") as handle:
        assert "lora_adapter_metadata" not in (handle.metadata() or {}), "diffusers would apply alpha a second time"
    folded, plain = load_file(str(folder.interchange_weights)), load_file(str(folder.adapter_weights()))
    assert set(folded) == set(plain) and all(key.startswith("transformer.") and key.endswith((".lora_A.weight", ".lora_B.weight")) for key in folded)
    for key in folded:
        torch.testing.assert_close(folded[key], plain[key] * (4.0 if ".lora_B." in key else 1.0), rtol=0, atol=0)
    trained = _sd3_output(model.pipe)
    pipe = DiffusionPipeline.from_pretrained(str(tiny_models["sd3"]), text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    base = _sd3_output(pipe)
    pipe.load_lora_weights(str(folder.path), weight_name=folder.interchange_weights.name)
    assert np.abs(trained - base).max() > 1e-3, "the adapter changes the output: the comparison can fail"
    np.testing.assert_allclose(_sd3_output(pipe), trained, rtol=0, atol=1e-5)


def test_sd3_publishes_the_interchange_file_and_its_card_names_it(trained_sd3):
    folder, _ = trained_sd3
    assert {path.name for path in publishable_files(folder)} == {"pytorch_lora_weights.safetensors", "adapter_card.json", "lora_interchange.safetensors", "README.md"}
    text = ModelCard.load(folder.model_card).text
    assert "lora_interchange.safetensors" in text and "lora_kohya" not in text
    assert "lora_interchange.safetensors" in folder.read_card()["adapter_files"]
