"""One unlearning run end to end, written to one `RunFolder`: resolve the target and surrogate
images, prepare the fixed sets with the frozen model, train, save the adapter, evaluate, and write
the metrics and the adapter card."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from unlearn_core.cache import GenerationCache
from unlearn_core.config import InstanceTarget, UnlearnConfig
from unlearn_core.distributed import is_main_process
from unlearn_core.errors import ImageError, InvalidInput
from unlearn_core.evaluation import EvalTarget, evaluate
from unlearn_core.export import adapter_card, save_kohya, write_cards
from unlearn_core.files import save_image_atomic
from unlearn_core.images import load_for_model
from unlearn_core.models import DiffusionModel
from unlearn_core.models.base import SamplingRecord
from unlearn_core.runfolder import RunFolder
from unlearn_core.sets import FixedSets, encode_sets, record_target_states, remember_pool
from unlearn_core.trainer import StepReport, TrainingPaused, UnlearnTrainer


def _nothing(*args) -> None:
    return None


@dataclass(frozen=True)
class RunCallbacks:
    """What a run reports while it works, and how it learns that it should stop."""

    on_step: Callable[[StepReport], None] = _nothing
    on_phase: Callable[[str], None] = _nothing
    should_stop: Callable[[], bool] = lambda: False
    on_images: Callable[[int, int], None] = _nothing  # (done, total) images sampled in the remember set
    should_pause: Callable[[str], bool] = lambda before: False  # before "step" or "evaluating": stop at a checkpoint, to go on later (`gpu_slots`)

    def then(self, other: "RunCallbacks | None") -> "RunCallbacks":
        """These callbacks followed by `other`'s (which may also ask the run to stop)."""
        if other is None:
            return self

        def on_step(report):
            self.on_step(report)
            other.on_step(report)

        def on_phase(name):
            self.on_phase(name)
            other.on_phase(name)

        def on_images(done, total):
            self.on_images(done, total)
            other.on_images(done, total)

        return RunCallbacks(on_step, on_phase, lambda: self.should_stop() or other.should_stop(), on_images,
                            lambda before: self.should_pause(before) or other.should_pause(before))


def resolve_target_images(model: DiffusionModel, targets: list[InstanceTarget], config: UnlearnConfig, cache: GenerationCache) -> list[EvalTarget]:
    """Load or generate each x_f and load each x_s at the model's size."""
    resolved = []
    for index, target in enumerate(targets):
        if target.target_path:
            target_image = load_for_model(target.target_path, model.image_size, f"target {index}")
        else:
            target_image = cache.get_or_generate(model, target.prompt, [target.seed], config.generation_steps, config.guidance_scale)[0][0]
        surrogate = load_for_model(target.surrogate_path, model.image_size, f"surrogate {index}")
        resolved.append(EvalTarget(target.prompt, target.seed, target_image, surrogate))
    return resolved


def remember_images(model: DiffusionModel, targets: list[EvalTarget], config: UnlearnConfig, cache: GenerationCache) -> tuple[list[Image.Image], list[str]]:
    """A user folder, or pretrained generations of the targets' prompts (other seeds) + extra prompts."""
    if config.remember_dir:
        files = sorted(p for p in Path(config.remember_dir).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp"))
        if not files:
            raise ImageError(f"remember folder {config.remember_dir} holds no images")
        images = [load_for_model(f, model.image_size, f.name) for f in files[: config.remember_count]]
        return images, [targets[0].prompt] * len(images)
    prompts, seeds = remember_image_plan(targets, config)
    images, texts = [], []
    for prompt in prompts:
        generated, _ = cache.get_or_generate(model, prompt, seeds, config.generation_steps, config.guidance_scale)
        images += generated
        texts += [prompt] * len(generated)
    return images, texts


def remember_image_plan(targets: list[EvalTarget], config: UnlearnConfig) -> tuple[list[str], list[int]]:
    """The prompts and seeds of generated remember images (denoise remembering, the baselines)."""
    prompts = list(dict.fromkeys([t.prompt for t in targets] + config.remember_prompts))
    return prompts, list(range(config.remember_seed_offset, config.remember_seed_offset + config.remember_count))


def remember_pool_seeds(targets: list[EvalTarget], config: UnlearnConfig) -> list[int]:
    """`config.remember_seeds` less the target seeds: the seeds a remember prompt's pool holds."""
    target_seeds = {t.seed for t in targets}
    return [seed for seed in config.remember_seeds if seed not in target_seeds]


def remember_prompts_for(model: DiffusionModel, targets: list[EvalTarget], config: UnlearnConfig) -> list[str]:
    """The targets' prompts, the extra remember prompts and, for a text-conditioned model, the
    empty prompt (whose states stand for everything the operator did not name)."""
    prompts = [t.prompt for t in targets] + config.remember_prompts + ([""] if model.conditional else [])
    return list(dict.fromkeys(prompts))


def paint_masks(model: DiffusionModel, targets: list[EvalTarget]) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each surrogate differs from its target: at the images' resolution, and at x0's, where
    a latent cell counts as painted when any of its pixels is (max-pooling keeps thin strokes and edges)."""
    from unlearn_core.metrics import painted_mask

    masks = torch.stack([torch.from_numpy(painted_mask(t.target, t.surrogate)).float()[None] for t in targets])
    return masks.to(model.device), torch.nn.functional.adaptive_max_pool2d(masks, model.x0_shape[1:]).to(model.device)


def renoise_sources(model: DiffusionModel, records, more_images: list[list[Image.Image]] | None = None) -> tuple[torch.Tensor, dict]:
    """The remember seeds' final images (and `more_images` of the same prompts, one list per record)
    as x0, each with its prompt's conditioning (the empty prompt's record gives the unconditional rows)."""
    from unlearn_core.images import to_tensor

    more_images = more_images or [[] for _ in records]
    per_prompt = [record.images + more for record, more in zip(records, more_images)]
    with torch.no_grad():
        x0 = torch.cat([model.encode_images(to_tensor(images)) for images in per_prompt])
    conds = [{key: value[:1].expand(len(images), *value.shape[1:]) for key, value in record.cond.items()} for record, images in zip(records, per_prompt)]
    return x0, {key: torch.cat([c[key] for c in conds]).to(model.device) for key in conds[0]}


def nearest_seeds(images: list[Image.Image], seeds: list[int], references: list[Image.Image], count: int) -> list[int]:
    """The `count` seeds whose images lie nearest any reference image (mean absolute pixel
    difference), in seed order. Written by hand: a ranking by a plain distance, no library call."""
    stacked = np.stack([np.asarray(image, dtype=np.float32) for image in images])
    distance = np.min([np.abs(stacked - np.asarray(reference.resize(images[0].size), dtype=np.float32)).mean(axis=(1, 2, 3)) for reference in references], axis=0)
    return sorted(seeds[index] for index in np.argsort(distance, kind="stable")[:count])


def remember_seed_plan(model: DiffusionModel, prompts: list[str], config: UnlearnConfig, targets: list[EvalTarget], cache: GenerationCache) -> list[tuple[list[int], list[int]]]:
    """Per remember prompt, (seeds whose sampling is recorded and distilled, the rest of its pool
    whose final images are renoised). The pool is `config.remember_seeds` less the target seeds.

    remember_choice 'nearest': for a flagged prompt, the recorded seeds are the pool's remember_count
    seeds whose frozen images look most like the flagged outputs. Their sampling passes closest to
    the target's, so a fix spills onto them first; holding them is what keeps the target's
    neighbours. Other prompts (the empty one, extra remember prompts) have no flagged image and
    keep the first seeds."""
    pool = remember_pool_seeds(targets, config)
    renoising = config.renoised_seed_count > 0
    plans = []
    for prompt in prompts:
        references = [t.target for t in targets if t.prompt == prompt]
        recorded = pool[: config.remember_count]
        if config.remember_choice == "nearest" and references and len(pool) > config.remember_count:
            images = cache.get_or_generate(model, prompt, pool, config.generation_steps, config.guidance_scale)[0]
            recorded = nearest_seeds(images, pool, references, config.remember_count)
        plans.append((recorded, [seed for seed in pool if seed not in recorded] if renoising else []))
    return plans


def remember_records(model: DiffusionModel, prompts: list[str], config: UnlearnConfig, targets: list[EvalTarget], cache: GenerationCache) -> tuple[list[SamplingRecord], list[list[Image.Image]]]:
    """The frozen model's recorded sampling of each prompt's recorded seeds (a target's own
    trajectory is never a teacher), from the cache when recorded before, and the cached images of
    the rest of its pool for renoising (generated once, then read back)."""
    records, more = [], []
    for prompt, (recorded, rest) in zip(prompts, remember_seed_plan(model, prompts, config, targets, cache)):
        records.append(cache.get_or_record(model, prompt, recorded, config.generation_steps, config.guidance_scale))
        more.append(cache.get_or_generate(model, prompt, rest, config.generation_steps, config.guidance_scale)[0] if rest else [])
    return records, more


def nearest_neighbours(model: DiffusionModel, targets: list[EvalTarget], config: UnlearnConfig, cache: GenerationCache) -> list[tuple[str, int, Image.Image]]:
    """(prompt, seed, frozen image) of the `neighbour_checks` recorded remember seeds of each flagged
    prompt whose images look most like its flagged outputs: the other seeds a fix spills onto
    first, which the trainer re-samples to see whether the remember loss has room to give."""
    prompts = list(dict.fromkeys(t.prompt for t in targets))
    neighbours = []
    for prompt, (recorded, _) in zip(prompts, remember_seed_plan(model, prompts, config, targets, cache)):
        images = cache.get_or_generate(model, prompt, recorded, config.generation_steps, config.guidance_scale)[0]
        chosen = nearest_seeds(images, recorded, [t.target for t in targets if t.prompt == prompt], config.neighbour_checks)
        neighbours += [(prompt, seed, images[recorded.index(seed)]) for seed in chosen]
    return neighbours


def remember_set_images(model: DiffusionModel, targets: list[EvalTarget], config: UnlearnConfig, cache: GenerationCache) -> int:
    """How many images preparing the sets will sample (the rest is read from the cache): each remember
    prompt's pool images and recorded trajectories not yet cached, and the targets' own trajectories.
    A flagged prompt's pool not yet generated means its nearest seeds are not yet recorded either."""
    trajectories = len(targets) if config.method == "ours" and config.forget_states == "trajectory" else 0
    if config.method != "ours" or config.remember_loss != "distill":  # `remember_images`
        prompts, seeds = remember_image_plan(targets, config)
        return trajectories + (0 if config.remember_dir else sum(cache.missing_images(model, prompt, seeds, config.generation_steps, config.guidance_scale) for prompt in prompts))
    pool = remember_pool_seeds(targets, config)
    count = trajectories
    for prompt in remember_prompts_for(model, targets, config):
        flagged = config.remember_choice == "nearest" and any(t.prompt == prompt for t in targets) and len(pool) > config.remember_count
        first = pool[: config.remember_count]
        rest = pool[config.remember_count :] if config.renoised_seed_count else []
        missing_pool = cache.missing_images(model, prompt, pool if flagged else rest, config.generation_steps, config.guidance_scale)
        if flagged and missing_pool:
            count += missing_pool + config.remember_count
            continue
        recorded = remember_seed_plan(model, [prompt], config, targets, cache)[0][0] if flagged else first
        count += missing_pool + (0 if cache.has_record(model, prompt, recorded, config.generation_steps, config.guidance_scale) else len(recorded))
    return count


def warm_remember_cache(model: DiffusionModel, targets: list[EvalTarget], config: UnlearnConfig, cache: GenerationCache) -> None:
    """Put what a job's distilled remember set reads from the cache there ahead of it (recorded
    trajectories, pool images), so a timed job runs warm."""
    remember_records(model, remember_prompts_for(model, targets, config), config, targets, cache)


def prepare_sets(model: DiffusionModel, targets: list[EvalTarget], config: UnlearnConfig, cache: GenerationCache) -> FixedSets:
    """Everything training reads, made once with the frozen model: encoded targets and surrogates;
    sampling states of the target seeds (trajectory forgetting) and of the remember seeds
    (distillation), or remember images (denoise)."""
    images, prompts = remember_images(model, targets, config, cache) if config.remember_loss == "denoise" or config.method != "ours" else ([], [])
    sets = encode_sets(model, [t.target for t in targets], [t.surrogate for t in targets], [t.prompt for t in targets], images, prompts, [t.seed for t in targets])
    if config.method != "ours":
        return sets
    sets.paint_mask_pixels, sets.paint_mask = paint_masks(model, targets)
    sets.pictures = [(t.target, t.surrogate) for t in targets]
    with model.adapter_disabled():
        if config.remember_loss == "distill":
            prompts = remember_prompts_for(model, targets, config)
            records, more = remember_records(model, prompts, config, targets, cache)
            sets.remember_states = remember_pool(records)
            if config.remember_renoised:
                sets.remember_x0, sets.remember_cond = renoise_sources(model, records, more)
        if config.forget_states == "trajectory":
            sets.target_states = record_target_states(model, sets.targets, config.generation_steps, config.guidance_scale)
            if config.neighbour_checks and config.remember_loss == "distill":
                sets.neighbours = nearest_neighbours(model, targets, config, cache)
    return sets


def summarise(trainer: UnlearnTrainer) -> dict:
    """Loss and conflict summary of a finished run, and which step's weights it saved (the last,
    unless consolidating pulled the target back under 'fixed' and an earlier step's were kept)."""
    log = trainer.log
    if not log:
        return {}
    return {
        "final_loss_forget": log[-1]["loss_forget"],
        "final_loss_remember": log[-1]["loss_remember"],
        "conflict_rate": sum(r["projected"] for r in log) / len(log),
        "mean_cosine": sum(r["cosine"] for r in log) / len(log),
        "mean_seconds_per_step": sum(r["seconds_per_step"] for r in log) / len(log),
        "steps_run": log[-1]["step"],
        "toward_surrogate_when_stopped": trainer.toward_surrogate if trainer.target_r else log[-1].get("toward_surrogate"),
        "consolidated_from_step": trainer.consolidating_since,
        "weights_of_step": trainer.kept_step or log[-1]["step"],
        "remember_scale": trainer.remember_scale,
        "neighbour_checks": [{"step": r["step"], "least_ssim": r["neighbours_ssim"], "remember_scale": r["remember_scale"]} for r in log if r.get("neighbours_ssim") is not None],
    }


def run_unlearning(
    model: DiffusionModel,
    targets: list[InstanceTarget],
    config: UnlearnConfig,
    folder: RunFolder | str | Path,
    callbacks: RunCallbacks = RunCallbacks(),
    cache: GenerationCache | None = None,
    evaluate_after: bool = True,
) -> dict:
    """Train, save the adapter, evaluate. Resumes from the folder's checkpoint when present.

    Under torchrun / accelerate launch every process prepares and trains; only the main process
    writes the folder's files and evaluates."""
    if not targets:
        raise InvalidInput("give at least one target to unlearn")
    cache = cache or GenerationCache()
    if not config.full_finetune:
        model.lora_config(config.lora_rank, config.lora_alpha, config.lora_layers)  # refuse a layer set the family lacks before the slow preparation
    folder = (folder if isinstance(folder, RunFolder) else RunFolder(folder)).create()
    main = is_main_process()
    if main and not folder.config_file.exists():  # a job's store (or the CLI) wrote it already; a Python caller has not
        folder.write_request(model.source, config.to_dict(), [vars(target) for target in targets])
    started = time.time()
    callbacks.on_phase("preparing")
    resolved = resolve_target_images(model, targets, config, cache)
    for index, target in enumerate(resolved if main else []):
        save_image_atomic(target.target, folder.training_image("target", index))
        save_image_atomic(target.surrogate, folder.training_image("surrogate", index))
    callbacks.on_phase("remember set")
    to_sample, sampled = remember_set_images(model, resolved, config, cache), 0

    def count_images(batch: int) -> None:
        nonlocal sampled
        sampled += batch
        callbacks.on_images(sampled, max(to_sample, sampled))

    callbacks.on_images(0, to_sample)
    with model.counting_images(count_images):
        sets = prepare_sets(model, resolved, config, cache)
    prepared = time.time()
    if not model.has_lora() and not config.full_finetune:
        torch.manual_seed(config.seed)  # peft draws the LoRA A matrices from the global generator
        model.add_lora(config.lora_rank, config.lora_alpha, config.lora_layers)
    callbacks.on_phase("training")
    trainer = UnlearnTrainer(model, config, sets, folder, callbacks.on_step, callbacks.should_stop, lambda: callbacks.should_pause("step"))
    trainer.train()
    trained = time.time()
    if main and evaluate_after and callbacks.should_pause("evaluating"):  # too little of a GPU slot left: evaluate in the next
        trainer.save_checkpoint()
        raise TrainingPaused("paused before evaluating")
    if not main:
        return {"run_dir": str(folder.path), "files": [], "summary": summarise(trainer), "metrics": None}
    files = [] if config.full_finetune else model.save_lora(folder.path) + save_kohya(model, folder)
    summary = {**summarise(trainer), "seconds_preparing": round(prepared - started, 2), "seconds_training": round(trained - prepared, 2)}
    metrics = None
    if evaluate_after:
        callbacks.on_phase("evaluating")
        metrics, picture, after_images = evaluate(model, resolved, config, cache)
        save_image_atomic(picture, folder.picture)
        for index, image in enumerate(after_images):
            save_image_atomic(image, folder.after_image(index))
    summary["seconds_total"] = round(time.time() - started, 2)
    if metrics is not None:
        metrics["timing"] = summary
        folder.write_metrics(metrics)
    write_cards(folder, adapter_card(folder, model, resolved, config, files, metrics, summary), kohya=folder.kohya_weights.name in files)
    folder.checkpoint.unlink(missing_ok=True)
    return {"run_dir": str(folder.path), "files": files, "summary": summary, "metrics": metrics}
