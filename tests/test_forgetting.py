"""The forgetting measure, the x0-space and trajectory pieces of the method, and the noise fixes."""

import numpy as np
import pytest
import torch
from PIL import Image

from unlearn_core.config import max_training_steps
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
    frozen model's sampling states of two seeds as the remember pool."""
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
    sets = encode_sets(model, [picture], [picture], ["x"], [], [], [0])
    with model.adapter_disabled():
        sets.remember_states = remember_pool([model.record_sampling("x", [1, 2], 6, 5.0)])
    return model, sets


def test_the_remember_loss_holds_large_noise_levels_harder_when_boosted(tiny_models):
    """remember_large_t_boost k weights each remember sample by (1 + k·s): over a batch of sampling
    states at every noise level the loss grows by more than 1× and less than (1 + k)×, and not at
    all with k = 0 (the same draw, the same adapter)."""
    from unlearn_core.config import UnlearnConfig
    from unlearn_core.trainer import UnlearnTrainer

    model, sets = _moved_adapter_and_remember_states(tiny_models)
    losses = {}
    for boost in (0.0, 3.0):
        config = UnlearnConfig(forget_states="random", forget_target="surrogate", remember_batch_size=12, remember_renoised=0, remember_large_t_boost=boost, seed=3)
        with torch.no_grad():
            losses[boost] = float(UnlearnTrainer(model, config, sets)._remember_loss_distill())
    assert losses[0.0] > 0
    assert 1.05 < losses[3.0] / losses[0.0] < 4.0, losses


def test_past_the_planned_steps_the_remember_loss_weighs_extend_remember_factor(tiny_models):
    """Training past `steps` (only while a target is not yet fixed) holds the other seeds with
    extend_remember_factor × remember_weight; before that, with the full weight."""
    from unlearn_core.config import UnlearnConfig
    from unlearn_core.trainer import UnlearnTrainer

    model, sets = _moved_adapter_and_remember_states(tiny_models)
    losses = {}
    for step in (9, 10, 14):
        config = UnlearnConfig(forget_states="random", forget_target="surrogate", remember_renoised=0, steps=10, extend_remember_factor=0.25, seed=3)
        trainer = UnlearnTrainer(model, config, sets)
        trainer.step = step  # steps done so far: the next is step + 1
        with torch.no_grad():
            losses[step] = float(trainer._remember_loss_distill())
    assert losses[9] > 0
    assert losses[10] == pytest.approx(0.25 * losses[9], rel=1e-5) and losses[14] == pytest.approx(losses[10], rel=1e-5), losses


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


def test_the_pixel_forget_loss_decodes_only_the_painted_box_and_trains_the_adapter(tiny_models):
    """The box holds every painted pixel and its cells map onto its pixels; the whole-surrogate
    target decodes everything; the loss reaches the LoRA weights through the VAE decoder."""
    from unlearn_core import trainer as trainer_module

    model = load_model(str(tiny_models["sd"]), "cpu")
    model.add_lora(2, 2.0)
    target = _picture((0, 0, 200))
    painted = np.asarray(target).copy()
    painted[2:5, 12:15] = (200, 0, 40)  # a small patch in the top-right corner
    trainer = _pixel_trainer(model, target, Image.fromarray(painted))
    cells, pixels = trainer.painted_box
    mask = trainer.sets.paint_mask_pixels
    assert float(mask[pixels].sum()) == float(mask.sum()) > 0, "every painted pixel is inside the box"
    latent_box = torch.zeros(model.x0_shape)[cells[1:]]
    assert latent_box.shape[-1] * model.pixels_per_x0_cell == mask[pixels].shape[-1]
    margin = trainer_module.PAINTED_BOX_MARGIN
    trainer_module.PAINTED_BOX_MARGIN = 0
    try:
        tight_cells, tight_pixels = _pixel_trainer(model, target, Image.fromarray(painted)).painted_box
        assert mask[tight_pixels].numel() < mask.numel(), "an unpainted border is not decoded"
    finally:
        trainer_module.PAINTED_BOX_MARGIN = margin
    whole = _pixel_trainer(model, target, Image.fromarray(painted), forget_target="surrogate")
    assert whole.painted_box[1] == (slice(None),) * 4
    loss = trainer._forget_loss_trajectory()
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
    focused.target_r = [0.85, 0.3]
    rows = focused._unfixed_target_rows()
    labels = sets.target_states.label
    assert rows is not None and set(labels[rows].tolist()) == {1} and len(rows) == int((labels == 1).sum())
    drawn = focused._predict_on_pool(sets.target_states, 16, rows)[6]
    assert set(drawn.tolist()) == {1}
    for target_r, stop_at_r in (([0.85, 0.9], 0.8), ([0.1, 0.3], 0.8), ([0.85, 0.3], 0.0), ([], 0.8)):
        unfocused = trainer(stop_at_r)
        unfocused.target_r = target_r
        assert unfocused._unfixed_target_rows() is None


def _tiny_trajectory_trainer(tiny_models):
    """A tiny real SD with a LoRA and the sets of trajectory forgetting, and a maker of trainers on
    them (two steps, the trajectory re-recorded every step, up to three more steps while not fixed)."""
    from unlearn_core.config import UnlearnConfig
    from unlearn_core.run import EvalTarget, paint_masks
    from unlearn_core.sets import encode_sets, record_target_states
    from unlearn_core.trainer import UnlearnTrainer

    model = load_model(str(tiny_models["sd"]), "cpu")
    model.add_lora(2, 2.0)
    sets = encode_sets(model, [TARGET], [SURROGATE], [PROMPT], [TARGET], [PROMPT], [0])
    sets.paint_mask_pixels, sets.paint_mask = paint_masks(model, [EvalTarget(PROMPT, 0, TARGET, SURROGATE)])
    sets.pictures = [(TARGET, SURROGATE)]
    with model.adapter_disabled():
        sets.target_states = record_target_states(model, sets.targets, 3, 2.0)

    def trainer(folder=None, **settings):
        config = UnlearnConfig(**{"remember_loss": "denoise", "generation_steps": 3, "guidance_scale": 2.0, "steps": 2, "trajectory_refresh": 1, "extend_until_fixed": 3, "seed": 1, **settings})
        return UnlearnTrainer(model, config, sets, folder)

    return model, trainer


def test_training_goes_on_past_steps_only_while_the_target_is_not_yet_fixed(tiny_models):
    """After `steps`, a target short of r 0.7 gets up to `extend_until_fixed` more steps (the
    reported total says so); one already fixed, a run that never measures r and a run with
    stop_at_r 0 stop at `steps`."""
    model, trainer = _tiny_trajectory_trainer(tiny_models)
    log = trainer().train()  # two steps of a tiny random model cannot move the target to r 0.7
    assert log[1]["toward_surrogate"] < 0.7
    assert [row["step"] for row in log] == [1, 2, 3, 4, 5]
    assert [row["total"] for row in log] == [max_training_steps(trainer().config)] * 5 == [2 + 3 + 15] * 5  # one total, the most it may train
    model.remove_lora()
    model.add_lora(2, 2.0)
    assert len(trainer(extend_until_fixed=0).train()) == 2
    fixed = trainer()
    fixed.step, fixed.target_r = 2, [0.75]
    assert fixed.step_budget == 2
    fixed.target_r = [0.5]
    assert fixed.step_budget == 5
    for settings in ({"forget_states": "random"}, {"stop_at_r": 0.0}):  # r never measured, or exactly `steps` asked for
        unextended = trainer(**settings)
        unextended.step, unextended.target_r = 2, [0.5]
        assert unextended.step_budget == 2


def _scripted_r(monkeypatch, values):
    """Each re-recording of the target's trajectory really happens; its r is then the next of
    `values` (a tiny random model cannot move its output toward a surrogate on cue)."""
    from unlearn_core.trainer import UnlearnTrainer

    record = getattr(UnlearnTrainer._refresh_target_states, "__wrapped__", UnlearnTrainer._refresh_target_states)  # the real one, if scripted before
    script = iter(values)

    def refresh(self):
        record(self)
        self.target_r = [next(script)]

    refresh.__wrapped__ = record
    monkeypatch.setattr(UnlearnTrainer, "_refresh_target_states", refresh)


def test_once_fixed_the_run_consolidates_with_the_heavier_remember_loss(tiny_models, monkeypatch):
    """Fixed at step 2 (r ≥ stop_at_r): `consolidate_steps` more steps follow, the remember loss
    weighted consolidate_remember_factor × remember_weight, and the last weights are kept while
    r stays within CONSOLIDATION_R_SLACK of where it was fixed. consolidate_steps 0 stops where
    the target is fixed, and so does a target fixed with less than CONSOLIDATION_R_SLACK to spare."""
    model, trainer = _tiny_trajectory_trainer(tiny_models)
    _scripted_r(monkeypatch, [0.3, 0.85, 0.84, 0.81, 0.83])
    run = trainer(steps=10, consolidate_steps=3, consolidate_remember_factor=4.0)
    assert run._remember_weight == pytest.approx(run.config.remember_weight)
    log = run.train()
    assert [row["step"] for row in log] == [1, 2, 3, 4, 5]  # fixed at step 2, then 3 steps consolidating
    assert [row["total"] for row in log] == [max_training_steps(run.config)] * 5 == [10 + 3 + 3] * 5  # the reported total never moves
    assert run.consolidating_since == 2 and run.consolidation_floor == pytest.approx(0.8)
    assert run.kept_step is None and run.toward_surrogate == 0.83
    assert run._remember_weight == pytest.approx(4.0 * run.config.remember_weight)
    model.remove_lora()
    model.add_lora(2, 2.0)
    _scripted_r(monkeypatch, [0.3, 0.85])
    assert len(trainer(steps=10, consolidate_steps=0).train()) == 2
    _scripted_r(monkeypatch, [0.3, 0.72])  # fixed at `steps` with less than CONSOLIDATION_R_SLACK to spare above 0.7
    thin = trainer(steps=2, consolidate_steps=3)
    assert len(thin.train()) == 2 and thin.consolidating_since is None and thin.toward_surrogate == 0.72


def _neighbours(model, *seeds):
    """(prompt, seed, image) of the frozen model's `seeds`, as `nearest_neighbours` gives them."""
    with model.adapter_disabled():
        return [(PROMPT, seed, image) for seed, (image, _) in zip(seeds, model.generate(PROMPT, list(seeds), 3, 2.0))]


def test_a_slow_climb_whose_neighbours_are_kept_halves_the_remember_weight(tiny_models, monkeypatch):
    """neighbour_checks: while r climbs fast, no check; once it gains under 0.05 in 10 steps, the
    nearest seeds are sampled, at most every 10 steps. An adapter that has hardly moved (a tiny
    learning rate) keeps them at SSIM ≥ 0.95, so each check halves the remember weight."""
    model, trainer = _tiny_trajectory_trainer(tiny_models)
    run = trainer(steps=35, extend_until_fixed=0, neighbour_checks=2, learning_rate=1e-7)
    run.sets.neighbours = _neighbours(model, 5, 6)
    _scripted_r(monkeypatch, [0.05 * step for step in range(1, 11)] + [0.6] * 25)
    log = run.train()
    assert [(row["step"], row["remember_scale"]) for row in log if row["neighbours_ssim"] is not None] == [(21, 0.5), (31, 0.25)]
    assert all(row["neighbours_ssim"] >= 0.95 for row in log if row["neighbours_ssim"] is not None)
    assert log[19]["remember_scale"] == 1.0 and log[-1]["remember_scale"] == 0.25
    assert run._remember_weight == pytest.approx(0.25 * run.config.extend_remember_factor * run.config.remember_weight)
    from ui.results_tab import neighbours_note
    from unlearn_core.run import summarise

    assert "lightened to 25%" in neighbours_note(summarise(run)) and "step 31" in neighbours_note(summarise(run))


def test_neighbours_that_have_left_double_the_remember_weight_back_then_end_the_checks(tiny_models, monkeypatch, tmp_path):
    """A check that finds a neighbour under SSIM 0.9 doubles the remember weight back, up to the
    configured weight; one that finds it so at the full weight ends the checks, and the target then
    keeps the full weight past `steps` too: its slow climb is what holds its neighbours. A resumed
    job carries on from the same point."""
    from PIL import Image

    from unlearn_core.trainer import UnlearnTrainer

    model, trainer = _tiny_trajectory_trainer(tiny_models)
    run = trainer(tmp_path, steps=45, extend_until_fixed=0, neighbour_checks=1, checkpoint_every=40)
    prompt, seed, image = _neighbours(model, 5)[0]
    run.sets.neighbours = [(prompt, seed, Image.new("RGB", image.size, (128, 128, 128)))]  # not what the model draws
    run.remember_scale = 0.25
    _scripted_r(monkeypatch, [0.3] * 46)
    log = run.train()
    assert [(row["step"], row["remember_scale"]) for row in log if row["neighbours_ssim"] is not None] == [(11, 0.5), (21, 1.0), (31, 1.0)]
    assert run.neighbours_settled and run.step == 45
    assert run._remember_weight == pytest.approx(run.config.remember_weight)
    from ui.results_tab import neighbours_note
    from unlearn_core.run import summarise

    summary = summarise(run)
    assert [check["step"] for check in summary["neighbour_checks"]] == [11, 21, 31] and summary["remember_scale"] == 1.0
    assert "kept at full weight" in neighbours_note(summary) and "step 31" in neighbours_note(summary)
    resumed = UnlearnTrainer(model, run.config, run.sets, tmp_path)  # the checkpoint of step 40
    assert resumed.load_checkpoint() and resumed.step == 40
    assert resumed.neighbours_settled and resumed.remember_scale == 1.0 and resumed.last_neighbour_check == 31 and resumed._r_at(30) == 0.3


def test_a_target_whose_neighbours_are_leaving_trains_to_steps_when_held_before_a_fix_ends_it(tiny_models, monkeypatch):
    """Not yet fixed at `steps` (r 0.3 at step 25), with its nearest seed found leaving at the full
    remember weight: the target is held, and reaching r 0.72 at step 31 does not end the job; the
    first fixed refresh at or past steps_when_held (40) does. Without the checks it ends at 31."""
    from PIL import Image

    model, trainer = _tiny_trajectory_trainer(tiny_models)
    prompt, seed, image = _neighbours(model, 5)[0]
    ends = {}
    for checks in (1, 0):
        run = trainer(steps=25, steps_when_held=40, extend_until_fixed=30, neighbour_checks=checks)
        run.sets.neighbours = [(prompt, seed, Image.new("RGB", image.size, (128, 128, 128)))]
        _scripted_r(monkeypatch, [0.3] * 30 + [0.72] * 20)
        log = run.train()
        ends[checks] = (log[-1]["step"], run.held)
    assert ends == {1: (40, True), 0: (31, False)}


def test_consolidation_that_loses_the_fix_keeps_the_last_weights_that_had_it(tiny_models, monkeypatch, tmp_path):
    """r 0.85 at step 1 begins consolidation, which may let r fall to 0.8; steps 2 and 3 keep it,
    step 4 does not: consolidation ends there, the saved weights are step 3's, and r and the
    summary say so. A checkpoint taken while consolidating resumes it."""
    from unlearn_core.run import summarise
    from unlearn_core.trainer import UnlearnTrainer

    model, trainer = _tiny_trajectory_trainer(tiny_models)
    _scripted_r(monkeypatch, [0.85, 0.8, 0.82, 0.75, 0.9])
    weights = {}
    run = trainer(tmp_path, steps=10, consolidate_steps=4, checkpoint_every=2)
    run.on_step = lambda report: weights.setdefault(report.step, {name: value.clone() for name, value in run._trainable_state().items()})
    run.train()
    assert run.consolidating_since == 1 and run.step == 4 and run.kept_step == 3 and run.toward_surrogate == 0.82
    assert not torch.equal(weights[3][next(iter(weights[3]))], weights[4][next(iter(weights[4]))])
    for name, value in run._trainable_state().items():
        assert torch.equal(value, weights[3][name]), name
    summary = summarise(run)
    assert summary["steps_run"] == 4 and summary["weights_of_step"] == 3 and summary["consolidated_from_step"] == 1
    assert summary["toward_surrogate_when_stopped"] == 0.82
    resumed = UnlearnTrainer(model, run.config, run.sets, tmp_path)  # the checkpoint of step 2, mid-consolidation
    assert resumed.load_checkpoint() and resumed.step == 2 and resumed.consolidating_since == 1
    assert resumed.fixed_weights["step"] == 2 and resumed.consolidation_floor == pytest.approx(0.8) and resumed.step_budget == 5


def test_a_fresh_run_in_a_used_folder_starts_its_loss_log_anew(tiny_models, tmp_path):
    """The same --out twice (as the README's demo command may well be run) gives the second run's
    steps only, not both runs' one after the other; a resumed run still continues its log (the
    kill-and-resume tests)."""
    import csv

    _, trainer = _tiny_trajectory_trainer(tiny_models)
    for _ in range(2):
        trainer(tmp_path, extend_until_fixed=0, checkpoint_every=0).train()
        with open(tmp_path / "loss_log.csv", newline="") as handle:
            assert [int(row["step"]) for row in csv.DictReader(handle)] == [1, 2]


def test_renoised_remember_distils_the_frozen_model_at_fresh_noisings(tiny_models):
    """remember_renoised: the remember seeds' final images, each with its own prompt's conditioning
    (the empty prompt's record gives the unconditional rows), noised afresh; the frozen model's
    prediction there is the teacher, so an adapter that has not moved has exactly zero error and
    one that has moved does not."""
    from unlearn_core.config import UnlearnConfig
    from unlearn_core.run import renoise_sources
    from unlearn_core.sets import encode_sets, remember_pool
    from unlearn_core.trainer import UnlearnTrainer

    model = load_model(str(tiny_models["sd"]), "cpu")
    model.add_lora(2, 2.0)
    sets = encode_sets(model, [TARGET], [SURROGATE], [PROMPT], [], [], [0])
    with model.adapter_disabled():
        records = [model.record_sampling(prompt, [1, 2, 3], 3, 2.0) for prompt in (PROMPT, "")]
    sets.remember_states = remember_pool(records)
    sets.remember_x0, sets.remember_cond = renoise_sources(model, records)
    assert sets.remember_x0.shape[0] == 6
    embeds = sets.remember_cond["encoder_hidden_states"]
    assert torch.allclose(embeds[:3], model.encode_prompts([PROMPT] * 3)["encoder_hidden_states"], atol=1e-5)  # batched text encoding rounds differently
    assert torch.allclose(embeds[3:], model.encode_prompts([""] * 3)["encoder_hidden_states"], atol=1e-5)
    assert not torch.allclose(embeds[:3], embeds[3:], atol=1e-2)
    config = UnlearnConfig(forget_states="random", forget_target="surrogate", remember_renoised=5, seed=2)

    def renoised_error():
        x_t, t, cond, teacher = UnlearnTrainer(model, config, sets)._renoised_remember_samples(5)
        return objectives.per_sample_mse(model.predict(model.denoiser, x_t, t, cond).float(), teacher)

    with torch.no_grad():
        unmoved = renoised_error()
        for name, parameter in model.denoiser.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
        moved = renoised_error()
    assert unmoved.shape == moved.shape == (5,)
    assert torch.all(unmoved == 0) and torch.all(moved > 0), (unmoved, moved)


def test_renoised_images_beyond_the_remember_seeds_come_from_the_cache(tiny_models, tmp_path):
    """renoised_seed_multiple > 1 (remember_choice 'first'): each remember prompt's next seeds (the target's skipped)
    are generated into the cache and renoised with that prompt's conditioning; evaluation never
    uses them; preparation inside adapter_disabled leaves a resumed adapter's layers off throughout."""
    from unlearn_core.cache import GenerationCache
    from unlearn_core.config import UnlearnConfig
    from unlearn_core.images import to_tensor
    from unlearn_core.run import EvalTarget, prepare_sets

    model = load_model(str(tiny_models["sd"]), "cpu")
    model.add_lora(2, 2.0)
    config = UnlearnConfig(remember_count=2, renoised_seed_multiple=3, remember_seed_offset=10, generation_steps=3, guidance_scale=2.0, trajectory_refresh=0, remember_choice="first")
    cache = GenerationCache(tmp_path / "cache")
    sets = prepare_sets(model, [EvalTarget(PROMPT, 13, TARGET, SURROGATE)], config, cache)
    assert list(config.remember_seeds) == [10, 11, 12, 13, 14, 15]
    assert sets.remember_x0.shape[0] == 2 * 5  # (PROMPT, "") × (seeds 10, 11 recorded; 12, 14, 15 from the cache)
    for row, prompt in ((2, PROMPT), (7, "")):
        extra, generated = cache.get_or_generate(model, prompt, [12, 14, 15], 3, 2.0)
        assert generated == 0
        assert torch.allclose(sets.remember_x0[row : row + 3], model.encode_images(to_tensor(extra)), atol=1e-5)
    embeds = sets.remember_cond["encoder_hidden_states"]
    assert torch.allclose(embeds[:5], model.encode_prompts([PROMPT] * 5)["encoder_hidden_states"], atol=1e-5)
    assert torch.allclose(embeds[5:], model.encode_prompts([""] * 5)["encoder_hidden_states"], atol=1e-5)
    with model.adapter_disabled():
        with model.adapter_disabled():
            pass
        assert all(layer.disable_adapters for layer in model.denoiser.modules() if hasattr(layer, "lora_A"))
    assert not any(layer.disable_adapters for layer in model.denoiser.modules() if hasattr(layer, "lora_A"))


def test_a_flagged_prompts_recorded_remember_seeds_are_the_pool_seeds_nearest_the_flagged_image(tiny_models, tmp_path):
    """remember_choice 'nearest': of the flagged prompt's pool (remember_count × renoised_seed_multiple
    seeds), the remember_count whose images are nearest the flagged output are recorded and the rest
    renoised; the empty prompt, with no flagged image, keeps its first seeds; 'first' keeps them everywhere."""
    from unlearn_core.cache import GenerationCache
    from unlearn_core.config import UnlearnConfig
    from unlearn_core.run import EvalTarget, nearest_neighbours, remember_records, remember_seed_plan

    model = load_model(str(tiny_models["sd"]), "cpu")
    cache = GenerationCache(tmp_path / "cache")
    pool = [10, 11, 12, 13, 14, 15]
    images = cache.get_or_generate(model, PROMPT, pool, 3, 2.0)[0]
    flagged = images[4]  # seed 14's image, flagged as if it were seed 99's: at distance 0
    distance = [np.abs(np.asarray(image, dtype=float) - np.asarray(flagged, dtype=float)).mean() for image in images]
    second = pool[int(np.argsort(distance)[1])]  # the nearest is seed 14 itself, which 'first' would not record
    targets = [EvalTarget(PROMPT, 99, flagged, SURROGATE)]
    nearest = UnlearnConfig(remember_count=2, renoised_seed_multiple=3, remember_seed_offset=10, generation_steps=3, guidance_scale=2.0)
    plan = remember_seed_plan(model, [PROMPT, ""], nearest, targets, cache)
    assert plan[0] == (sorted([14, second]), [seed for seed in pool if seed not in (14, second)])
    assert plan[1] == ([10, 11], [12, 13, 14, 15])
    first = UnlearnConfig(**{**nearest.to_dict(), "remember_choice": "first"})
    assert remember_seed_plan(model, [PROMPT, ""], first, targets, cache)[0] == ([10, 11], [12, 13, 14, 15])
    records, more = remember_records(model, [PROMPT], nearest, targets, cache)
    assert [np.asarray(image).tolist() for image in records[0].images] == [np.asarray(images[pool.index(seed)]).tolist() for seed in sorted([14, second])]
    assert len(more[0]) == 4
    checked = nearest_neighbours(model, targets, UnlearnConfig(**{**nearest.to_dict(), "neighbour_checks": 1}), cache)
    assert [(prompt, seed) for prompt, seed, _ in checked] == [(PROMPT, 14)] and np.array_equal(np.asarray(checked[0][2]), np.asarray(images[4]))


def test_the_remember_set_knows_beforehand_how_many_images_it_will_sample(tiny_models, tmp_path):
    """The remember set's progress count: `remember_set_images` says how many images preparing the
    sets will sample (pool, recorded trajectories, the target's own), and that many are sampled,
    on a cold cache and on the warm one the first job left (only the target's trajectory)."""
    from unlearn_core.cache import GenerationCache
    from unlearn_core.config import UnlearnConfig
    from unlearn_core.run import EvalTarget, prepare_sets, remember_set_images

    model = load_model(str(tiny_models["sd"]), "cpu")
    cache = GenerationCache(tmp_path / "cache")
    targets = [EvalTarget(PROMPT, 99, TARGET, SURROGATE)]
    config = UnlearnConfig(remember_count=2, renoised_seed_multiple=3, remember_seed_offset=10, generation_steps=2, guidance_scale=2.0, neighbour_checks=1)
    for expected in (6 + 2 + 6 + 1, 1):  # the flagged prompt's pool of 6 and its 2 nearest recorded; the empty prompt's 2 recorded and 4 more; the target
        sampled = []
        assert remember_set_images(model, targets, config, cache) == expected
        with model.counting_images(sampled.append):
            prepare_sets(model, targets, config, cache)
        assert sum(sampled) == expected


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


def test_remember_weight_scales_the_denoising_remember_loss_too(tiny_models):
    """remember_weight multiplies the denoising remember loss exactly, as it does distillation
    (the denoising loss once ignored it, so extension and consolidation did nothing there)."""
    from PIL import Image as PILImage

    from unlearn_core.config import UnlearnConfig
    from unlearn_core.sets import encode_sets
    from unlearn_core.trainer import UnlearnTrainer

    model = load_model(str(tiny_models["sd"]), "cpu")
    model.add_lora(2, 2.0)
    picture = PILImage.new("RGB", (16, 16), (200, 40, 40))
    sets = encode_sets(model, [picture], [picture], ["x"], [picture, picture], ["x", "y"], [0])
    losses = {}
    for weight in (1.0, 3.0):
        config = UnlearnConfig(forget_states="random", forget_target="surrogate", remember_loss="denoise", remember_weight=weight, seed=3)
        with torch.no_grad():
            losses[weight] = float(UnlearnTrainer(model, config, sets)._remember_loss_denoise())
    assert losses[1.0] > 0 and losses[3.0] == pytest.approx(3.0 * losses[1.0], rel=1e-5)


def test_the_work_estimate_counts_every_step_a_job_may_take():
    """The estimate covers the most steps the trainer may take: a held target's `steps_when_held`,
    the extension past `steps` and consolidation (issue: it once counted `steps` alone)."""
    from unlearn_core.config import UnlearnConfig, estimated_work

    config = UnlearnConfig(steps=60, steps_when_held=400, extend_until_fixed=90, consolidate_steps=15)
    per_step = (config.batch_size + config.remember_batch_size) * 3 + config.remember_renoised * 4
    more = UnlearnConfig(**{**config.to_dict(), "steps_when_held": 410})
    assert estimated_work(more) - estimated_work(config) >= 10 * per_step, "steps_when_held beyond the extension is counted"
    unheld = UnlearnConfig(**{**config.to_dict(), "steps_when_held": 1, "neighbour_checks": 0})
    assert estimated_work(unheld) < estimated_work(config)
