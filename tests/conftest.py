import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HOTFIX_DOWNLOAD_TIMEOUT", "3")

from tests.tiny import save_tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Folders of tiny saved pipelines, one per family (built once per test session)."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {kind: save_tiny(kind, root / kind) for kind in ("sd", "sd-v", "sd3", "ddpm")}


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("generation-cache")


@pytest.fixture(scope="session")
def demo_model() -> str:
    return str(ROOT / "assets" / "demo-model")
