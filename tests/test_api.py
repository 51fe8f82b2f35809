"""The real app server, driven through its named API endpoints with gradio_client."""

from __future__ import annotations

import json
import shutil
import time
import zipfile
from pathlib import Path

import pytest

from benchmarks.app_server import AppServer

ROOT = Path(__file__).resolve().parent.parent
SHORT_CONFIG = {"steps": 4, "stop_at_r": 0.0, "remember_count": 2, "eval_seeds": 2, "generation_steps": 4, "batch_size": 2, "checkpoint_every": 0}
JOB_TIMEOUT_S = 420


def wait_for_job(client, job_id: str, states=("done",), timeout_s: float = JOB_TIMEOUT_S, server: AppServer | None = None) -> dict:
    deadline = time.monotonic() + timeout_s
    status = {}
    while time.monotonic() < deadline:
        status = client.predict(job_id, api_name="/job_status")
        if status["state"] in states:
            return status
        if status["state"] in ("failed", "cancelled", "interrupted") and status["state"] not in states:
            raise AssertionError(f"job {job_id} ended {status['state']}: {status.get('error')}\n{server.tail() if server else ''}")
        time.sleep(2)
    raise TimeoutError(f"job {job_id} still {status.get('state')} after {timeout_s} s: {status}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    app = AppServer(root / "runs", cache_dir=root / "cache").start()
    yield app
    app.stop()


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server.url, verbose=False)


def test_endpoints_are_named(client):
    names = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/generate", "/make_surrogate", "/start_unlearning", "/job_status", "/download_adapter"} <= names


def test_bad_seeds_are_refused_with_the_reason(client):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="cannot read seeds"):
        client.predict("flag of ireland", "zero-seven", 4, 5.0, api_name="/generate")


def test_generate_surrogate_unlearn_download(client, server, tmp_path):
    from gradio_client import handle_file
    from PIL import Image
    from safetensors.torch import load_file

    gallery, provenance = client.predict("flag of ireland", "0-1", 4, 5.0, api_name="/generate")
    assert len(gallery) == 2 and [p["seed"] for p in provenance] == [0, 1]
    assert provenance[0]["prompt"] == "flag of ireland" and provenance[0]["steps"] == 4
    target_file = gallery[1]["image"]
    assert Path(target_file).is_file()

    surrogate_file, similarity = client.predict("flip", handle_file(target_file), "", 0.6, 0.2, 0, 4, None, api_name="/make_surrogate")
    assert Path(surrogate_file).is_file()
    assert "SSIM" in similarity and "PSNR" in similarity

    job_id, queued = client.predict("flag of ireland", 1, handle_file(surrogate_file), handle_file(target_file), json.dumps(SHORT_CONFIG), api_name="/start_unlearning")
    assert queued["id"] == job_id and queued["total"] == 4
    done = wait_for_job(client, job_id, server=server)
    assert done["step"] == 4

    weights, card, bundle = client.predict(job_id, api_name="/download_adapter")
    with zipfile.ZipFile(bundle) as archive:  # the whole adapter folder, without the flagged images
        assert {"pytorch_lora_weights.safetensors", "lora_kohya.safetensors", "README.md", "adapter_card.json"} == set(archive.namelist())
    state = load_file(weights)
    assert state and any("lora" in key for key in state)
    card_data = json.loads(Path(card).read_text())
    assert card_data["targets"][0]["seed"] == 1 and card_data["config"]["steps"] == 4

    # try it: base vs adapter on the target seed; afterwards the server's model is the base again
    pairs, note = client.predict(job_id, None, "", "1", 4, api_name="/try_adapter")
    assert [item["caption"].split(" ·")[0] for item in pairs] == ["base", "adapter"] and "seed 1" in pairs[0]["caption"]
    again, _ = client.predict("flag of ireland", "1", 4, 5.0, api_name="/generate")
    assert same_pixels(again[0]["image"], target_file), "the adapter stayed attached to the shared model"
    assert same_pixels(pairs[0]["image"], target_file), "base output inside adapter_disabled() differs from the plain model"
    assert Image.open(pairs[0]["image"]).width >= 192, "compared pairs are shown enlarged"
    uploaded = tmp_path / "adapter.safetensors"
    shutil.copy(weights, uploaded)
    pairs_upload, _ = client.predict("", handle_file(str(uploaded)), "flag of ireland", "1", 4, api_name="/try_adapter")
    assert same_pixels(pairs_upload[1]["image"], pairs[1]["image"])
    assert not same_pixels(pairs[1]["image"], pairs[0]["image"], tolerance=0), "the adapter changed nothing"


def same_pixels(a, b, tolerance: int = 2) -> bool:
    """Equal up to CPU batch numerics (a seed generated alone vs in a batch differs by ~1 level)."""
    import numpy as np
    from PIL import Image

    first, second = (Image.open(p).convert("RGB") for p in (a, b))
    if first.width > second.width and first.width % second.width == 0:  # shown enlarged, each pixel a block: its own pixels back
        first = first.resize(second.size, Image.Resampling.NEAREST)
    x, y = (np.asarray(image, dtype=np.int16) for image in (first, second))
    return x.shape == y.shape and int(np.abs(x - y).max()) <= tolerance


def test_start_refuses_bad_config(client, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError
    from PIL import Image

    image = tmp_path / "s.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(image)
    with pytest.raises(AppError, match="steps must be between"):
        client.predict("flag of ireland", 1, handle_file(str(image)), None, json.dumps({"steps": 10**9}), api_name="/start_unlearning")
    with pytest.raises(AppError, match="not valid JSON"):
        client.predict("flag of ireland", 1, handle_file(str(image)), None, "{steps: 4", api_name="/start_unlearning")
    with pytest.raises(AppError, match="no job"):
        client.predict("no such job", api_name="/job_status")
    text = tmp_path / "not-an-image.png"
    text.write_text("hello")
    with pytest.raises(AppError, match="not an image file PIL can read"):  # its header is read by our own check first
        client.predict("flip", handle_file(str(text)), "", 0.6, 0.2, 0, 4, None, api_name="/make_surrogate")
    with pytest.raises(AppError, match="no target"):
        client.predict("flip", None, "", 0.6, 0.2, 0, 4, None, api_name="/make_surrogate")
