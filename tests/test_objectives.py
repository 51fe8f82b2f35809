"""Exact math of the method (unlearn_core/objectives.py): targets per prediction type, surrogate target, λ(s), projection."""

import pytest
import torch

from unlearn_core import objectives


def _sample(seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (3, 4, 5, 5)
    x0, xs, eps = (torch.randn(shape, generator=g) for _ in range(3))
    t = torch.rand(3, generator=g) * 0.9 + 0.05
    return x0, xs, eps, t.view(-1, 1, 1, 1)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "flow"])
def test_surrogate_target_matches_hand_derived_formula(prediction_type):
    x_f, x_s, eps, s = _sample()
    if prediction_type == "flow":
        a, b = 1 - s, s
    else:
        a, b = (1 - s).sqrt(), s.sqrt()  # any a² + b² = 1 pair
    x_t = a * x_f + b * eps
    target = objectives.surrogate_target(prediction_type, x_t, x_s, a, b)
    implied = (x_t - a * x_s) / b
    expected = {
        "epsilon": implied,
        "v_prediction": a * implied - b * x_s,
        "flow": (x_t - x_s) / s,  # ε' − x_s = (x_t − x_s)/σ
    }[prediction_type]
    torch.testing.assert_close(target, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "flow"])
def test_surrogate_target_makes_x0_estimate_equal_surrogate(prediction_type):
    """Rule of thumb of the surrogate target: the model's implied x0 at x_t equals the surrogate."""
    x_f, x_s, eps, s = _sample(1)
    a, b = ((1 - s), s) if prediction_type == "flow" else ((1 - s).sqrt(), s.sqrt())
    x_t = a * x_f + b * eps
    out = objectives.surrogate_target(prediction_type, x_t, x_s, a, b)
    if prediction_type == "epsilon":
        x0_hat = (x_t - b * out) / a
    elif prediction_type == "v_prediction":
        x0_hat = a * x_t - b * out  # valid when a² + b² = 1
    else:
        x0_hat = x_t - s * out
    torch.testing.assert_close(x0_hat, x_s, rtol=1e-4, atol=1e-4)


def test_surrogate_equal_to_target_gives_ordinary_target():
    x_f, _, eps, s = _sample(2)
    a, b = (1 - s).sqrt(), s.sqrt()
    x_t = a * x_f + b * eps
    torch.testing.assert_close(objectives.surrogate_target("epsilon", x_t, x_f, a, b), eps, rtol=1e-4, atol=1e-4)


def test_training_targets():
    x0, _, eps, s = _sample(3)
    a, b = (1 - s).sqrt(), s.sqrt()
    torch.testing.assert_close(objectives.training_target("epsilon", x0, eps, a, b), eps)
    torch.testing.assert_close(objectives.training_target("v_prediction", x0, eps, a, b), a * eps - b * x0)
    torch.testing.assert_close(objectives.training_target("flow", x0, eps, a, b), eps - x0)
    with pytest.raises(ValueError, match="unknown prediction type"):
        objectives.training_target("sample", x0, eps, a, b)


def test_lambda_bounds_and_schedules():
    s = torch.linspace(0, 1, 11)
    for gamma in (0.5, 1.0, 3.0):
        lam = objectives.forget_weight(s, "timestep", gamma)
        assert lam.min() >= 0 and lam.max() <= 1
        assert lam[0] == 0 and lam[-1] == 1
        assert torch.all(lam[1:] >= lam[:-1])
        torch.testing.assert_close(lam, s.pow(gamma))
    torch.testing.assert_close(objectives.forget_weight(s, "constant", constant=0.3), torch.full_like(s, 0.3))
    outside = objectives.forget_weight(torch.tensor([-1.0, 2.0]), "timestep", 1.0)
    assert outside.tolist() == [0.0, 1.0]
    with pytest.raises(ValueError):
        objectives.forget_weight(s, "cosine")


def test_projection_removes_exactly_the_conflicting_component():
    g_f = torch.tensor([1.0, 1.0, 0.0])
    g_r = torch.tensor([-1.0, 0.0, 0.0])
    new_f, new_r, projected = objectives.project_conflicting(g_f, g_r, "forget")
    assert projected
    torch.testing.assert_close(new_f, torch.tensor([0.0, 1.0, 0.0]))
    torch.testing.assert_close(new_r, g_r)
    assert abs(float(new_f.dot(g_r))) < 1e-7


def test_projection_random_vectors_orthogonal_after():
    g = torch.Generator().manual_seed(5)
    for _ in range(20):
        g_f, g_r = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64)
        new_f, _, projected = objectives.project_conflicting(g_f, g_r, "forget")
        if g_f.dot(g_r) < 0:
            assert projected and abs(float(new_f.dot(g_r))) < 1e-10
            # only the component along g_r was removed
            torch.testing.assert_close(new_f - g_f, (-(g_f.dot(g_r)) / g_r.dot(g_r)) * g_r)
        else:
            assert not projected and torch.equal(new_f, g_f)


def test_a_remember_gradient_of_rounding_noise_is_dropped():
    """Before the adapter moves, the remember loss is ~1e-12 of rounding and its gradient points
    anywhere: it is dropped, so neither projection nor Adam acts on it; a real one is kept."""
    g_f = torch.tensor([1.0, 1.0, 0.0])
    noise = torch.tensor([-1e-6, 0.0, 1e-6])
    assert torch.equal(objectives.without_rounding_noise(noise, g_f), torch.zeros(3))
    real = noise * 1e5
    assert torch.equal(objectives.without_rounding_noise(real, g_f), real)


def test_projection_leaves_agreeing_gradients_alone():
    g_f, g_r = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.1])
    for mode in ("none", "forget", "both"):
        new_f, new_r, projected = objectives.project_conflicting(g_f, g_r, mode)
        assert not projected and torch.equal(new_f, g_f) and torch.equal(new_r, g_r)


def test_projection_both_is_pcgrad_and_none_is_identity():
    g_f, g_r = torch.tensor([1.0, 1.0]), torch.tensor([-1.0, 0.5])
    new_f, new_r, projected = objectives.project_conflicting(g_f, g_r, "both")
    assert projected
    assert abs(float(new_f.dot(g_r))) < 1e-6 and abs(float(new_r.dot(g_f))) < 1e-6
    same_f, same_r, flag = objectives.project_conflicting(g_f, g_r, "none")
    assert not flag and torch.equal(same_f, g_f) and torch.equal(same_r, g_r)
    with pytest.raises(ValueError):
        objectives.project_conflicting(g_f, g_r, "pcgrad")
