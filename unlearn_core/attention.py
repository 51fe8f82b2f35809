"""Cross-attention capture for diffusers denoisers (the instruction-forgetting probe's evidence).

Swaps the attention processors of a `UNet2DConditionModel` (cross-attention layers) or an
`SD3Transformer2DModel` (joint attention) for capturing ones through `set_attn_processor`,
inside a context manager that puts the original processors back, also after an exception:

    tracer = AttentionTracer(heatmap_resolution=16)
    with capture_attention(pipe.unet, tracer):
        pipe(prompt, callback_on_step_end=tracer.step_callback, ...)
    trace = tracer.trace()          # mass (steps, batch, tokens), heatmaps (steps, batch, tokens, R, R)

The capture processors compute the softmax explicitly (diffusers' plain `AttnProcessor` math for
cross-attention; `JointAttnProcessor2_0` math written out for SD3), so the layer output is the same
as with the stock processors up to float rounding. Memory stays bounded: per denoising step the
tracer only keeps a running sum of (a) the attention mass per text token, averaged over queries and
heads, and (b) a coarse heat map per token (each layer's map resized to R x R), then averages over
layers. The step index comes from the pipeline's `callback_on_step_end` (`tracer.step_callback`).

For SD3's joint attention the captured block is image query -> text key, renormalised over the
text keys so that, as for cross-attention, each query's row is a distribution over text tokens;
the share of attention the image queries give to text at all is kept as `text_share`.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor

__all__ = [
    "AttentionTrace",
    "AttentionTracer",
    "CrossAttentionCaptureProcessor",
    "JointAttentionCaptureProcessor",
    "capture_attention",
    "spatial_grid",
]


@dataclass
class AttentionTrace:
    """What one captured pipeline call leaves behind (all tensors on the CPU, float32).

    mass:       (steps, batch, tokens) mean over layers, heads and image queries of A[q, j];
                each row sums to 1 over the text tokens.
    heatmaps:   (steps, batch, tokens, R, R) per-token attention over the image, averaged over
                heads and layers after resizing each layer's map to R x R; None if disabled.
    text_share: (steps, batch) fraction of the image queries' attention that goes to text keys
                (1.0 for cross-attention; < 1 for SD3 joint attention).
    timesteps:  the scheduler timestep of each recorded step (from the callback), may be empty.
    layers:     names of the captured attention modules.
    """

    mass: torch.Tensor
    heatmaps: torch.Tensor | None
    text_share: torch.Tensor
    timesteps: list[float] = field(default_factory=list)
    layers: list[str] = field(default_factory=list)


def spatial_grid(queries: int, aspect: float = 1.0) -> tuple[int, int] | None:
    """(h, w) with h * w == queries and w / h closest to `aspect`; None if nothing fits well."""
    if queries <= 0:
        return None
    guess = max(1, round(math.sqrt(queries / aspect)))
    for delta in range(0, guess):
        for h in (guess - delta, guess + delta):
            if h >= 1 and queries % h == 0:
                w = queries // h
                if abs(math.log((w / h) / aspect)) < 0.7:
                    return h, w
    return None


class _StepAccumulator:
    """Running sums of one denoising step, over all captured layer calls."""

    def __init__(self):
        self.mass: torch.Tensor | None = None
        self.share: torch.Tensor | None = None
        self.calls = 0
        self.heat: torch.Tensor | None = None
        self.heat_calls = 0

    def add(self, mass: torch.Tensor, share: torch.Tensor, heat: torch.Tensor | None) -> None:
        if self.mass is not None and self.mass.shape != mass.shape:
            raise RuntimeError(f"attention batch changed within one step: {tuple(self.mass.shape)} then {tuple(mass.shape)}")
        self.mass = mass if self.mass is None else self.mass + mass
        self.share = share if self.share is None else self.share + share
        self.calls += 1
        if heat is not None:
            self.heat = heat if self.heat is None else self.heat + heat
            self.heat_calls += 1


class AttentionTracer:
    """Aggregates captured attention per denoising step; one tracer per pipeline call.

    heatmap_resolution: side R of the per-token heat maps (0 disables them).
    images_per_call:    number of images the pipeline makes per call. When the denoiser sees twice
                        as many samples (classifier-free guidance, diffusers' [uncond, cond] order),
                        only the conditional half is kept. None keeps the whole batch.
    aspect:             width / height of the latent, to fold image queries back into a grid.
    keep_raw:           keep the first N raw probability tensors (for tests and inspection):
                        list of (layer, probs (batch, heads, queries, keys)).
    """

    def __init__(self, heatmap_resolution: int = 16, images_per_call: int | None = None, aspect: float = 1.0, keep_raw: int = 0):
        if heatmap_resolution < 0:
            raise ValueError("heatmap_resolution must be >= 0")
        self.heatmap_resolution = int(heatmap_resolution)
        self.images_per_call = images_per_call
        self.aspect = float(aspect)
        self.keep_raw = int(keep_raw)
        self.reset()

    def reset(self) -> None:
        self.step = 0
        self.timesteps: list[float] = []
        self.layers: list[str] = []
        self.raw: list[tuple[str, torch.Tensor]] = []
        self._steps: dict[int, _StepAccumulator] = {}

    # -- pipeline hook -------------------------------------------------------------------------
    def step_callback(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        """`callback_on_step_end`: the denoiser calls after this belong to step `step + 1`."""
        self.timesteps.append(float(timestep))
        self.step = int(step) + 1
        return callback_kwargs

    # -- called by the processors --------------------------------------------------------------
    def _conditional(self, probs: torch.Tensor) -> torch.Tensor:
        n = self.images_per_call
        if n is not None and probs.shape[0] == 2 * n:
            return probs[n:]
        return probs

    def record(self, layer: str, probs: torch.Tensor, share: torch.Tensor | None = None) -> None:
        """probs: (batch, heads, image queries, text tokens), rows summing to 1 over the tokens.

        share: (batch, heads, queries) fraction of attention on text before renormalisation.
        """
        with torch.no_grad():
            probs = self._conditional(probs.detach()).float()
            if layer not in self.layers:
                self.layers.append(layer)
            if len(self.raw) < self.keep_raw:
                self.raw.append((layer, probs.cpu().clone()))
            batch, _, queries, _ = probs.shape
            per_head = probs.mean(dim=1)  # (B, Q, K)
            mass = per_head.mean(dim=1).cpu()  # (B, K)
            if share is None:
                text_share = torch.ones(batch)
            else:
                text_share = self._conditional(share.detach()).float().mean(dim=(1, 2)).cpu()
            heat = None
            grid = spatial_grid(queries, self.aspect) if self.heatmap_resolution else None
            if grid is not None:
                h, w = grid
                maps = per_head.transpose(1, 2).reshape(batch, -1, h, w)  # (B, K, h, w)
                size = (self.heatmap_resolution, self.heatmap_resolution)
                if (h, w) != size:
                    maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False, antialias=h > size[0] or w > size[1])
                heat = maps.cpu()
            self._steps.setdefault(self.step, _StepAccumulator()).add(mass, text_share, heat)

    # -- results -------------------------------------------------------------------------------
    def trace(self) -> AttentionTrace:
        if not self._steps:
            raise RuntimeError("no attention was captured: did the denoiser run inside capture_attention()?")
        steps = sorted(self._steps)
        accs = [self._steps[s] for s in steps]
        mass = torch.stack([a.mass / a.calls for a in accs])
        share = torch.stack([a.share / a.calls for a in accs])
        heat = None
        if all(a.heat is not None for a in accs):
            heat = torch.stack([a.heat / a.heat_calls for a in accs])
        return AttentionTrace(mass=mass, heatmaps=heat, text_share=share, timesteps=list(self.timesteps), layers=list(self.layers))


class CrossAttentionCaptureProcessor(AttnProcessor):
    """diffusers' plain `AttnProcessor` (explicit softmax) that reports cross-attention probabilities."""

    def __init__(self, tracer: AttentionTracer, name: str):
        super().__init__()
        self.tracer = tracer
        self.name = name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        if encoder_hidden_states is None:  # self-attention: nothing to capture
            return super().__call__(attn, hidden_states, None, attention_mask, temb, *args, **kwargs)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = encoder_hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        query = attn.head_to_batch_dim(query)
        key = attn.head_to_batch_dim(key)
        value = attn.head_to_batch_dim(value)

        attention_probs = attn.get_attention_scores(query, key, attention_mask)
        self.tracer.record(self.name, attention_probs.view(batch_size, attn.heads, *attention_probs.shape[1:]))
        hidden_states = torch.bmm(attention_probs, value)
        hidden_states = attn.batch_to_head_dim(hidden_states)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class JointAttentionCaptureProcessor:
    """`JointAttnProcessor2_0` (SD3) with the softmax written out; reports image-query -> text-key."""

    def __init__(self, tracer: AttentionTracer, name: str):
        self.tracer = tracer
        self.name = name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        residual = hidden_states
        batch_size = hidden_states.shape[0]

        def heads(x, head_dim):
            return x.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query, key, value = heads(query, head_dim), heads(key, head_dim), heads(value, head_dim)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if encoder_hidden_states is not None:
            context_query = heads(attn.add_q_proj(encoder_hidden_states), head_dim)
            context_key = heads(attn.add_k_proj(encoder_hidden_states), head_dim)
            context_value = heads(attn.add_v_proj(encoder_hidden_states), head_dim)
            if attn.norm_added_q is not None:
                context_query = attn.norm_added_q(context_query)
            if attn.norm_added_k is not None:
                context_key = attn.norm_added_k(context_key)
            query = torch.cat([query, context_query], dim=2)
            key = torch.cat([key, context_key], dim=2)
            value = torch.cat([value, context_value], dim=2)

        scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * attn.scale
        probs = scores.softmax(dim=-1)  # (B, heads, image + text queries, image + text keys)
        if encoder_hidden_states is not None:
            image_tokens = residual.shape[1]
            block = probs[:, :, :image_tokens, image_tokens:]  # image query -> text key
            share = block.sum(dim=-1)
            self.tracer.record(self.name, block / share.clamp_min(1e-12).unsqueeze(-1), share=share)
            if self.tracer.keep_raw and len(self.tracer.raw) < self.tracer.keep_raw:
                self.tracer.raw.append((self.name + ":full", probs.detach().cpu().clone()))
        hidden_states = torch.matmul(probs.to(value.dtype), value)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = hidden_states[:, : residual.shape[1]], hidden_states[:, residual.shape[1] :]
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


def _is_joint(processor) -> bool:
    return "JointAttnProcessor" in type(processor).__name__


def _capture_plan(model: torch.nn.Module, tracer: AttentionTracer) -> dict:
    """The processor dict to install: capture processors on cross/joint attention, others kept."""
    originals = model.attn_processors
    plan, captured = {}, 0
    for key, processor in originals.items():
        name = key[: -len(".processor")] if key.endswith(".processor") else key
        module = model.get_submodule(name)
        if _is_joint(processor):
            if "Fused" in type(processor).__name__:
                raise ValueError(f"{name} uses fused QKV projections; call unfuse_qkv_projections() before capturing")
            plan[key] = JointAttentionCaptureProcessor(tracer, name)
            captured += 1
        elif getattr(module, "is_cross_attention", False):
            plan[key] = CrossAttentionCaptureProcessor(tracer, name)
            captured += 1
        else:
            plan[key] = processor
    if not captured:
        raise ValueError(f"{type(model).__name__} has no cross-attention or joint-attention layers to capture")
    return plan


@contextmanager
def capture_attention(model: torch.nn.Module, tracer: AttentionTracer | None = None, **tracer_options) -> Iterator[AttentionTracer]:
    """Install capturing processors on `model` (a UNet2DConditionModel or SD3Transformer2DModel).

    Yields the tracer; the original processors are restored on exit, also after an exception.
    Pass `tracer.step_callback` as the pipeline's `callback_on_step_end` to split by step.
    """
    if not hasattr(model, "set_attn_processor") or not hasattr(model, "attn_processors"):
        raise ValueError(f"{type(model).__name__} does not expose attention processors")
    tracer = tracer if tracer is not None else AttentionTracer(**tracer_options)
    originals = model.attn_processors
    plan = _capture_plan(model, tracer)
    model.set_attn_processor(plan)  # set_attn_processor consumes the dict it is given
    try:
        yield tracer
    finally:
        model.set_attn_processor(dict(originals))
