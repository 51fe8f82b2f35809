"""What a run publishes: the kohya copy (loads at the trained strength in plain diffusers), the
Hub model card, the zip of the adapter folder, and a push that never takes the flagged images
unless asked."""

import zipfile

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image
from safetensors.torch import load_file

from unlearn_core.cache import GenerationCache
from unlearn_core.config import InstanceTarget, UnlearnConfig
from unlearn_core.errors import InvalidInput
from unlearn_core.export import adapter_zip, publishable_files, push_to_hub
from unlearn_core.models import load_model
from unlearn_core.run import run_unlearning
from unlearn_core.runfolder import RunFolder

PROMPT = "flag of japan"


@pytest.fixture(scope="module")
def trained(tiny_models, tmp_path_factory):
    """A tiny SD run with convolution LoRA layers and lora_alpha (8) ≠ rank (2)."""
    tmp = tmp_path_factory.mktemp("export")
    model = load_model(str(tiny_models["sd"]), "cpu")
    target = model.generate(PROMPT, [7], 3, 2.0)[0][0]
    Image.fromarray(255 - np.asarray(target)).save(tmp / "surrogate.png")
    config = UnlearnConfig(steps=3, batch_size=2, learning_rate=0.05, remember_count=2, eval_seeds=2, generation_steps=3, guidance_scale=2.0, lora_layers="all", lora_rank=2, lora_alpha=8.0,
                           review_seeds=[5, 7, 1001])  # 7 is the target and 1001 a remember seed: only 5 is checked as well
    run_unlearning(model, [InstanceTarget(PROMPT, 7, str(tmp / "surrogate.png"))], config, tmp / "run", cache=GenerationCache(tmp / "cache"))
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
