"""Each family: a short unlearning run that changes the LoRA, writes the run folder, and whose
adapter loads in plain diffusers (or peft for UNet2DModel) and changes the target seed's output."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from unlearn_core.cache import GenerationCache, model_fingerprint
from unlearn_core.config import InstanceTarget, UnlearnConfig
from unlearn_core.models import load_model
from unlearn_core.run import run_unlearning

PROMPT = "flag of japan"
FAMILIES = ["sd", "sd-v", "sd3", "sdxl", "ddpm"]


def _config(**overrides) -> UnlearnConfig:
    values = dict(steps=3, batch_size=2, learning_rate=0.05, remember_count=2, eval_seeds=2, generation_steps=3, guidance_scale=2.0, checkpoint_every=2)
    values.update(overrides)
    return UnlearnConfig(**values)


def _run(kind, tiny_models, cache_dir, tmp_path, **overrides):
    model = load_model(str(tiny_models[kind]), "cpu")
    target = model.generate(PROMPT, [7], 3, 2.0)[0][0]
    surrogate = Image.fromarray(255 - np.asarray(target))  # inverted colours: a clearly different image
    surrogate_path = tmp_path / "surrogate.png"
    surrogate.save(surrogate_path)
    run_dir = tmp_path / "run"
    result = run_unlearning(model, [InstanceTarget(PROMPT, 7, str(surrogate_path))], _config(**overrides), run_dir, cache=GenerationCache(cache_dir))
    return model, target, run_dir, result


@pytest.mark.parametrize("kind", FAMILIES)
def test_unlearning_run_writes_folder_and_changes_lora(kind, tiny_models, cache_dir, tmp_path):
    model, target, run_dir, result = _run(kind, tiny_models, cache_dir, tmp_path)
    for name in ("config.json", "target_0.png", "surrogate_0.png", "loss_log.csv", "metrics.json", "before_after.png", "adapter_card.json"):
        assert (run_dir / name).is_file(), name
    assert not (run_dir / "checkpoint.pt").exists(), "the checkpoint is removed once the run is complete"
    weights_file = run_dir / ("adapter_model.safetensors" if kind == "ddpm" else "pytorch_lora_weights.safetensors")
    weights = load_file(str(weights_file))
    lora_b = [v for k, v in weights.items() if "lora_B" in k or "lora.up" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b), "LoRA B starts at zero; training must move it"
    if kind != "ddpm":  # diffusers' save_lora_weights stores the LoraConfig in the safetensors header
        with safe_open(str(weights_file), "pt") as handle:
            assert "lora_adapter_metadata" in (handle.metadata() or {})
    card = json.loads((run_dir / "adapter_card.json").read_text())
    assert card["targets"][0]["seed"] == 7 and card["base_model"] == str(tiny_models[kind])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["targets"][0]["after_vs_target"]["ssim"]["available"] is True
    forgetting = metrics["forgetting"]
    assert forgetting["verdict"] in ("fixed", "partly fixed", "not fixed") and isinstance(forgetting["toward_surrogate"], float)
    assert forgetting["verdict"] == ("fixed" if forgetting["toward_surrogate"] >= 0.7 else "partly fixed" if forgetting["toward_surrogate"] >= 0.3 else "not fixed")
    log_lines = (run_dir / "loss_log.csv").read_text().strip().splitlines()
    assert len(log_lines) == 1 + 3


@pytest.mark.parametrize("kind", ["sd", "sd3", "sdxl"])
def test_adapter_loads_in_plain_diffusers_and_changes_target_seed(kind, tiny_models, cache_dir, tmp_path):
    from diffusers import DiffusionPipeline

    _, _, run_dir, _ = _run(kind, tiny_models, cache_dir, tmp_path)
    without_t5 = {"text_encoder_3": None, "tokenizer_3": None} if kind == "sd3" else {}
    pipe = DiffusionPipeline.from_pretrained(str(tiny_models[kind]), **without_t5)
    pipe.set_progress_bar_config(disable=True)

    def target_seed_output():
        return pipe(PROMPT, num_inference_steps=3, guidance_scale=2.0, generator=torch.Generator().manual_seed(7), output_type="np").images[0]

    before = target_seed_output()
    pipe.load_lora_weights(str(run_dir))
    after = target_seed_output()
    assert np.abs(after - before).max() > 1e-3


@pytest.mark.parametrize("kind", ["sd", "sd3", "sdxl"])
def test_plain_diffusers_reproduces_the_trained_adapter_exactly(kind, tiny_models, cache_dir, tmp_path):
    """Convolution LoRA layers and lora_alpha ≠ rank survive save → load_lora_weights unchanged."""
    from diffusers import DiffusionPipeline

    model, _, run_dir, _ = _run(kind, tiny_models, cache_dir, tmp_path, lora_layers="all", lora_rank=2, lora_alpha=8.0)
    trained = np.asarray(model.generate(PROMPT, [7], 3, 2.0)[0][0], dtype=np.int16)
    without_t5 = {"text_encoder_3": None, "tokenizer_3": None} if kind == "sd3" else {}
    pipe = DiffusionPipeline.from_pretrained(str(tiny_models[kind]), **without_t5)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(run_dir))
    reloaded = np.asarray(pipe(PROMPT, num_inference_steps=3, guidance_scale=2.0, generator=torch.Generator().manual_seed(7)).images[0], dtype=np.int16)
    assert np.abs(trained - reloaded).max() <= 1


def test_ddpm_adapter_loads_with_plain_peft(tiny_models, cache_dir, tmp_path):
    from diffusers import UNet2DModel
    from peft import PeftModel

    _, _, run_dir, _ = _run("ddpm", tiny_models, cache_dir, tmp_path)
    unet = UNet2DModel.from_pretrained(str(tiny_models["ddpm"]), subfolder="unet")
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = unet(x, 500).sample
        peft_unet = PeftModel.from_pretrained(unet, str(run_dir))
        after = peft_unet(x, 500).sample
    assert (after - before).abs().max() > 1e-4


@pytest.mark.parametrize("kind", ["sd", "sdxl", "ddpm"])
def test_adapter_loads_back_into_our_model(kind, tiny_models, cache_dir, tmp_path):
    _, _, run_dir, _ = _run(kind, tiny_models, cache_dir, tmp_path)
    model = load_model(str(tiny_models[kind]), "cpu")
    base = np.asarray(model.generate(PROMPT, [7], 3, 2.0)[0][0], dtype=np.int16)
    model.load_lora(run_dir)
    after = np.asarray(model.generate(PROMPT, [7], 3, 2.0)[0][0], dtype=np.int16)
    with model.adapter_disabled():
        again = np.asarray(model.generate(PROMPT, [7], 3, 2.0)[0][0], dtype=np.int16)
    assert np.abs(after - base).max() > 0
    assert np.array_equal(again, base), "disabling the adapter gives the base model back exactly"


@pytest.mark.parametrize("method", ["neggrad", "siss", "erasediff"])
def test_baselines_train_on_the_same_trainer(method, tiny_models, cache_dir, tmp_path):
    _, _, run_dir, result = _run("sd", tiny_models, cache_dir, tmp_path, method=method)
    assert (run_dir / "pytorch_lora_weights.safetensors").is_file()
    assert len(result["summary"]) > 0


def test_same_seed_same_image_regardless_of_batch(tiny_models):
    model = load_model(str(tiny_models["sd"]), "cpu")
    alone = model.generate(PROMPT, [3], 3, 2.0)[0][0]
    in_batch = model.generate(PROMPT, [1, 3, 5], 3, 2.0)[1]
    assert in_batch[1].seed == 3 and in_batch[1].prompt == PROMPT and in_batch[1].scheduler == "DDIMScheduler"
    assert np.array_equal(np.asarray(alone), np.asarray(in_batch[0]))


def test_several_targets_in_one_run(tiny_models, cache_dir, tmp_path):
    model = load_model(str(tiny_models["sd"]), "cpu")
    paths = []
    for seed in (1, 2):
        image = model.generate(PROMPT, [seed], 3, 2.0)[0][0]
        path = tmp_path / f"s{seed}.png"
        Image.fromarray(255 - np.asarray(image)).save(path)
        paths.append(InstanceTarget(PROMPT, seed, str(path)))
    result = run_unlearning(model, paths, _config(), tmp_path / "run", cache=GenerationCache(cache_dir))
    assert len(result["metrics"]["targets"]) == 2
    assert (tmp_path / "run" / "target_1.png").is_file()


@pytest.mark.parametrize("kind", ["sd", "sd3", "sdxl"])
def test_initial_noise_is_the_pipelines_own_draw(kind, tiny_models):
    """Seed-anchored forget noise relies on this: latents=initial_noise(seed) ≡ generator=seed."""
    model = load_model(str(tiny_models[kind]), "cpu")
    by_seed = model.pipe(PROMPT, num_inference_steps=3, guidance_scale=2.0, generator=torch.Generator().manual_seed(11), output_type="np").images[0]
    by_latents = model.pipe(PROMPT, num_inference_steps=3, guidance_scale=2.0, latents=model.initial_noise([11]), output_type="np").images[0]
    np.testing.assert_allclose(by_seed, by_latents, atol=1e-6)


@pytest.mark.parametrize("kind", ["sd", "sd3", "sdxl", "ddpm"])
def test_half_precision_weights_train_as_a_gpu_loads_them(kind, tiny_models, cache_dir, tmp_path):
    """On a CUDA GPU `load_model` picks bf16 weights by default; a job must train with them (the
    recorded states and conditioning are fp32) and keep its cache apart from the fp32 model's."""
    model = load_model(str(tiny_models[kind]), "cpu", dtype="bf16")
    assert model.denoiser.dtype == torch.bfloat16
    target = model.generate(PROMPT, [7], 3, 2.0)[0][0]
    surrogate_path = tmp_path / "surrogate.png"
    Image.fromarray(255 - np.asarray(target)).save(surrogate_path)
    result = run_unlearning(model, [InstanceTarget(PROMPT, 7, str(surrogate_path))], _config(), tmp_path / "run", cache=GenerationCache(cache_dir))
    log = (tmp_path / "run" / "loss_log.csv").read_text().strip().splitlines()
    assert len(log) == 1 + 3 and "nan" not in "".join(log[1:])
    assert any(p.abs().sum() > 0 for n, p in model.denoiser.named_parameters() if "lora_B" in n)
    assert result["metrics"]["forgetting"]["verdict"] in ("fixed", "partly fixed", "not fixed")
    assert model.weights_dtype == torch.bfloat16, "the job (its SDEdit probe too) keeps the weights' precision"
    full = load_model(str(tiny_models[kind]), "cpu")
    assert model_fingerprint(full) != model_fingerprint(model)


@pytest.mark.parametrize("kind", ["sd", "sd3", "ddpm"])
def test_sampling_folds_the_lora_in_and_puts_the_frozen_weights_back(kind, tiny_models):
    """`generate` on the CPU folds the LoRA into the weights for the sample (`lora_merged`): the
    images are the unfolded adapter's, a disabled adapter stays out, and the frozen weights come
    back bit for bit (distillation learns from them at every later step)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = load_model(str(tiny_models[kind]), "cpu")
    base = np.asarray(model.generate(PROMPT, [5], 3, 2.0)[0][0], dtype=int)
    model.add_lora(4, 4.0, "attention")
    with torch.no_grad():
        for name, parameter in model.denoiser.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.3)
    weights = {name: parameter.detach().clone() for name, parameter in model.denoiser.named_parameters()}
    unfolded = np.asarray(model._generate_batch(PROMPT, [5], 3, 2.0)[0], dtype=int)
    folded = np.asarray(model.generate(PROMPT, [5], 3, 2.0)[0][0], dtype=int)
    assert np.abs(unfolded - base).mean() > 1  # the adapter changes the image, so a dropped adapter would show
    assert np.abs(folded - unfolded).max() <= 2  # rounding only
    assert all(torch.equal(weights[name], parameter) for name, parameter in model.denoiser.named_parameters())
    assert not any(layer.merged for layer in model.denoiser.modules() if isinstance(layer, BaseTunerLayer))
    with model.adapter_disabled():
        assert np.array_equal(np.asarray(model.generate(PROMPT, [5], 3, 2.0)[0][0], dtype=int), base)
