"""Metrics on known pairs, honest availability, and every bad image answered clearly."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from unlearn_core import metrics, settings
from unlearn_core.errors import ImageError
from unlearn_core.images import fit_to_size, is_blank, open_image


def _image(seed, size=32):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def test_identical_images_score_perfectly():
    a = [_image(0), _image(1)]
    result = metrics.compare(a, [img.copy() for img in a], names=("ssim", "psnr"))
    assert result["ssim"]["value"] == pytest.approx(1.0, abs=1e-6)
    assert result["psnr"]["value"] >= 99.0
    assert len(result["ssim"]["per_pair"]) == 2


def test_different_images_score_worse():
    a = [_image(0)]
    noisy = Image.fromarray(np.clip(np.asarray(a[0], dtype=np.int16) + np.random.default_rng(9).integers(-40, 40, (32, 32, 3)), 0, 255).astype(np.uint8))
    close = metrics.compare(a, [noisy], names=("ssim", "psnr"))
    far = metrics.compare(a, [_image(5)], names=("ssim", "psnr"))
    assert 1.0 > close["ssim"]["value"] > far["ssim"]["value"]
    assert 99.0 > close["psnr"]["value"] > far["psnr"]["value"]


def test_missing_networks_are_reported_unavailable_not_faked(monkeypatch, tmp_path):
    monkeypatch.setenv("HOTFIX_SSCD_PATH", str(tmp_path / "missing" / "sscd.pt"))
    monkeypatch.setattr(metrics, "SSCD_URL", "http://127.0.0.1:9/unreachable.pt")
    metrics.load_sscd.forget()
    try:
        result = metrics.sscd_similarity([_image(0)], [_image(0)])
        assert metrics.load_sscd() == (None, result.reason)  # the failure is remembered for a while, not retried per comparison
    finally:
        metrics.load_sscd.forget()
    assert result.available is False and result.value is None
    assert "HOTFIX_SSCD_PATH" in result.reason


def test_lpips_availability_is_consistent():
    model, reason = metrics.load_lpips()
    result = metrics.lpips_distance([_image(0)], [_image(1)])
    assert result.available == (model is not None)
    if not result.available:
        assert result.value is None and reason


def test_compare_rejects_mismatched_lists():
    with pytest.raises(ValueError):
        metrics.compare([_image(0)], [])


def _png_bytes(image, **kwargs):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty"),
        (b"this is text, not a picture", "not an image"),
        (_png_bytes(_image(0))[:200], "broken or truncated"),
    ],
)
def test_bad_files_get_clear_messages(data, message):
    with pytest.raises(ImageError, match=message):
        open_image(data, "upload")


def test_tiny_and_huge_images_refused():
    with pytest.raises(ImageError, match="too small"):
        open_image(_png_bytes(Image.new("RGB", (1, 1))))
    huge = _png_bytes(Image.new("L", (20000, 20000)))
    with pytest.raises(ImageError, match="too large"):
        open_image(huge)


@pytest.mark.parametrize("mode", ["RGBA", "P", "CMYK", "L", "I;16", "LA"])
def test_unusual_modes_become_rgb(mode):
    image = _image(3).convert(mode) if mode != "I;16" else Image.fromarray((np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 60))
    data = io.BytesIO()
    image.save(data, format="TIFF" if mode in ("CMYK",) else "PNG")
    result = open_image(data.getvalue())
    assert result.mode == "RGB" and result.size == (32, 32)


def test_fit_and_blank_detection():
    assert fit_to_size(_image(0, 50), 16).size == (16, 16)
    assert is_blank(Image.new("RGB", (16, 16), (255, 255, 255)))
    assert not is_blank(_image(0))


def test_missing_file():
    with pytest.raises(ImageError, match="no such file"):
        open_image("/nonexistent/file.png")


class _Constant(torch.nn.Module):
    def forward(self, x):
        return torch.ones(x.shape[0], 512)


class _WrongShape(torch.nn.Module):
    def forward(self, x):
        return x.mean(dim=(2, 3))


class _Pooled(torch.nn.Module):
    """Stands in for a genuine descriptor network: 512 numbers that depend on the image."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 512, 8, stride=8)

    def forward(self, x):
        return self.conv(x).amax(dim=(2, 3))


@pytest.mark.parametrize("network, usable", [(_Constant, False), (_WrongShape, False), (_Pooled, True)])
def test_a_forged_or_wrong_sscd_file_is_unavailable_not_trusted(network, usable, tmp_path, monkeypatch):
    """A TorchScript file is code: one the operator has not pinned (HOTFIX_SSCD_SHA256) and whose
    digest is known nowhere in code is never labelled SSCD, however plausible its output (issue 37,
    finding 7: a 400 kB pool → linear network gave "SSCD available" and a score). Pinned to its own
    digest it must still behave like SSCD; pinned to another digest it is refused."""
    torch.manual_seed(0)
    path = tmp_path / "sscd.pt"
    torch.jit.save(torch.jit.script(network()), str(path))
    monkeypatch.setenv("HOTFIX_SSCD_PATH", str(path))
    monkeypatch.setattr(metrics, "SSCD_URL", "http://127.0.0.1:9/unreachable.pt")
    assert metrics._sha256(path) not in metrics.SSCD_KNOWN_SHA256

    def score():
        settings.forget()
        metrics.load_sscd.forget()
        return metrics.sscd_similarity([_image(0)], [_image(1)])

    try:
        unpinned = score()
        assert unpinned.available is False and unpinned.value is None
        assert unpinned.reason == metrics.UNVERIFIED == "unverified weights (set HOTFIX_SSCD_SHA256 to its digest to trust it)"
        assert metrics.availability()["SSCD"] == {"available": False, "reason": metrics.UNVERIFIED}  # what the Results page lists

        monkeypatch.setenv("HOTFIX_SSCD_SHA256", metrics._sha256(path).upper())  # as the operator pins it, any case
        pinned = score()
        assert pinned.available is usable, pinned.reason
        if not usable:
            assert pinned.value is None and "HOTFIX_SSCD_PATH" in pinned.reason
        monkeypatch.setenv("HOTFIX_SSCD_SHA256", "0" * 64)
        other = score()
        assert other.available is False and "SHA-256" in other.reason
    finally:
        metrics.load_sscd.forget()


def test_without_a_digest_to_check_sscd_is_not_downloaded(tmp_path, monkeypatch):
    """Nothing could verify a downloaded file, so none is fetched; a malformed pin stops the start."""
    monkeypatch.setenv("HOTFIX_SSCD_PATH", str(tmp_path / "sscd.pt"))
    monkeypatch.setattr(metrics, "SSCD_URL", "http://127.0.0.1:9/unreachable.pt")  # a download would fail as "could not download"
    metrics.load_sscd.forget()
    try:
        result = metrics.sscd_similarity([_image(0)], [_image(1)])
    finally:
        metrics.load_sscd.forget()
    assert result.available is False and "download" not in result.reason and "HOTFIX_SSCD_SHA256" in result.reason, result.reason
    with pytest.raises(ValueError, match="HOTFIX_SSCD_SHA256"):
        settings.Settings.from_env({"HOTFIX_SSCD_SHA256": "not-a-digest"})


def test_a_forged_alexnet_file_leaves_lpips_unavailable(tmp_path, monkeypatch):
    """A file in torch's cache under torchvision's AlexNet name that is not torchvision's file (its
    SHA-256 does not start with the digits in the name) is never loaded."""
    from torchvision.models import AlexNet_Weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    name = AlexNet_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1]
    (tmp_path / "torch" / "hub" / "checkpoints").mkdir(parents=True)
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "torch" / "hub" / "checkpoints" / name)
    metrics.load_lpips.forget()
    try:
        result = metrics.lpips_distance([_image(0)], [_image(1)])
        assert result.available is False and "published hash" in result.reason
    finally:
        metrics.load_lpips.forget()


def _flag(stripe, wobble=0):
    """A 32-px tricolour; `wobble` grey levels of smooth shading over the whole image (a redraw)."""
    pixels = np.zeros((32, 32, 3), dtype=np.float32)
    pixels[:, :11], pixels[:, 11:22], pixels[:, 22:] = (0, 130, 60), (250, 250, 250), stripe
    pixels += wobble * np.sin(np.arange(32) / 3.0)[None, :, None]
    return Image.fromarray(pixels.clip(0, 255).round().astype(np.uint8))


def test_a_local_paint_is_local_and_a_redraw_is_global():
    from unlearn_core.surrogate import surrogate_reach

    target = _flag((120, 0, 160))
    local = surrogate_reach(target, _flag((200, 0, 40)))
    assert not local.is_global and local.warning() == "" and 0.3 < local.changed_share < 0.4
    redraw = surrogate_reach(target, _flag((200, 0, 40), wobble=80))
    assert redraw.is_global and "changes" in redraw.warning() and redraw.ssim < local.ssim


def test_keeping_the_main_change_restores_the_target_elsewhere():
    from unlearn_core.surrogate import keep_main_change, surrogate_reach

    target, redraw = _flag((120, 0, 160)), _flag((200, 0, 40), wobble=12)
    kept = np.asarray(keep_main_change(target, redraw), dtype=np.int16)
    assert np.array_equal(kept[:, :20], np.asarray(target, dtype=np.int16)[:, :20]), "the unchanged bands are the target's"
    assert np.abs(kept[:, 24:] - np.asarray(redraw, dtype=np.int16)[:, 24:]).max() == 0, "the recoloured band is the surrogate's"
    assert not surrogate_reach(target, Image.fromarray(kept.astype(np.uint8))).is_global
    with pytest.raises(ImageError, match="no region"):
        keep_main_change(target, _flag((120, 0, 160), wobble=5))


def test_recolour_region_fills_the_connected_region_within_tolerance_and_keeps_the_rest():
    """The region tool: the clicked band takes the new colour; a band of the same colour elsewhere
    (not connected), a soft edge beyond the tolerance and every other pixel keep theirs."""
    from unlearn_core.errors import InvalidInput
    from unlearn_core.surrogate import colour_at, recolour_region

    pixels = np.zeros((8, 12, 3), dtype=np.uint8)
    pixels[:, 0:3] = (120, 0, 160)  # the band clicked
    pixels[:, 3] = (150, 60, 150)  # its soft edge: R+G+B 30+60+10 = 100 away
    pixels[:, 4:8] = (250, 200, 20)
    pixels[:, 8:12] = (120, 0, 160)  # the same colour, not connected
    pixels[2, 1] = (125, 5, 160)  # within tolerance: filled too
    image = Image.fromarray(pixels)
    assert colour_at(image, (0, 0)) == "#7800a0"
    after = np.asarray(recolour_region(image, (1, 4), "#c8102e", tolerance=80))
    assert (after[:, 0:3] == (200, 16, 46)).all()
    assert (after[:, 3:] == pixels[:, 3:]).all()
    with pytest.raises(InvalidInput, match="outside"):
        recolour_region(image, (12, 0), "#c8102e")
    with pytest.raises(InvalidInput, match="colour"):
        recolour_region(image, (0, 0), "not a colour")
