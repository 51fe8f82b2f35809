"""The method's math: noising coefficients, training and surrogate targets, λ(s), projection.

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


def implied_x0(prediction_type: str, x_t: torch.Tensor, prediction: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The clean sample a prediction implies at x_t: (x_t − b·ε̂)/a, a·x_t − b·v̂, or x_t − σ·v̂ (flow)."""
    if prediction_type == "epsilon":
        return (x_t - b * prediction) / a
    if prediction_type == "v_prediction":
        return a * x_t - b * prediction
    if prediction_type == "flow":
        return x_t - b * prediction
    raise ValueError(f"unknown prediction type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


def painted_aim(frozen_x0: torch.Tensor, surrogate: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Where the forget loss aims x̂0: the surrogate on the painted region, the frozen model's own
    estimate everywhere else. Aiming at the whole surrogate would also force the target's
    unpainted pixels (its layout, background) onto x̂0 at large t, where x̂0 is still a blur shared
    by every seed of the prompt: that drags all of them toward this one image."""
    return mask * surrogate + (1 - mask) * frozen_x0


def x0_error_weight(prediction_type: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """w with ‖x̂0 − x0‖² = w·‖pred − target‖² at x_t = a·x0 + b·ε: (b/a)² = 1/SNR for epsilon,
    b² for v-prediction (x̂0 = a·x_t − b·v) and σ² = b² for flow (x̂0 = x_t − σ·v).

    An ε-space error is SNR(t) times the x0 error it implies, so at small t it dwarfs everything:
    stating a loss in x0-space lets λ(s) decide where along t the forgetting happens.
    """
    if prediction_type == "epsilon":
        return (b / a).pow(2)
    if prediction_type in ("v_prediction", "flow"):
        return b.pow(2)
    raise ValueError(f"unknown prediction type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


def guided_prediction(unconditional: torch.Tensor, conditional: torch.Tensor, guidance: float) -> torch.Tensor:
    """Classifier-free guidance as the pipelines apply it: u + w·(c − u) (c alone when w ≤ 1)."""
    if guidance <= 1.0:
        return conditional
    return unconditional + guidance * (conditional - unconditional)


def forget_weight(s: torch.Tensor, schedule: str = "timestep", gamma: float = 1.0, constant: float = 0.5) -> torch.Tensor:
    """λ(s) in [0, 1] for normalised time s ∈ [0, 1]: s^γ ('timestep': forget at large t, the
    paper's form), c·(1 − s)^γ ('timestep-late': forget late in sampling, at small t, at most c,
    so remembering keeps a weight ≥ 1 − c everywhere) or c ('constant')."""
    s = s.clamp(0.0, 1.0)
    if schedule == "timestep":
        return s.pow(gamma)
    if schedule == "timestep-late":
        return float(constant) * (1 - s).pow(gamma)
    if schedule == "constant":
        return torch.full_like(s, float(constant))
    raise ValueError(f"unknown λ schedule {schedule!r}; expected 'timestep', 'timestep-late' or 'constant'")


ROUNDING_NOISE = 1e-3  # a remember gradient below this share of g_f's norm is rounding, not a signal


def without_rounding_noise(g_remember: torch.Tensor, g_forget: torch.Tensor) -> torch.Tensor:
    """g_r, or zeros when it is below ROUNDING_NOISE of g_f's norm.

    Before the adapter moves, the distilled remember loss is the rounding between the recorded
    teacher and the same forward on another batch (~1e-12; exactly 0 when the batches match). Its
    gradient points anywhere, yet projection would remove g_f's component along it, and Adam would
    turn it into full-size steps of the weights g_f leaves at zero (LoRA's A while B is 0)."""
    return torch.zeros_like(g_remember) if g_remember.norm() <= ROUNDING_NOISE * g_forget.norm() else g_remember


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
