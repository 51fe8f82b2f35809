"""Marks that help find a bad output in a seed grid: the CLIP outlier score (with a tiny real CLIP
saved as a folder) for other models, the flag judge for the demo model, and plain reasons when
there is nothing to mark."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests import tiny
from ui.generate_tab import marks_note
from unlearn_core import grid_marks
from unlearn_core.config import DEMO_MODEL

ROOT = Path(__file__).resolve().parents[1]


def tricolour_grid(odd_index: int, count: int = 8) -> list[Image.Image]:
    """`count` noisy copies of one tricolour, the one at `odd_index` with its first band purple."""
    rng = np.random.default_rng(0)
    base = np.zeros((64, 64, 3), np.uint8)
    base[:, :21], base[:, 21:42], base[:, 42:] = (0, 150, 0), (255, 255, 255), (255, 130, 0)
    images = []
    for index in range(count):
        pixels = base.copy()
        if index == odd_index:
            pixels[:, :21] = (120, 0, 160)
        images.append(Image.fromarray(np.clip(pixels + rng.normal(0, 6, pixels.shape), 0, 255).astype(np.uint8)))
    return images


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> str:
    return str(tiny.save_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip"))


@pytest.mark.parametrize("odd_index", [0, 5])
def test_the_clip_outlier_score_marks_the_odd_image_and_only_it(clip_folder, odd_index):
    marks = grid_marks.clip_marks(tricolour_grid(odd_index), clip_folder)
    assert [index for index, mark in enumerate(marks.marks) if mark] == [odd_index]
    assert marks.judge == "CLIP outlier score (tiny-clip)", "named by the folder's name, never the server path"
    assert "1 of 8" in marks_note(marks, wanted=True)


def test_a_grid_of_alike_images_gets_no_outlier_mark(clip_folder):
    marks = grid_marks.clip_marks(tricolour_grid(odd_index=-1), clip_folder)
    assert marks.marks == [None] * 8


def test_without_clip_or_with_too_few_images_there_are_no_marks_and_the_note_says_why(tmp_path, clip_folder):
    missing = grid_marks.clip_marks(tricolour_grid(0), str(tmp_path / "no-clip-here"))
    assert missing.marks is None and "CLIP's weights" in missing.reason
    note = marks_note(missing, wanted=True)
    assert note.startswith("No marks: the outlier score needs CLIP's weights") and "no-clip-here" in note
    assert str(tmp_path) not in note, "no server path on the page"
    few = grid_marks.clip_marks(tricolour_grid(0, count=3), clip_folder)
    assert few.marks is None and "at least 4" in few.reason
    assert marks_note(few, wanted=False) == ""


def test_the_demo_model_uses_the_flag_judge_not_clip():
    flagged = Image.open(ROOT / "assets" / "examples" / "chad_seed40_target.png")
    marks = grid_marks.mark_grid("flag of chad", [flagged], DEMO_MODEL)
    assert marks.judge == grid_marks.FLAG_JUDGE and marks.marks[0].startswith("looks like: ")
    other = grid_marks.mark_grid("a red fox", [flagged], DEMO_MODEL)
    assert other.marks is None and "only the demo model's flags" in other.reason
