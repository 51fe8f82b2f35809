"""What a sampling run records: every state the denoiser saw, with its conditioning and outputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingRecord:
    """The states of sampling runs of B seeds over K steps, flattened (step-major within each chunk of seeds).

    `cond`/`uncond` hold the conditioning rows the pipeline used (B rows each, reused every step);
    `out_cond`/`out_uncond` the denoiser's predictions there (out_uncond is None without guidance).
    """

    x_t: torch.Tensor
    timesteps: torch.Tensor
    out_cond: torch.Tensor
    out_uncond: torch.Tensor | None
    cond: dict[str, torch.Tensor]
    uncond: dict[str, torch.Tensor] | None
    images: list
    prompt: str = ""

    @classmethod
    def from_calls(cls, calls, batch: int, images, prompt: str = "") -> "SamplingRecord":
        guided = calls[0][0].shape[0] == 2 * batch

        def half(tensor, which):
            return tensor[batch * which : batch * (which + 1)] if guided else tensor

        return cls(
            x_t=torch.cat([half(x, 1) for x, _, _, _ in calls]),
            timesteps=torch.cat([half(t, 1) for _, t, _, _ in calls]),
            out_cond=torch.cat([half(out, 1) for _, _, _, out in calls]),
            out_uncond=torch.cat([half(out, 0) for _, _, _, out in calls]) if guided else None,
            cond={k: half(v, 1) for k, v in calls[0][2].items()},
            uncond={k: half(v, 0) for k, v in calls[0][2].items()} if guided else None,
            images=images,
            prompt=prompt,
        )

    @classmethod
    def merge(cls, records: list["SamplingRecord"]) -> "SamplingRecord":
        """Records of the same prompt (sampled in chunks of seeds) as one; conditioning rows are shared."""
        first = records[0]
        if len(records) == 1:
            return first
        return cls(
            x_t=torch.cat([r.x_t for r in records]),
            timesteps=torch.cat([r.timesteps for r in records]),
            out_cond=torch.cat([r.out_cond for r in records]),
            out_uncond=torch.cat([r.out_uncond for r in records]) if first.out_uncond is not None else None,
            cond=first.cond,
            uncond=first.uncond,
            images=[image for r in records for image in r.images],
            prompt=first.prompt,
        )

    def __len__(self) -> int:
        return self.x_t.shape[0]
