import os
from pathlib import Path

import pytest

from tests.tiny import save_tiny
from unlearn_core import settings

os.environ.setdefault("HOTFIX_DOWNLOAD_TIMEOUT", "3")

# The longest files start first: with `--no-loadscope-reorder` (the Makefile) pytest-xdist's
# loadfile scheduling hands files to the workers in collection order; by default it would start the
# files with the most tests first, and the one-test browser file, the longest, would end the run alone.
LONGEST_FILES_FIRST = ("test_browser.py", "test_hardening.py", "test_ray.py", "test_restart.py", "test_accounts.py", "test_gpu_slots.py", "test_ddp.py")


def pytest_collection_modifyitems(items):
    rank = {name: index for index, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its own order


@pytest.fixture(autouse=True)
def fresh_settings():
    """Each test reads the environment as a fresh process would (its monkeypatched variables too)."""
    settings.forget()
    yield
    settings.forget()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Folders of tiny saved pipelines, one per family (built once per test session)."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {kind: save_tiny(kind, root / kind) for kind in ("sd", "sd-v", "sd3", "sdxl", "ddpm")}


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("generation-cache")

