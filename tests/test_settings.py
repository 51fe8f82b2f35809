"""Settings read once from the environment, and the loading options they carry (precision, T5,
device), plus the plain message for a gated or unreachable Hub model."""

import pytest
import torch

from unlearn_core.errors import ModelLoadError
from unlearn_core.models import load_model, pick_device, resolve_dtype
from unlearn_core.settings import Settings


def test_host_and_port_follow_gradio_unless_hotfix_names_them():
    assert (Settings.from_env({}).host, Settings.from_env({}).port) == ("127.0.0.1", 7860)
    space = Settings.from_env({"GRADIO_SERVER_NAME": "0.0.0.0", "GRADIO_SERVER_PORT": "7861"})
    assert (space.host, space.port) == ("0.0.0.0", 7861)
    explicit = Settings.from_env({"GRADIO_SERVER_NAME": "0.0.0.0", "HOTFIX_HOST": "127.0.0.1", "HOTFIX_PORT": "9000"})
    assert (explicit.host, explicit.port) == ("127.0.0.1", 9000)


def test_loading_options_and_zero_gpu_come_from_the_environment():
    settings = Settings.from_env({"HOTFIX_DTYPE": "bf16", "HOTFIX_NO_T5": "1", "SPACES_ZERO_GPU": "true", "HOTFIX_MODEL_ALLOWLIST": "a/b, c"})
    assert (settings.dtype, settings.without_t5, settings.zero_gpu, settings.model_allowlist) == ("bf16", True, True, ("a/b", "c"))
    with pytest.raises(ValueError, match="HOTFIX_DTYPE"):
        Settings.from_env({"HOTFIX_DTYPE": "fp8"})
    assert Settings.from_env({}).warm_worker and not Settings.from_env({"HOTFIX_WARM_WORKER": "0"}).warm_worker
    assert Settings.from_env({}).gpu_slot_s == 120 and Settings.from_env({"HOTFIX_GPU_SLOT_S": "90"}).gpu_slot_s == 90
    with pytest.raises(ValueError, match="HOTFIX_GPU_SLOT_S"):
        Settings.from_env({"HOTFIX_GPU_SLOT_S": "5"})


def test_the_server_s_token_pushes_from_the_web_only_on_loopback_and_opted_in():
    assert not Settings.from_env({}).web_pushes_with_server_token
    assert not Settings.from_env({"HOTFIX_HOST": "0.0.0.0", "HOTFIX_PUSH_WITH_SERVER_TOKEN": "1"}).web_pushes_with_server_token
    assert Settings.from_env({"HOTFIX_PUSH_WITH_SERVER_TOKEN": "1"}).web_pushes_with_server_token
    assert not Settings.from_env({}).requires_sign_in and Settings.from_env({"HOTFIX_REQUIRE_SIGN_IN": "1"}).requires_sign_in


def test_auto_precision_is_full_on_the_cpu_and_half_on_request(tiny_models):
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("fp16", torch.device("cpu")) == torch.float16
    assert resolve_dtype("auto", torch.device("cuda")) in (torch.float16, torch.bfloat16)  # needs no GPU to decide
    assert resolve_dtype("auto", torch.device("cuda"), demo=True) == torch.float32  # the demo model draws other images in half precision
    assert resolve_dtype("bf16", torch.device("cuda"), demo=True) == torch.bfloat16  # unless asked for
    assert pick_device("auto").type in ("cuda", "mps", "cpu")
    model = load_model(str(tiny_models["sd"]), "cpu", dtype="bf16")
    assert model.denoiser.dtype == torch.bfloat16 and model.pipe.text_encoder.dtype == torch.bfloat16
    assert load_model(str(tiny_models["sd"]), "cpu").denoiser.dtype == torch.float32


def test_sd3_without_t5_from_the_settings(tiny_models, monkeypatch):
    from unlearn_core import settings

    monkeypatch.setenv("HOTFIX_NO_T5", "1")
    settings.forget()
    assert load_model(str(tiny_models["sd3"]), "cpu").pipe.text_encoder_3 is None


def test_unreachable_hub_model_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as refused:
        load_model("someone/not-downloaded-model", "cpu")
    assert "cannot be reached" in str(refused.value) or "no model" in str(refused.value)


def test_gated_model_says_accept_the_licence_and_set_hf_token():
    import httpx2  # huggingface_hub's HTTP client: its errors carry the response
    from huggingface_hub.errors import GatedRepoError

    from unlearn_core.models import _hub_reason

    response = httpx2.Response(401, request=httpx2.Request("GET", "https://huggingface.co/api/models/x"))
    try:
        try:
            raise GatedRepoError("401 gated", response=response)
        except GatedRepoError as gated:
            raise OSError("diffusers could not fetch model_index.json") from gated
    except OSError as error:
        reason = _hub_reason(error, "stabilityai/stable-diffusion-3-medium-diffusers")
    assert "accept its licence" in reason and "HF_TOKEN" in reason


def test_review_seeds_are_checked_like_seeds():
    from unlearn_core.config import UnlearnConfig
    from unlearn_core.errors import InvalidInput

    assert UnlearnConfig(review_seeds=[36, 37.0, 36]).review_seeds == [36, 37]
    for bad in ([-1], ["forty"], list(range(65)), "36-43"):
        with pytest.raises(InvalidInput, match="review_seeds"):
            UnlearnConfig(review_seeds=bad)


def test_a_checkpoint_saved_in_half_precision_loads_in_full_on_the_cpu(tiny_models, tmp_path):
    """Many Hub checkpoints are saved in fp16: `auto` (fp32 on the CPU) must cast every component, or the
    text encoder stays fp16 beside fp32 parts and the first prompt fails."""
    load_model(str(tiny_models["sd"]), "cpu").pipe.to(torch.float16).save_pretrained(tmp_path / "fp16")
    model = load_model(str(tmp_path / "fp16"), "cpu")
    assert model.pipe.text_encoder.dtype == model.denoiser.dtype == model.pipe.vae.dtype == torch.float32
    assert model.generate("flag of japan", [1], 2, 2.0)[0][0].size == model.image_size
