"""Configs of the demo model's components (a small Stable-Diffusion-shaped model of flags)."""

from __future__ import annotations

from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

IMAGE_SIZE = 64
LATENT_SIZE = 16
MODEL_MAX_LENGTH = 40


def build_vae() -> AutoencoderKL:
    """A 4× downsampling KL autoencoder: 64×64×3 images ↔ 16×16×4 latents."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=IMAGE_SIZE,
    )


def build_text_encoder(vocab_size: int, eos_token_id: int) -> CLIPTextModel:
    """A 3-layer CLIP text transformer over our own vocabulary."""
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=MODEL_MAX_LENGTH,
        projection_dim=128,
        bos_token_id=vocab_size - 2,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
    )
    return CLIPTextModel(config)


def build_unet() -> UNet2DConditionModel:
    """A small cross-attention UNet on 16×16×4 latents."""
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64, 128),
        layers_per_block=1,
        cross_attention_dim=128,
        attention_head_dim=4,
        norm_num_groups=32,
    )


def build_scheduler() -> DDIMScheduler:
    """SD1.x's noise schedule, epsilon prediction, sampled with DDIM."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
