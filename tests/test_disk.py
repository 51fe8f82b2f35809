"""Bounded disk (issue 37, finding 6): the generation cache stays under HOTFIX_CACHE_MAX_GB, least
recently used entries out first; Gradio's temporary files are deleted on a schedule; a full disk
is answered with a plain message (a real, full tmpfs made in the test).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from PIL import Image

from unlearn_core import settings
from unlearn_core.cache import GenerationCache
from unlearn_core.errors import DiskFull, OperatorError
from unlearn_core.files import save_image_atomic, write_bytes_atomic
from unlearn_core.models import load_model

DEMO = str(settings.DEMO_MODEL_DIR)


def seed_files(cache: GenerationCache) -> dict[int, Path]:
    return {int(file.stem.removeprefix("seed_")): file for file in cache.root.rglob("seed_*.png")}


def test_the_generation_cache_stays_under_its_limit_least_recently_used_out_first(tmp_path):
    model = load_model(DEMO, "cpu")
    cache = GenerationCache(tmp_path / "cache", max_bytes=10**9)
    _, made = cache.get_or_generate(model, "flag of chad", [0, 1, 2, 3, 4, 5], 2, 2.0)
    assert made == 6
    assert sorted(seed_files(cache)) == [0, 1, 2, 3, 4, 5]
    cache.max_bytes = cache.size()  # full: six entries
    time.sleep(0.05)
    _, made = cache.get_or_generate(model, "flag of chad", [0, 1], 2, 2.0)  # read back: 0 and 1 are now the most recently used
    assert made == 0
    time.sleep(0.05)
    _, made = cache.get_or_generate(model, "flag of chad", [6, 7], 2, 2.0)
    assert made == 2
    kept = seed_files(cache)
    assert cache.size() <= cache.max_bytes
    assert {0, 1, 6, 7} <= set(kept), f"the entries just read and just written stay: {sorted(kept)}"
    evicted = [seed for seed in (2, 3, 4, 5) if seed not in kept]
    assert evicted and evicted == [2, 3, 4, 5][:len(evicted)], f"oldest first: {evicted}"
    _, made = cache.get_or_generate(model, "flag of chad", [2], 2, 2.0)
    assert made == 1, "an evicted entry is generated again"

    assert settings.Settings.from_env({}).cache_max_gb == 5.0
    assert settings.Settings.from_env({"HOTFIX_CACHE_MAX_GB": "0.5"}).cache_max_gb == 0.5
    with pytest.raises(ValueError, match="HOTFIX_CACHE_MAX_GB"):
        settings.Settings.from_env({"HOTFIX_CACHE_MAX_GB": "-1"})


def test_gradio_s_temporary_files_are_deleted_on_a_schedule(tmp_path):
    from app import DELETE_CACHE, build
    from ui.common import Services
    from unlearn_core.store import JobStore

    frequency, age = DELETE_CACHE
    assert 0 < frequency <= age <= 24 * 3600
    assert build(Services(JobStore(tmp_path / "runs"), None, "cpu")).delete_cache == DELETE_CACHE


@pytest.fixture
def full_disk(tmp_path):
    """A 256 kB tmpfs, filled to the last byte."""
    folder = tmp_path / "small-disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small file system here: {mounted.stderr.strip()}")
    try:
        (folder / "cache").mkdir()
        (folder / "job").mkdir()
        with open(folder / "filler", "wb", buffering=0) as filler:
            try:
                while True:
                    filler.write(bytes(4096))
            except OSError:
                pass
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_a_full_disk_is_answered_in_plain_words(full_disk):
    with pytest.raises(DiskFull) as caught:
        save_image_atomic(Image.new("RGB", (64, 64), (10, 20, 30)), full_disk / "job" / "after_0.png")
    message = str(caught.value)
    assert isinstance(caught.value, OperatorError) and message.startswith("the disk is full: could not write after_0.png"), message
    assert str(full_disk) not in message
    assert list((full_disk / "job").iterdir()) == [], "no temporary file is left behind"
    with pytest.raises(DiskFull):
        write_bytes_atomic(full_disk / "new-folder" / "deeper" / "config.json", b"{}" * 10_000)

    model = load_model(DEMO, "cpu")
    cache = GenerationCache(full_disk / "cache", max_bytes=10**9)
    images, made = cache.get_or_generate(model, "flag of chad", [0, 1], 2, 2.0)  # the cache is optional: the images still come
    assert made == 2 and len(images) == 2 and list(cache.root.rglob("*.png")) == []
