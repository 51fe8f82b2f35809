import os
from pathlib import Path

import pytest

from tests.tiny import save_tiny
from unlearn_core import settings

os.environ.setdefault("HOTFIX_DOWNLOAD_TIMEOUT", "3")


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

