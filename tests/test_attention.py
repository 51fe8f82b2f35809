"""Attention capture on tiny real diffusers components (CPU, seconds)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from unlearn_core.attention import AttentionTracer, capture_attention, spatial_grid

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "assets" / "demo-model" / "tokenizer"


def tiny_pipeline():
    """diffusers' get_dummy_components(): UNet (4, 8), 2-layer CLIP text model, tiny VAE."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=2,
    )
    vae = AutoencoderKL(
        block_out_channels=(4, 8),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=2,
    )
    tokenizer = CLIPTokenizer.from_pretrained(str(TOKENIZER))
    text_config = CLIPTextConfig(
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
    text_encoder = CLIPTextModel(text_config)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


def _generate(pipe, seeds, **kwargs):
    return pipe(
        ["a photo of the flag of japan"] * len(seeds),
        num_inference_steps=3,
        guidance_scale=5.0,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        output_type="np",
        **kwargs,
    ).images


def test_cross_attention_rows_sum_to_one(pipe):
    tracer = AttentionTracer(heatmap_resolution=4, images_per_call=2, keep_raw=100)
    with capture_attention(pipe.unet, tracer):
        _generate(pipe, [0, 1], callback_on_step_end=tracer.step_callback)
    assert tracer.raw, "nothing captured"
    tokens = pipe.tokenizer.model_max_length
    for layer, probs in tracer.raw:
        assert "attn2" in layer
        assert probs.shape[0] == 2 and probs.shape[-1] == tokens  # conditional half of the CFG batch
        torch.testing.assert_close(probs.sum(dim=-1), torch.ones(probs.shape[:-1]), atol=1e-5, rtol=0)
    trace = tracer.trace()
    assert trace.mass.shape == (3, 2, tokens)  # steps from the callback, batch, tokens
    torch.testing.assert_close(trace.mass.sum(dim=-1), torch.ones(3, 2), atol=1e-5, rtol=0)
    assert trace.heatmaps.shape == (3, 2, tokens, 4, 4)
    assert torch.all(trace.text_share == 1)
    assert len(trace.timesteps) == 3


def test_capture_changes_nothing(pipe):
    plain = _generate(pipe, [3, 4])
    tracer = AttentionTracer(images_per_call=2)
    with capture_attention(pipe.unet, tracer):
        captured = _generate(pipe, [3, 4], callback_on_step_end=tracer.step_callback)
    np.testing.assert_allclose(captured, plain, atol=1e-4, rtol=0)
    assert np.abs(captured[0] - captured[1]).max() > 1e-3  # different seeds, different images


def test_processors_restored(pipe):
    before = pipe.unet.attn_processors
    with capture_attention(pipe.unet) as tracer:
        during = pipe.unet.attn_processors
        assert any(type(p).__name__ == "CrossAttentionCaptureProcessor" for p in during.values())
        assert all(type(p).__name__ != "CrossAttentionCaptureProcessor" for k, p in during.items() if "attn1" in k)
    after = pipe.unet.attn_processors
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert isinstance(tracer, AttentionTracer)


def test_processors_restored_after_exception(pipe):
    before = pipe.unet.attn_processors
    with pytest.raises(RuntimeError, match="boom"):
        with capture_attention(pipe.unet):
            raise RuntimeError("boom")
    after = pipe.unet.attn_processors
    assert all(after[k] is before[k] for k in before)


def test_model_without_cross_attention_is_refused():
    from diffusers import UNet2DModel

    unet = UNet2DModel(sample_size=8, block_out_channels=(4, 8), layers_per_block=1, norm_num_groups=2, down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    with pytest.raises(ValueError, match="attention"):
        with capture_attention(unet):
            pass


@pytest.mark.parametrize(("queries", "aspect", "expected"), [(256, 1.0, (16, 16)), (64, 1.0, (8, 8)), (32, 2.0, (4, 8)), (7, 1.0, None)])
def test_spatial_grid(queries, aspect, expected):
    assert spatial_grid(queries, aspect) == expected


def test_sd3_joint_attention_capture():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(
        sample_size=8,
        patch_size=1,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
    ).eval()
    inputs = dict(
        hidden_states=torch.randn(2, 4, 8, 8),
        encoder_hidden_states=torch.randn(2, 7, 32),
        pooled_projections=torch.randn(2, 64),
        timestep=torch.tensor([500, 500]),
    )
    before = model.attn_processors
    with torch.no_grad():
        plain = model(**inputs).sample
        tracer = AttentionTracer(heatmap_resolution=4, keep_raw=10)
        with capture_attention(model, tracer):
            captured = model(**inputs).sample
    torch.testing.assert_close(captured, plain, atol=1e-4, rtol=1e-4)
    assert all(model.attn_processors[k] is before[k] for k in before)
    full = [p for name, p in tracer.raw if name.endswith(":full")]
    blocks = [p for name, p in tracer.raw if not name.endswith(":full")]
    assert full and blocks
    torch.testing.assert_close(full[0].sum(-1), torch.ones(full[0].shape[:-1]), atol=1e-5, rtol=0)  # over image + text keys
    assert full[0].shape[-1] == 64 + 7
    assert blocks[0].shape == (2, 4, 64, 7)  # image query -> text key, renormalised
    torch.testing.assert_close(blocks[0].sum(-1), torch.ones(2, 4, 64), atol=1e-5, rtol=0)
    trace = tracer.trace()
    assert trace.mass.shape == (1, 2, 7) and trace.heatmaps.shape == (1, 2, 7, 4, 4)
    assert torch.all((trace.text_share > 0) & (trace.text_share < 1))
