"""The forgetting measure, the x0-space and trajectory pieces of the method, and the noise fixes."""

import numpy as np
import pytest
import torch
from PIL import Image

from unlearn_core import metrics, objectives
from unlearn_core.models import load_model, wrap_pipeline

PROMPT = "flag of japan"


def _picture(colour, stripe=None, size=16):
    pixels = np.zeros((size, size, 3), dtype=np.uint8) + np.array(colour, dtype=np.uint8)
    if stripe is not None:
        pixels[:, size // 2 :] = stripe
    return Image.fromarray(pixels)


# -- r, the weight-free forgetting measure ------------------------------------------------------
TARGET = _picture((0, 0, 200), stripe=(120, 0, 160))  # blue flag, purple right half
SURROGATE = _picture((0, 0, 200), stripe=(200, 0, 40))  # the half painted red


@pytest.mark.parametrize(("stripe", "expected_r", "verdict"), [((200, 0, 40), 1.0, "fixed"), ((120, 0, 160), 0.0, "not fixed"), ((160, 0, 100), 0.5, "partly fixed")])
def test_r_is_the_share_of_the_painted_change(stripe, expected_r, verdict):
    moved = metrics.toward_surrogate(_picture((0, 0, 200), stripe=stripe), TARGET, SURROGATE)
    assert moved.r == pytest.approx(expected_r, abs=0.01)
    assert moved.residual == pytest.approx(0.0, abs=0.01)
    assert moved.painted_fraction == pytest.approx(0.5)
    assert moved.verdict == verdict


def test_r_ignores_unpainted_pixels_and_reports_change_off_the_line():
    elsewhere = np.asarray(TARGET).copy()
    elsewhere[:, :8] = (255, 255, 255)  # the unpainted half changed completely
    assert metrics.toward_surrogate(Image.fromarray(elsewhere), TARGET, SURROGATE).r == pytest.approx(0.0, abs=1e-6)
    green = metrics.toward_surrogate(_picture((0, 0, 200), stripe=(120, 200, 160)), TARGET, SURROGATE)
    assert abs(green.r) < 0.05 and green.residual > 1.0, "a change orthogonal to the painted one is residual, not forgetting"


def test_the_verdict_judges_the_r_that_is_reported():
    """28 black pixels painted white; after, their 84 channel values sum to 14993 of 21420: r is
    0.699953, shown (and read by the early stop) as 0.7000, which is 'fixed', not 'partly fixed'."""
    target = np.zeros((16, 16, 3), dtype=np.uint8)
    surrogate, after = target.copy(), target.copy()
    surrogate.reshape(-1, 3)[:28] = 255
    after.reshape(-1)[:84] = [179] * 41 + [178] * 43
    moved = metrics.toward_surrogate(Image.fromarray(after), Image.fromarray(target), Image.fromarray(surrogate))
    assert moved.r == 0.7 and moved.verdict == metrics.verdict_for(moved.r) == "fixed"


def test_nothing_painted_gives_no_verdict():
    moved = metrics.toward_surrogate(TARGET, TARGET, TARGET)
    assert moved.r is None and moved.verdict == "no painted pixels"


# -- x0-space and guidance ----------------------------------------------------------------------
def _levels(prediction_type, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.rand(3, generator=g) * 0.9 + 0.05).view(-1, 1, 1, 1)
    a, b = ((1 - s), s) if prediction_type == "flow" else ((1 - s).sqrt(), s.sqrt())
    x0, x_s, eps, other = (torch.randn((3, 4, 5, 5), generator=g) for _ in range(4))
    return a, b, a * x0 + b * eps, x_s, other


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "flow"])
def test_x0_error_weight_converts_prediction_error_to_clean_image_error(prediction_type):
    a, b, x_t, x_s, prediction = _levels(prediction_type)
    target = objectives.surrogate_target(prediction_type, x_t, x_s, a, b)
    torch.testing.assert_close(objectives.implied_x0(prediction_type, x_t, target, a, b), x_s, rtol=1e-4, atol=1e-4)
    x0_error = (objectives.implied_x0(prediction_type, x_t, prediction, a, b) - x_s).pow(2).flatten(1).mean(1)
    weighted = objectives.x0_error_weight(prediction_type, a, b).flatten() * objectives.per_sample_mse(prediction, target)
    torch.testing.assert_close(weighted, x0_error, rtol=1e-4, atol=1e-5)


def test_painted_aim_takes_the_surrogate_only_where_painted():
    frozen, surrogate = torch.zeros(1, 4, 4, 4), torch.ones(1, 4, 4, 4)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., 2:] = 1
    aim = objectives.painted_aim(frozen, surrogate, mask)
    assert aim[..., 2:].eq(1).all() and aim[..., :2].eq(0).all()


def test_guidance_and_late_schedule():
    u, c = torch.zeros(2), torch.ones(2)
    torch.testing.assert_close(objectives.guided_prediction(u, c, 5.0), torch.full((2,), 5.0))
    torch.testing.assert_close(objectives.guided_prediction(u, c, 1.0), c)
    s = torch.tensor([0.0, 0.25, 1.0])
    torch.testing.assert_close(objectives.forget_weight(s, "timestep-late", 2.0, 0.5), torch.tensor([0.5, 0.28125, 0.0]))


# -- the noise fixes ----------------------------------------------------------------------------
def test_euler_scheduler_forget_noise_has_unit_variance(tiny_models):
    """initial_noise is ε itself, not ε·init_noise_sigma (14.6 for Euler), and still the pipeline's draw."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_models["sd"]))
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    model = wrap_pipeline(pipe, "tiny", "cpu")
    assert model.pipe.scheduler.init_noise_sigma > 10
    noise = model.initial_noise(list(range(8)))
    assert 0.9 < float(noise.std()) < 1.1
    by_seed = pipe(PROMPT, num_inference_steps=3, guidance_scale=2.0, generator=torch.Generator().manual_seed(4), output_type="np").images[0]
    by_noise = pipe(PROMPT, num_inference_steps=3, guidance_scale=2.0, latents=model.initial_noise([4]), output_type="np").images[0]
    np.testing.assert_allclose(by_seed, by_noise, atol=1e-6)


def test_sd3_noise_levels_follow_diffusers_training_script(tiny_models):
    """σ = the shifted schedule's sigma at logit-normal indices (train_dreambooth_lora_sd3.py), and
    the remember loss is stated in x0-space (weight σ² on the flow error)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling

    model = load_model(str(tiny_models["sd3"]), "cpu")
    model.generate(PROMPT, [0], 3, 2.0)  # set_timesteps on the pipeline's scheduler must not leak in
    timesteps, a, b, s = model.sample_noise_levels(4096, torch.Generator().manual_seed(3))
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(model.pipe.scheduler.config)
    u = compute_density_for_timestep_sampling("logit_normal", 4096, logit_mean=0.0, logit_std=1.0, generator=torch.Generator().manual_seed(3))
    indices = (u * scheduler.config.num_train_timesteps).long()
    torch.testing.assert_close(timesteps, scheduler.timesteps[indices].float())
    torch.testing.assert_close(b, (scheduler.sigmas[indices]).float().clamp(1e-3, 1.0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a, 1 - b)
    assert 0.45 < float(b.median()) < 0.55, "logit-normal(0, 1) centres σ at 0.5"
    torch.testing.assert_close(model.remember_loss_weight(a, b), b**2)


# -- sampling states ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sd", "sd3", "ddpm"])
def test_record_sampling_sees_every_state_the_pipeline_used(kind, tiny_models):
    model = load_model(str(tiny_models[kind]), "cpu")
    record = model.record_sampling(PROMPT, [2, 5], 4, 2.0)
    assert len(record) == 4 * 2 and record.x_t.shape[1:] == model.x0_shape
    assert (record.out_uncond is not None) == model.conditional
    plain = [image for image, _ in model.generate(PROMPT, [2, 5], 4, 2.0)]
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(record.images, plain)), "recording changes nothing"
    first = record.x_t[:2] / float(getattr(model.pipe.scheduler, "init_noise_sigma", 1.0))
    torch.testing.assert_close(first, model.initial_noise([2, 5]), rtol=1e-4, atol=1e-4)
    assert record.timesteps[0] > record.timesteps[-1], "states run from noise to image"


# -- the benchmark's painted corrections --------------------------------------------------------
def test_benchmark_paint_recolours_the_region_and_keeps_the_rest():
    from benchmarks.cases import Recolour, paint

    drawn = _picture((30, 30, 200), stripe=(120, 0, 160))
    painted = np.asarray(paint(drawn, (Recolour("7800a0", "c8002c"),)), dtype=int)
    assert np.abs(painted[:, 10:] - (200, 0, 44)).max() <= 2, "the purple half is painted red"
    assert np.abs(painted[:, :7] - (30, 30, 200)).max() == 0, "the rest is untouched"
    moved = metrics.toward_surrogate(Image.fromarray(painted.astype(np.uint8)), drawn, Image.fromarray(painted.astype(np.uint8)))
    assert moved.r == pytest.approx(1.0)


def test_benchmark_paint_removes_only_the_patch_it_points_at():
    """A wrong element in a colour the flag also has (a red corner above a red band): `at` picks
    the one patch, and the band of the same colour stays as drawn."""
    from benchmarks.cases import Recolour, paint

    pixels = np.full((32, 32, 3), 250, dtype=np.uint8)  # white band
    pixels[16:] = (220, 20, 40)  # red band
    pixels[:6, 26:] = (220, 20, 40)  # the wrong red corner
    painted = np.asarray(paint(Image.fromarray(pixels), (Recolour("dc1428", "fafafa", at=(28, 2)),)), dtype=int)
    assert np.abs(painted[:6, 26:] - 250).max() == 0, "the corner is painted white"
    assert np.array_equal(painted[17:], pixels[17:].astype(int)), "the band of the same red stays"


def test_settings_that_need_a_frozen_model_refuse_full_fine_tuning_and_old_jobs_still_load():
    from unlearn_core.config import UnlearnConfig

    with pytest.raises(ValueError, match="frozen copy"):
        UnlearnConfig(full_finetune=True)
    UnlearnConfig(full_finetune=True, forget_states="random", forget_target="surrogate", remember_loss="denoise")
    assert UnlearnConfig.from_dict({"siss_superfactor": 0.1, "steps": 5}).steps == 5


def test_a_fix_that_also_changes_the_rest_is_flagged():
    wrecked = np.asarray(SURROGATE).copy()
    wrecked[:, :8] = (255, 255, 255)
    moved = metrics.toward_surrogate(Image.fromarray(wrecked), TARGET, SURROGATE)
    assert moved.verdict == "fixed" and moved.unpainted_change > metrics.UNPAINTED_CHANGE_WARNING
    assert metrics.toward_surrogate(SURROGATE, TARGET, SURROGATE).unpainted_change == 0.0


def _moved_adapter_and_remember_states(tiny_models):
    """A tiny SD model whose LoRA has moved away from the frozen model, and fixed sets holding the
    frozen model's sampling states of two seeds as the remember pool (and its images to denoise)."""
    from PIL import Image as PILImage

    from unlearn_core.sets import encode_sets, remember_pool

    model = load_model(str(tiny_models["sd"]), "cpu")
    model.add_lora(2, 2.0)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.denoiser.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    picture = PILImage.new("RGB", (16, 16), (200, 40, 40))
    sets = encode_sets(model, [picture], [picture], ["x"], [picture, picture], ["x", "y"], [0])
    with model.adapter_disabled():
        sets.remember_states = remember_pool([model.record_sampling("x", [1, 2], 6, 5.0)])
    return model, sets


def _remember_loss(model, sets, **settings) -> float:
    """Ours' remember loss of one step's draw, under `settings` (a fresh trainer: the same draw each time)."""
    from unlearn_core.config import UnlearnConfig
    from unlearn_core.trainer import UnlearnTrainer

    config = UnlearnConfig(**{"forget_states": "random", "forget_target": "surrogate", "remember_batch_size": 12, "seed": 3, **settings})
    trainer = UnlearnTrainer(model, config, sets)
    with torch.no_grad():
        return float(trainer.method.remember_loss(trainer.context))


def test_the_remember_loss_holds_large_noise_levels_harder_when_boosted(tiny_models):
    """remember_large_t_boost k weights each remember sample by (1 + k·s): over a batch of sampling
    states at every noise level the loss grows by more than 1× and less than (1 + k)×, and not at
    all with k = 0 (the same draw, the same adapter)."""
    model, sets = _moved_adapter_and_remember_states(tiny_models)
    losses = {boost: _remember_loss(model, sets, remember_large_t_boost=boost) for boost in (0.0, 3.0)}
    assert losses[0.0] > 0
    assert 1.05 < losses[3.0] / losses[0.0] < 4.0, losses


@pytest.mark.parametrize("remember_loss", ["distill", "denoise"])
def test_remember_weight_scales_the_remember_loss_of_either_kind(remember_loss, tiny_models):
    """remember_weight multiplies the remember loss exactly, for distillation and for the denoising
    loss alike (the denoising loss once ignored it)."""
    model, sets = _moved_adapter_and_remember_states(tiny_models)
    light, heavy = (_remember_loss(model, sets, remember_loss=remember_loss, remember_weight=weight) for weight in (1.0, 3.0))
    assert light > 0 and heavy == pytest.approx(3.0 * light, rel=1e-5)


def test_renoised_remember_samples_take_the_frozen_model_as_teacher(tiny_models):
    """remember_renoised: remember images noised afresh at random t; the teacher is the frozen
    model's prediction there (every LoRA layer off), which the moved adapter no longer gives, and
    the samples join the distilled loss."""
    from unlearn_core.config import UnlearnConfig
    from unlearn_core.trainer import UnlearnTrainer
    from unlearn_core.training import losses

    model, sets = _moved_adapter_and_remember_states(tiny_models)
    trainer = UnlearnTrainer(model, UnlearnConfig(forget_states="random", forget_target="surrogate", remember_renoised=3, seed=3), sets)
    with torch.no_grad():
        x_t, t, cond, teacher = losses.renoised_samples(trainer.context, 3)
        with model.adapter_disabled():
            frozen = model.predict(model.denoiser, x_t, t, cond).float()
        adapted = model.predict(model.denoiser, x_t, t, cond).float()
    assert x_t.shape[0] == 3 and torch.allclose(teacher, frozen) and not torch.allclose(adapted, teacher, atol=1e-4)
    assert _remember_loss(model, sets, remember_renoised=3) != pytest.approx(_remember_loss(model, sets))


# -- the forget loss on decoded pixels ----------------------------------------------------------
@pytest.mark.parametrize("kind", ["sd", "sd3"])
def test_decode_x0_gives_the_pipelines_image_and_passes_gradients(kind, tiny_models):
    """decode_x0 is the pipeline's own decoding of the final latents, with the graph kept."""
    model = load_model(str(tiny_models[kind]), "cpu")
    call = dict(num_inference_steps=3, guidance_scale=2.0, width=16, height=16)
    latents = model.pipe(PROMPT, generator=torch.Generator().manual_seed(1), output_type="latent", **call).images
    image = model.pipe(PROMPT, generator=torch.Generator().manual_seed(1), output_type="np", **call).images[0]
    x0 = latents.clone().requires_grad_(True)
    decoded = model.decode_x0(x0)
    np.testing.assert_allclose((decoded[0].detach().permute(1, 2, 0).clamp(-1, 1).numpy() + 1) / 2, image, atol=1e-5)
    decoded.square().sum().backward()
    assert x0.grad is not None and float(x0.grad.abs().sum()) > 0


def _pixel_trainer(model, target, surrogate, forget_target="painted"):
    from unlearn_core.config import UnlearnConfig
    from unlearn_core.run import EvalTarget, paint_masks
    from unlearn_core.sets import encode_sets, record_target_states
    from unlearn_core.trainer import UnlearnTrainer

    sets = encode_sets(model, [target], [surrogate], [PROMPT], [target], [PROMPT], [0])
    sets.paint_mask_pixels, sets.paint_mask = paint_masks(model, [EvalTarget(PROMPT, 0, target, surrogate)])
    with model.adapter_disabled():
        sets.target_states = record_target_states(model, sets.targets, 4, 2.0)
    config = UnlearnConfig(remember_loss="denoise", forget_target=forget_target, generation_steps=4, guidance_scale=2.0, seed=1)
    return UnlearnTrainer(model, config, sets)


def test_the_pixel_forget_loss_decodes_only_the_painted_box_and_trains_the_adapter(tiny_models, monkeypatch):
    """The box holds every painted pixel and its cells map onto its pixels; the whole-surrogate
    target decodes everything; the loss reaches the LoRA weights through the VAE decoder."""
    from unlearn_core.training import losses

    model = load_model(str(tiny_models["sd"]), "cpu")
    model.add_lora(2, 2.0)
    target = _picture((0, 0, 200))
    painted = np.asarray(target).copy()
    painted[2:5, 12:15] = (200, 0, 40)  # a small patch in the top-right corner
    trainer = _pixel_trainer(model, target, Image.fromarray(painted))
    cells, pixels = trainer.method.box
    mask = trainer.sets.paint_mask_pixels
    assert float(mask[pixels].sum()) == float(mask.sum()) > 0, "every painted pixel is inside the box"
    latent_box = torch.zeros(model.x0_shape)[cells[1:]]
    assert latent_box.shape[-1] * model.pixels_per_x0_cell == mask[pixels].shape[-1]
    with monkeypatch.context() as patch:
        patch.setattr(losses, "PAINTED_BOX_MARGIN", 0)
        tight_cells, tight_pixels = losses.painted_box(trainer.context, painted=True)
        assert mask[tight_pixels].numel() < mask.numel(), "an unpainted border is not decoded"
    whole = _pixel_trainer(model, target, Image.fromarray(painted), forget_target="surrogate")
    assert whole.method.box[1] == (slice(None),) * 4
    loss = trainer.method.forget_loss(trainer.context)
    loss.backward()
    grads = [p.grad for name, p in model.denoiser.named_parameters() if "lora_B" in name]
    assert torch.isfinite(loss) and any(g is not None and float(g.abs().sum()) > 0 for g in grads)


def test_a_job_with_several_targets_spends_its_forget_batch_on_the_unfixed_ones(tiny_models):
    """Once one target has reached stop_at_r and another has not, forget samples come only from
    the unfixed target's states; with every target fixed or none, or no early stop, from all."""
    from unlearn_core.config import UnlearnConfig
    from unlearn_core.sets import encode_sets, record_target_states
    from unlearn_core.trainer import UnlearnTrainer

    model = load_model(str(tiny_models["sd"]), "cpu")
    model.add_lora(2, 2.0)
    pictures = [_picture((0, 0, 200)), _picture((200, 0, 0))]
    sets = encode_sets(model, pictures, pictures, [PROMPT, PROMPT], pictures, [PROMPT, PROMPT], [0, 1])
    with model.adapter_disabled():
        sets.target_states = record_target_states(model, sets.targets, 4, 2.0)

    def trainer(stop_at_r=0.8):
        config = UnlearnConfig(remember_loss="denoise", forget_target="surrogate", generation_steps=4, guidance_scale=2.0, stop_at_r=stop_at_r, batch_size=16, seed=2)
        return UnlearnTrainer(model, config, sets)

    focused = trainer()
    focused.stop_rule.target_r = [0.85, 0.3]
    rows = focused._rows_to_forget()
    labels = sets.target_states.label
    assert rows is not None and set(labels[rows].tolist()) == {1} and len(rows) == int((labels == 1).sum())
    assert set(labels[rows[focused.draws.indices(len(rows), 16)]].tolist()) == {1}
    for target_r, stop_at_r in (([0.85, 0.9], 0.8), ([0.1, 0.3], 0.8), ([0.85, 0.3], 0.0), ([], 0.8)):
        unfocused = trainer(stop_at_r)
        unfocused.stop_rule.target_r = target_r
        assert unfocused._rows_to_forget() is None


def _tiny_trajectory_trainer(tiny_models):
    """A tiny real SD with a LoRA and the sets of trajectory forgetting, and a maker of trainers on
    them (the trajectory re-recorded every step, the LoRA drawn afresh from the same seed)."""
    from unlearn_core.config import UnlearnConfig
    from unlearn_core.run import EvalTarget, paint_masks
    from unlearn_core.sets import encode_sets, record_target_states
    from unlearn_core.trainer import UnlearnTrainer

    model = load_model(str(tiny_models["sd"]), "cpu")
    sets = encode_sets(model, [TARGET], [SURROGATE], [PROMPT], [TARGET], [PROMPT], [0])
    sets.paint_mask_pixels, sets.paint_mask = paint_masks(model, [EvalTarget(PROMPT, 0, TARGET, SURROGATE)])
    sets.pictures = [(TARGET, SURROGATE)]
    with model.adapter_disabled():
        prepared = record_target_states(model, sets.targets, 3, 2.0)

    def trainer(folder=None, fresh=True, **settings):
        if fresh:
            model.remove_lora()
            torch.manual_seed(0)
            model.add_lora(2, 2.0)
        sets.target_states = prepared
        config = UnlearnConfig(**{"remember_loss": "denoise", "generation_steps": 3, "guidance_scale": 2.0, "steps": 4, "trajectory_refresh": 1, "seed": 1, **settings})
        return UnlearnTrainer(model, config, sets, folder)

    return model, trainer


def _scripted_r(monkeypatch, values):
    """Each re-recording of the target's trajectory really happens; its r is then the next of
    `values` (a tiny random model cannot move its output toward a surrogate on cue)."""
    from unlearn_core.training.control import StopWhenFixed

    record = getattr(StopWhenFixed.refresh, "__wrapped__", StopWhenFixed.refresh)  # the real one, if scripted before
    script = iter(values)

    def refresh(self, ctx):
        record(self, ctx)
        self.target_r = [next(script)]

    refresh.__wrapped__ = record
    monkeypatch.setattr(StopWhenFixed, "refresh", refresh)


def test_training_stops_at_the_first_refresh_that_finds_the_target_fixed(tiny_models, monkeypatch):
    """r ≥ stop_at_r at a refresh ends training there; short of it, the run goes on to `steps`,
    and every row reports `steps` as the most it may take. Forgetting at random states measures no
    r and stop_at_r 0 asks for every step."""
    _, trainer = _tiny_trajectory_trainer(tiny_models)
    _scripted_r(monkeypatch, [0.3, 0.5, 0.76, 0.9])
    log = trainer(steps=6, stop_at_r=0.75).train()
    assert [row["step"] for row in log] == [1, 2, 3] and {row["total"] for row in log} == {6}
    assert [row["toward_surrogate"] for row in log] == [0.3, 0.5, 0.76]
    _scripted_r(monkeypatch, [0.3, 0.5, 0.6, 0.7])
    assert len(trainer(steps=4, stop_at_r=0.75).train()) == 4
    _scripted_r(monkeypatch, [0.9] * 4)
    assert len(trainer(steps=4, stop_at_r=0.0).train()) == 4
    random_states = trainer(steps=3, forget_states="random")
    assert random_states.stop_rule is None and len(random_states.train()) == 3


def test_a_resumed_run_repeats_the_uninterrupted_one(tiny_models, tmp_path):
    """Cancelled after step 2 and resumed from its checkpoint, a run trains steps 3 and 4 exactly as
    the run that was never stopped: the weights, AdamW, the shared draws, the method and the stop
    rule all come back through their state_dicts."""
    from unlearn_core.trainer import TrainingCancelled

    _, trainer = _tiny_trajectory_trainer(tiny_models)
    whole = trainer(tmp_path / "whole", checkpoint_every=0, stop_at_r=0.99).train()
    steps_done = []
    cut = trainer(tmp_path / "cut", checkpoint_every=0, stop_at_r=0.99)
    cut.on_step, cut.should_stop = (lambda report: steps_done.append(report.step)), (lambda: len(steps_done) >= 2)
    with pytest.raises(TrainingCancelled):
        cut.train()
    resumed = trainer(tmp_path / "cut", fresh=False, checkpoint_every=0, stop_at_r=0.99).train()
    assert [row["step"] for row in resumed] == [1, 2, 3, 4]
    for key in ("loss_forget", "loss_remember", "cosine", "toward_surrogate"):
        assert [row[key] for row in resumed] == pytest.approx([row[key] for row in whole], rel=1e-5), key


def test_a_fresh_run_in_a_used_folder_starts_its_loss_log_anew(tiny_models, tmp_path):
    """The same --out twice (as the README's demo command may well be run) gives the second run's
    steps only, not both runs' one after the other; a resumed run still continues its log (the
    kill-and-resume tests)."""
    import csv

    _, trainer = _tiny_trajectory_trainer(tiny_models)
    for _ in range(2):
        trainer(tmp_path, steps=2, checkpoint_every=0).train()
        with open(tmp_path / "loss_log.csv", newline="") as handle:
            assert [int(row["step"]) for row in csv.DictReader(handle)] == [1, 2]


def test_remember_trajectories_are_recorded_once_and_read_back_from_the_cache(tiny_models, tmp_path):
    """A second job on the same prompt and seeds reads the frozen model's recorded states from the
    cache (the denoiser is not run) and gets exactly the states the first recorded, with the
    adapter off whatever it holds; a torn file is recorded again."""
    from unlearn_core.cache import GenerationCache

    model = load_model(str(tiny_models["sd"]), "cpu")
    model.add_lora(2, 2.0)
    for name, parameter in model.denoiser.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0, 0.5)  # an adapter that changes every prediction
    cache = GenerationCache(tmp_path / "cache")
    calls = []
    handle = model.denoiser.register_forward_hook(lambda *args: calls.append(1))
    try:
        first = cache.get_or_record(model, PROMPT, [3, 4, 5], 3, 2.0)
        sampled = len(calls)
        again = cache.get_or_record(model, PROMPT, [3, 4, 5], 3, 2.0)
        assert sampled == 3 and len(calls) == sampled, "the second call must read the record, not sample"
    finally:
        handle.remove()
    with model.adapter_disabled():
        frozen = model.record_sampling(PROMPT, [3, 4, 5], 3, 2.0)
    for record in (first, again):
        for name in ("x_t", "timesteps", "out_cond", "out_uncond"):
            assert torch.equal(getattr(record, name), getattr(frozen, name)), name
        assert torch.equal(record.cond["encoder_hidden_states"], frozen.cond["encoder_hidden_states"])
        assert torch.equal(record.uncond["encoder_hidden_states"], frozen.uncond["encoder_hidden_states"])
        assert [np.asarray(image).tolist() for image in record.images] == [np.asarray(image).tolist() for image in frozen.images]
    assert again.prompt == PROMPT
    (stored,) = list((tmp_path / "cache").rglob("states_*.safetensors"))
    stored.write_bytes(stored.read_bytes()[:100])
    assert torch.equal(cache.get_or_record(model, PROMPT, [3, 4, 5], 3, 2.0).x_t, frozen.x_t)
    assert cache.get_or_record(model, PROMPT, [3, 4], 3, 2.0).x_t.shape[0] == 2 * 3, "other seeds are another record"


def test_the_work_estimate_counts_every_step_a_job_may_take():
    """The estimate grows with `steps`, the most a job trains (the stop rule only ends it sooner;
    no setting plans more), by the work of one step and its share of re-recordings."""
    from unlearn_core.config import UnlearnConfig, estimated_work

    config = UnlearnConfig()
    per_step = (config.batch_size + config.remember_batch_size) * 3
    per_refresh = config.generation_steps * 2 * 2  # guided: two rows per sampling step, then the frozen model's pass
    longer = UnlearnConfig(steps=config.steps + config.trajectory_refresh)
    assert estimated_work(longer) - estimated_work(config) == config.trajectory_refresh * per_step + per_refresh
