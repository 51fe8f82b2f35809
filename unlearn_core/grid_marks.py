"""Marks on a seed grid: which images look wrong, to help the operator find the bad output.

- The demo model: the flag judge (`demo.quality.judge_marks`) names the flag it sees instead.
- Other models: a CLIP outlier score, when CLIP's weights can be loaded (`probe.load_clip`: the
  `HOTFIX_CLIP_MODEL` setting, else CLIP ViT-B/32 from the local cache or the hub). Each image's CLIP
  embedding is compared with the mean of the grid's other images; an image is marked when that
  distance is far above the grid's own spread (a robust z-score). Without CLIP there are no marks,
  and the reason says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from unlearn_core import settings
from unlearn_core.config import DEMO_MODEL
from unlearn_core.demo.quality import judge_marks

# Iglewicz & Hoaglin's cut-off for the modified z-score (0.6745·(x − median)/MAD): beyond 3.5 a
# value is an outlier of its batch. It is the textbook constant, not tuned on any grid here.
OUTLIER_Z = 3.5
# A floor for the MAD, in cosine distance: without it a grid of near-identical images (MAD ≈ 0)
# would mark any image that differs by rounding.
MAD_FLOOR = 0.002
MIN_IMAGES = 4  # with fewer, "the odd one out" has no majority to be odd against

FLAG_JUDGE = "flag judge"


@dataclass
class GridMarks:
    """Per image, a short mark where the judge thinks it wrong (else None); `marks` is None when the
    judge has nothing to say, and `reason` says why."""

    marks: list[str | None] | None
    judge: str | None  # "flag judge" or "CLIP outlier score (<model>)"
    reason: str | None = None


def outlier_scores(embeddings: torch.Tensor) -> list[float]:
    """Modified z-score of each row's cosine distance to the mean of the other rows (n ≥ 2)."""
    unit = torch.nn.functional.normalize(embeddings.float(), dim=-1)
    others = (unit.sum(dim=0, keepdim=True) - unit) / (len(unit) - 1)
    distance = 1 - torch.nn.functional.cosine_similarity(unit, others, dim=-1)
    median = distance.median()
    mad = max(float((distance - median).abs().median()), MAD_FLOOR)
    return [float(v) for v in 0.6745 * (distance - median) / mad]


def clip_marks(images: list[Image.Image], clip_source: str | None = None) -> GridMarks:
    """The CLIP outlier marks of a grid, or no marks with the reason (CLIP missing, too few images)."""
    from unlearn_core.probe.text import load_clip  # the probe owns CLIP loading and its cache

    if len(images) < MIN_IMAGES:
        return GridMarks(None, None, f"an odd one out needs a grid of at least {MIN_IMAGES} images")
    scorer, reason = load_clip(clip_source)
    if scorer is None:
        source = clip_source or settings.current().clip_model
        if source:  # a folder by its name only: the page never shows a server path
            reason = reason.replace(source, Path(source).name)
        return GridMarks(None, None, f"the outlier score needs CLIP's weights, and none could be loaded: {reason}")
    scores = outlier_scores(scorer.image_embeddings(images))
    marks = [f"odd one out (score {score:.1f})" if score > OUTLIER_Z else None for score in scores]
    return GridMarks(marks, f"CLIP outlier score ({Path(scorer.source).name or scorer.source})")  # a folder by its name only


def mark_grid(prompt: str, images: list[Image.Image], model_source: str) -> GridMarks:
    """The flag judge for the demo model, the CLIP outlier score for any other."""
    if model_source == DEMO_MODEL:
        marks = judge_marks(prompt, images)
        return GridMarks(marks, FLAG_JUDGE, None if marks is not None else "the flag judge knows only the demo model's flags (flag of NAME)")
    return clip_marks(images)
