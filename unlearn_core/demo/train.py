"""Train the embedded demo model (flags) from scratch and save it as a diffusers folder.

    python -m unlearn_core.demo.train --out assets/demo-model --work runs/demo-train

Three stages, each seeded, with a progress bar and resumable checkpoints in --work:
1. the tokenizer (BPE over our caption corpus), 2. the KL autoencoder, 3. the UNet and text
encoder jointly with the ordinary epsilon loss (10 % caption dropout for classifier-free
guidance), keeping an EMA of both. Each stage stops at its step count or its time budget,
whichever comes first. A GPU is used when present (bf16 autocast).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from unlearn_core.demo import architecture, flags, vocab
from unlearn_core.models.base import pick_device


@dataclass
class DemoTrainConfig:
    """Settings of one demo-model training run."""

    out: str = "assets/demo-model"
    work: str = "runs/demo-train"
    seed: int = 0
    vae_steps: int = 3000
    vae_batch: int = 64
    vae_lr: float = 1e-3
    vae_time_budget_s: float = 900.0
    unet_steps: int = 60000
    unet_batch: int = 64
    unet_lr: float = 5e-4
    unet_time_budget_s: float = 5400.0
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    checkpoint_every_s: float = 120.0
    device: str = "auto"

    def __post_init__(self):
        if self.vae_batch < 1 or self.unet_batch < 1:
            raise ValueError("batch sizes must be at least 1")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError("caption_dropout must be in [0, 1)")


def autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def resume(checkpoint: Path, device: torch.device, generator: torch.Generator, **parts) -> int:
    """Load each part's state (anything with `load_state_dict`) and the generator's from a stage's
    checkpoint, if there is one; return the step to continue from (0 without a checkpoint)."""
    if not checkpoint.exists():
        return 0
    state = torch.load(checkpoint, map_location=device, weights_only=False)
    for name, part in parts.items():
        part.load_state_dict(state[name])
    generator.set_state(state["generator"].to(generator.get_state().device) if device.type == "cpu" else state["generator"])
    return state["step"]


def train_vae(config: DemoTrainConfig, device: torch.device, bank: torch.Tensor):
    """Stage 2: the autoencoder, L1 + MSE reconstruction with a small KL term."""
    vae = architecture.build_vae().to(device)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    checkpoint = Path(config.work) / "vae.pt"
    step = resume(checkpoint, device, generator, model=vae, optimizer=optimizer)
    started, last_save = time.time(), time.time()
    bar = tqdm(total=config.vae_steps, initial=step, desc="vae")
    while step < config.vae_steps and time.time() - started < config.vae_time_budget_s:
        labels = torch.randint(0, bank.shape[0], (config.vae_batch,), generator=generator, device=device)
        images = flags.augment_batch(bank, labels, generator)
        with autocast(device):
            posterior = vae.encode(images).latent_dist
            reconstruction = vae.decode(posterior.sample(generator=generator)).sample
        reconstruction = reconstruction.float()
        loss = F.l1_loss(reconstruction, images) + F.mse_loss(reconstruction, images) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if time.time() - last_save > config.checkpoint_every_s:
            save_checkpoint(checkpoint, {"model": vae.state_dict(), "optimizer": optimizer.state_dict(), "generator": generator.get_state(), "step": step})
            last_save = time.time()
    bar.close()
    save_checkpoint(checkpoint, {"model": vae.state_dict(), "optimizer": optimizer.state_dict(), "generator": generator.get_state(), "step": step})
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        labels = torch.arange(bank.shape[0], device=device).repeat(8)
        latents = vae.encode(flags.augment_batch(bank, labels, generator)).latent_dist.sample(generator=generator)
    scaling = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling)
    return vae, step


def caption_table(tokenizer, device: torch.device):
    """Every caption (and the empty one) tokenized once: ids (N, L), flag labels (N,)."""
    rng = random.Random(0)
    rows = []
    for index, spec in enumerate(flags.FLAGS):
        seen = set()
        for _ in range(200):
            caption = flags.caption_for(spec, rng)
            if caption not in seen:
                seen.add(caption)
                rows.append((caption, index))
    captions = [caption for caption, _ in rows]
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    labels = torch.tensor([label for _, label in rows])
    empty = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    return ids.to(device), labels.to(device), empty.to(device)


def train_unet(config: DemoTrainConfig, device: torch.device, bank: torch.Tensor, vae, tokenizer):
    """Stage 3: UNet + text encoder, epsilon loss, EMA, caption dropout."""
    from diffusers.training_utils import EMAModel

    unet = architecture.build_unet().to(device)
    text_encoder = architecture.build_text_encoder(len(tokenizer), tokenizer.eos_token_id).to(device)
    scheduler = architecture.build_scheduler()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.unet_lr, weight_decay=1e-2)
    ema = EMAModel(params, decay=config.ema_decay)
    generator = torch.Generator(device=device).manual_seed(config.seed + 1)
    checkpoint = Path(config.work) / "unet.pt"
    step = resume(checkpoint, device, generator, unet=unet, text_encoder=text_encoder, optimizer=optimizer, ema=ema)
    ema.to(device)
    ids, labels, empty = caption_table(tokenizer, device)
    alphas = scheduler.alphas_cumprod.to(device)

    def state_dict():
        return {"unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(), "optimizer": optimizer.state_dict(), "ema": ema.state_dict(), "generator": generator.get_state(), "step": step}

    def lr_at(current):
        warmup = min(1.0, (current + 1) / 500)
        return config.unet_lr * warmup

    started, last_save = time.time(), time.time()
    bar = tqdm(total=config.unet_steps, initial=step, desc="unet")
    while step < config.unet_steps and time.time() - started < config.unet_time_budget_s:
        rows = torch.randint(0, ids.shape[0], (config.unet_batch,), generator=generator, device=device)
        drop = torch.rand(config.unet_batch, generator=generator, device=device) < config.caption_dropout
        batch_ids = torch.where(drop.unsqueeze(1), empty.expand(config.unet_batch, -1), ids[rows])
        with torch.no_grad():
            images = flags.augment_batch(bank, labels[rows], generator)
            latents = vae.encode(images).latent_dist.sample(generator=generator) * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator, device=device)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (config.unet_batch,), generator=generator, device=device)
        a = alphas[timesteps].sqrt().view(-1, 1, 1, 1)
        b = (1 - alphas[timesteps]).sqrt().view(-1, 1, 1, 1)
        noisy = a * latents + b * noise
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        with autocast(device):
            hidden = text_encoder(batch_ids)[0]
            prediction = unet(noisy, timesteps, encoder_hidden_states=hidden).sample
        loss = F.mse_loss(prediction.float(), noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        ema.step(params)
        step += 1
        bar.update(1)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if time.time() - last_save > config.checkpoint_every_s:
            save_checkpoint(checkpoint, state_dict())
            last_save = time.time()
    bar.close()
    save_checkpoint(checkpoint, state_dict())
    ema.copy_to(params)
    return unet, text_encoder, scheduler, step


def save_pipeline(out: Path, vae, text_encoder, tokenizer, unet, scheduler) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae.to("cpu", torch.float32),
        text_encoder=text_encoder.to("cpu", torch.float32),
        tokenizer=tokenizer,
        unet=unet.to("cpu", torch.float32),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)


def run(config: DemoTrainConfig) -> dict:
    from transformers import CLIPTokenizer

    torch.manual_seed(config.seed)
    device = pick_device(config.device)
    out, work = Path(config.out), Path(config.work)
    work.mkdir(parents=True, exist_ok=True)
    vocab.write_clip_tokenizer_files(flags.all_caption_text(), out / "tokenizer", architecture.MODEL_MAX_LENGTH)
    tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer")
    bank, _ = flags.canonical_bank()
    bank = bank.to(device)
    started = time.time()
    vae, vae_steps = train_vae(config, device, bank)
    vae_seconds = time.time() - started
    unet, text_encoder, scheduler, unet_steps = train_unet(config, device, bank, vae, tokenizer)
    save_pipeline(out, vae, text_encoder, tokenizer, unet, scheduler)
    report = {
        "config": asdict(config),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "vae_steps": vae_steps,
        "unet_steps": unet_steps,
        "vae_seconds": round(vae_seconds, 1),
        "total_seconds": round(time.time() - started, 1),
        "torch": torch.__version__,
    }
    (out / "training_report.json").write_text(json.dumps(report, indent=2))
    return report


def parse_args(argv=None) -> DemoTrainConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    defaults = DemoTrainConfig()
    for name, value in asdict(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    return DemoTrainConfig(**vars(parser.parse_args(argv)))


def main(config: DemoTrainConfig) -> None:
    print(json.dumps(run(config), indent=2))


if __name__ == "__main__":
    main(parse_args())
