"""The method's math (DESIGN §2): noising coefficients, training and surrogate targets, λ(s), projection.

Pure tensor functions with no model inside, so each is tested exactly against its formula.
"""

from __future__ import annotations

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "flow")


def noisy_sample(x0: torch.Tensor, noise: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x_t = a_t·x0 + b_t·ε (a, b broadcast over the sample's dimensions)."""
    return a * x0 + b * noise


def training_target(prediction_type: str, x0: torch.Tensor, noise: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """T(x0, ε): ε for epsilon models, a·ε − b·x0 for v-prediction, ε − x0 for rectified flow."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return a * noise - b * x0
    if prediction_type == "flow":
        return noise - x0
    raise ValueError(f"unknown prediction type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


def surrogate_target(prediction_type: str, x_t: torch.Tensor, surrogate: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Eq. 9–11: the target that makes the model's x0-estimate at x_t equal the surrogate x_s.

    ε' = (x_t − a·x_s) / b, then T(x_s, ε'). For flow (a = 1 − σ, b = σ) this is ε' − x_s = (x_t − x_s)/σ.
    """
    implied_noise = (x_t - a * surrogate) / b
    return training_target(prediction_type, surrogate, implied_noise, a, b)


def forget_weight(s: torch.Tensor, schedule: str = "timestep", gamma: float = 1.0, constant: float = 0.5) -> torch.Tensor:
    """λ(s) in [0, 1] for normalised time s ∈ [0, 1]: s^γ ('timestep') or a constant."""
    s = s.clamp(0.0, 1.0)
    if schedule == "timestep":
        return s.pow(gamma)
    if schedule == "constant":
        return torch.full_like(s, float(constant))
    raise ValueError(f"unknown λ schedule {schedule!r}; expected 'timestep' or 'constant'")


def project_conflicting(g_forget: torch.Tensor, g_remember: torch.Tensor, mode: str = "forget") -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Gradient surgery on flat gradients (Eq. 12–13).

    If ⟨g_f, g_r⟩ < 0: 'forget' removes from g_f its component along g_r; 'both' also removes
    from g_r its component along the original g_f (PCGrad); 'none' changes nothing.
    Returns (g_f, g_r, projected).
    """
    if mode not in ("none", "forget", "both"):
        raise ValueError(f"unknown projection {mode!r}; expected none, forget or both")
    dot = torch.dot(g_forget, g_remember)
    if mode == "none" or dot >= 0:
        return g_forget, g_remember, False
    eps = torch.finfo(g_forget.dtype).tiny
    new_forget = g_forget - dot / (g_remember.dot(g_remember) + eps) * g_remember
    new_remember = g_remember
    if mode == "both":
        new_remember = g_remember - dot / (g_forget.dot(g_forget) + eps) * g_forget
    return new_forget, new_remember, True


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two flat gradients (0 when either is zero)."""
    denominator = a.norm() * b.norm()
    return float(a.dot(b) / denominator) if denominator > 0 else 0.0


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample, shape (B,)."""
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(1)
