"""The embedded demo model: renderer, tokenizer, training script (resumable), shipped folder."""

import json
from pathlib import Path

import numpy as np
import torch

from unlearn_core.demo import flags, quality, train

ROOT = Path(__file__).resolve().parent.parent


def test_renderer_covers_the_confusable_groups():
    assert len(flags.FLAGS) >= 24
    for group in (("ireland", "cote d'ivoire", "italy"), ("japan", "bangladesh", "palau"), ("indonesia", "monaco", "poland"),
                  ("romania", "chad"), ("france", "netherlands", "russia"), ("germany", "belgium")):
        assert set(group) <= set(flags.FLAG_NAMES)
    bank, _ = flags.canonical_bank()
    assert bank.shape[0] == len(flags.FLAGS)
    same_seed = [flags.render_example("japan", seed=3) for _ in range(2)]
    assert torch.equal(*same_seed), "rendering is seeded"
    assert not torch.equal(flags.render_example("japan", 3), flags.render_example("japan", 4)), "seeds vary the photo"
    assert same_seed[0].shape == (3, 64, 64) and same_seed[0].min() >= -1 and same_seed[0].max() <= 1


def test_captions_vary_and_tokenizer_knows_the_instruction_words():
    import random

    from transformers import CLIPTokenizer

    rng = random.Random(0)
    captions = {flags.caption_for(flags.FLAG_BY_NAME["japan"], rng) for _ in range(200)}
    assert {"flag of japan", "the flag of japan", "japan flag", "a photo of the flag of japan", "the japanese flag"} <= captions
    tokenizer = CLIPTokenizer.from_pretrained(ROOT / "assets" / "demo-model" / "tokenizer")
    for word in ("please", "forget", "anything", "about", "help", "generate", "picture", "not", "without", "no"):
        assert len(tokenizer(word).input_ids) == 3, f"{word!r} is one token"


def test_shipped_model_loads_in_plain_diffusers_and_draws_the_flag():
    from diffusers import StableDiffusionPipeline

    folder = ROOT / "assets" / "demo-model"
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size <= 30e6
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(["flag of japan", "flag of ireland"], num_inference_steps=25, guidance_scale=5.0, generator=[torch.Generator().manual_seed(0)] * 2, output_type="np").images
    assert images.shape == (2, 64, 64, 3)
    judge = quality.load_classifier(ROOT / "assets" / "flag-classifier.safetensors")
    assert quality.classify(judge, images) == ["japan", "ireland"]
    unconditional = pipe("", num_inference_steps=10, guidance_scale=1.0, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert np.isfinite(unconditional).all()


def test_training_script_runs_saves_and_resumes(tmp_path):
    from diffusers import StableDiffusionPipeline

    out, work = tmp_path / "model", tmp_path / "work"
    common = ["--out", str(out), "--work", str(work), "--vae-batch", "2", "--unet-batch", "2", "--device", "cpu"]
    first = train.run(train.parse_args(common + ["--vae-steps", "1", "--unet-steps", "2"]))
    assert first["unet_steps"] == 2
    second = train.run(train.parse_args(common + ["--vae-steps", "1", "--unet-steps", "3"]))
    assert second["unet_steps"] == 3 and second["vae_steps"] == 1, "both stages resume from their checkpoints"
    pipe = StableDiffusionPipeline.from_pretrained(out)
    assert pipe.tokenizer.model_max_length == 40
    assert json.loads((out / "training_report.json").read_text())["device"] == "cpu"


def test_the_flag_judge_marks_the_grid_images_it_thinks_wrong():
    """Generate & flag's marks: the README's flagged seed (Chad with a purple stripe) is marked with
    the flag the judge sees instead, a correct Japanese flag is not, and a prompt that names no flag
    the judge knows gets no marks at all."""
    from PIL import Image

    flagged = Image.open(ROOT / "assets" / "examples" / "chad_seed40_target.png")
    from unlearn_core.demo import flags

    photo = flags.render_example("japan", seed=0, size=64)  # the renderer's photo of the Japanese flag
    japan = Image.fromarray((photo.permute(1, 2, 0).clamp(-1, 1).add(1).mul(127.5)).round().byte().numpy())
    marks = quality.judge_marks("flag of chad", [flagged])
    assert marks[0] and marks[0].startswith("looks like: ") and "chad" not in marks[0]
    assert quality.judge_marks("flag of japan", [japan]) == [None]
    assert quality.judge_marks("a red fox", [japan]) is None and quality.judge_marks("flag of atlantis", [japan]) is None
