"""Forgetting and integrity metrics, each with honest availability.

SSCD and LPIPS need pretrained networks that are downloaded on first use. Where they cannot be
had, the metric is reported as unavailable (value None and the reason) — never replaced by a
stand-in under its name. SSIM and PSNR need no weights (torchmetrics).
"""

from __future__ import annotations

import hashlib
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from unlearn_core import settings

SSCD_URL = "https://dl.fbaipublicfiles.com/sscd-copy-detection/sscd_disc_mixup.torchscript.pt"
SSCD_THRESHOLD = 0.4
RETRY_AFTER_S = 600.0  # a failed weight download is tried again after this long, not on every comparison


@dataclass
class MetricResult:
    """One metric over image pairs: mean value, per-pair values, availability and reason."""

    name: str
    available: bool
    value: float | None = None
    per_pair: list[float] = field(default_factory=list)
    reason: str = ""
    higher_is_more_similar: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


def _images_to_tensor(images: list[Image.Image], size: tuple[int, int] | None = None) -> torch.Tensor:
    size = size or images[0].size
    array = np.stack([np.asarray(img.convert("RGB").resize(size), dtype=np.float32) / 255.0 for img in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2)


# -- SSCD --------------------------------------------------------------------------------------
def _download(url: str, destination: Path) -> None:
    """Fetch once into `destination`, with the settings' timeout on this request only."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = destination.with_suffix(".part")
    with urllib.request.urlopen(url, timeout=settings.current().download_timeout_s) as response, open(tmp, "wb") as handle:
        while chunk := response.read(1 << 20):
            handle.write(chunk)
    tmp.replace(destination)


class _Loaded:
    """A network loaded once: success is kept for the process, a failure only for RETRY_AFTER_S
    (a cache that remembered a failed download forever would need a restart to recover)."""

    def __init__(self, load):
        self._load, self._value, self._failed_at = load, None, None

    def __call__(self):
        if self._value is not None:
            return self._value
        if self._failed_at is not None and time.monotonic() - self._failed_at < RETRY_AFTER_S:
            return None, self._reason
        model, reason = self._load()
        if model is None:
            self._failed_at, self._reason = time.monotonic(), reason
            return None, reason
        self._value = (model, "")
        return self._value

    def forget(self) -> None:
        self._value = self._failed_at = None


SSCD_DIMENSIONS = 512
# SHA-256 digests of the official sscd_disc_mixup.torchscript.pt, as published by
# facebookresearch/sscd-copy-detection. Empty: no published digest was found where it could be
# checked, and a digest nobody has seen published or computed from the official file must never be
# written here. Until one is, only the operator's HOTFIX_SSCD_SHA256 makes a file trusted.
SSCD_KNOWN_SHA256: frozenset[str] = frozenset()
UNVERIFIED = "unverified weights (set HOTFIX_SSCD_SHA256 to its digest to trust it)"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _sscd_embed(model, images: list[Image.Image]) -> torch.Tensor:
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = F.interpolate(_images_to_tensor(images), size=(288, 288), mode="bilinear", align_corners=False)
    with torch.no_grad():
        return F.normalize(model((x - mean) / std), dim=1)


def _sscd_problem(model) -> str:
    """Why a loaded TorchScript cannot be SSCD, or "": it must give one 512-d descriptor per image
    and tell a flat black image from random noise (a forged file with a constant output cannot)."""
    probes = [Image.new("RGB", (64, 64)), Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))]
    try:
        embedded = _sscd_embed(model, probes)
    except (RuntimeError, ValueError, TypeError, IndexError) as error:
        return f"the file does not run as SSCD ({type(error).__name__})"
    if tuple(embedded.shape) != (2, SSCD_DIMENSIONS):
        return f"the file gives descriptors of shape {tuple(embedded.shape)}, not (2, {SSCD_DIMENSIONS})"
    if float((embedded[0] * embedded[1]).sum()) > 0.99:
        return "the file gives the same descriptor for unrelated images"
    return ""


def _load_sscd() -> tuple[torch.jit.ScriptModule | None, str]:
    """The official `sscd_disc_mixup` TorchScript, from `Settings.sscd_path`, the cache, or its URL.

    The file is code (TorchScript), so it is verified before it is even loaded: its SHA-256 must be
    the operator's HOTFIX_SSCD_SHA256, or, where none is set, one of SSCD_KNOWN_SHA256. A file that
    matches neither is never labelled SSCD: it is reported unavailable as UNVERIFIED (a forged
    network passes any behavioural check its author wants it to). A verified file must still run
    as SSCD (`_sscd_problem`). Where nothing could verify a file, none is downloaded. Any failure
    makes SSCD unavailable, with the reason, instead of a faked or crashing score."""
    config = settings.current()
    path = config.sscd_path or config.cache_dir / "sscd_disc_mixup.torchscript.pt"
    help_text = "set HOTFIX_SSCD_PATH to a local sscd_disc_mixup.torchscript.pt"
    pinned = (config.sscd_sha256 or "").strip().lower()
    trusted = {pinned} if pinned else SSCD_KNOWN_SHA256
    try:
        if not path.is_file():
            if not trusted:
                return None, f"SSCD needs its network weights: {help_text} and HOTFIX_SSCD_SHA256 to its SHA-256 digest"
            _download(SSCD_URL, path)
        if _sha256(path) not in trusted:
            if pinned:
                return None, f"SSCD weights unavailable (the file's SHA-256 is not HOTFIX_SSCD_SHA256's); {help_text}"
            return None, UNVERIFIED
        model = torch.jit.load(str(path), map_location="cpu").eval()
    except OSError:
        return None, f"SSCD needs its network weights, which this server could not download (offline?); {help_text}"
    except (RuntimeError, ValueError):
        return None, f"SSCD weights unavailable (the file is not a TorchScript model); {help_text}"
    problem = _sscd_problem(model)
    return (None, f"SSCD weights unavailable ({problem}); {help_text}") if problem else (model, "")


load_sscd = _Loaded(_load_sscd)


def sscd_similarity(a: list[Image.Image], b: list[Image.Image]) -> MetricResult:
    model, reason = load_sscd()
    if model is None:
        return MetricResult("SSCD", False, reason=reason)
    try:
        values = (_sscd_embed(model, a) * _sscd_embed(model, b)).sum(1).tolist()
    except (RuntimeError, ValueError) as error:  # never let a metric end an evaluation after training
        return MetricResult("SSCD", False, reason=f"SSCD failed on these images ({type(error).__name__})")
    return MetricResult("SSCD", True, float(np.mean(values)), values)


# -- LPIPS -------------------------------------------------------------------------------------
def _load_lpips():
    """The `lpips` package with its AlexNet backbone. The backbone's weights are fetched into
    torch.hub's cache by `_download` first (with a timeout on that request alone); torchvision
    then finds them there instead of downloading without a timeout."""
    try:
        import lpips
        from torchvision.models import AlexNet_Weights

        url = AlexNet_Weights.IMAGENET1K_V1.url
        cached = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
        if not cached.is_file():
            _download(url, cached)
        published = torch.hub.HASH_REGEX.search(cached.name).group(1)  # torchvision names its files by their SHA-256's first digits
        if not _sha256(cached).startswith(published):
            return None, "LPIPS weights unavailable (the AlexNet file does not match torchvision's published hash); delete it to download it again"
        return lpips.LPIPS(net="alex", verbose=False).eval(), ""
    except OSError:
        return None, "LPIPS needs the AlexNet weights, which this server could not download (offline?)"
    except (RuntimeError, ValueError, ImportError):
        return None, "LPIPS weights unavailable (the downloaded AlexNet weights could not be loaded)"


load_lpips = _Loaded(_load_lpips)


def lpips_distance(a: list[Image.Image], b: list[Image.Image]) -> MetricResult:
    model, reason = load_lpips()
    if model is None:
        return MetricResult("LPIPS", False, reason=reason, higher_is_more_similar=False)
    with torch.no_grad():
        values = model(_images_to_tensor(a) * 2 - 1, _images_to_tensor(b, a[0].size) * 2 - 1).flatten().tolist()
    return MetricResult("LPIPS", True, float(np.mean(values)), values, higher_is_more_similar=False)


# -- weight-free -------------------------------------------------------------------------------
def ssim(a: list[Image.Image], b: list[Image.Image]) -> MetricResult:
    from torchmetrics.functional.image import structural_similarity_index_measure

    x, y = _images_to_tensor(a), _images_to_tensor(b, a[0].size)
    values = structural_similarity_index_measure(x, y, data_range=1.0, reduction="none").flatten().tolist()
    return MetricResult("SSIM", True, float(np.mean(values)), values)


def psnr(a: list[Image.Image], b: list[Image.Image]) -> MetricResult:
    from torchmetrics.functional.image import peak_signal_noise_ratio

    x, y = _images_to_tensor(a), _images_to_tensor(b, a[0].size)
    values = [min(100.0, float(peak_signal_noise_ratio(x[i : i + 1], y[i : i + 1], data_range=1.0))) for i in range(len(x))]
    return MetricResult("PSNR", True, float(np.mean(values)), values)


PAIR_METRICS = {"sscd": sscd_similarity, "lpips": lpips_distance, "ssim": ssim, "psnr": psnr}


def compare(a: list[Image.Image], b: list[Image.Image], names=("sscd", "lpips", "ssim", "psnr")) -> dict[str, dict]:
    """Each metric over pairs (a[i], b[i]) as dicts ready for JSON."""
    if len(a) != len(b) or not a:
        raise ValueError("compare needs two equally long, non-empty lists of images")
    return {name: PAIR_METRICS[name](a, b).to_dict() for name in names}


def availability() -> dict[str, dict]:
    """Which networks are available here, and why not where they are not."""
    sscd_model, sscd_reason = load_sscd()
    lpips_model, lpips_reason = load_lpips()
    return {
        "SSCD": {"available": sscd_model is not None, "reason": sscd_reason},
        "LPIPS": {"available": lpips_model is not None, "reason": lpips_reason},
        "SSIM": {"available": True, "reason": ""},
        "PSNR": {"available": True, "reason": ""},
    }


# -- forgetting on the painted pixels (weight-free) -------------------------------------------
PAINT_THRESHOLD = 0.1  # per-pixel RGB distance in [0, 1] units (≈ 15/255 per channel) that counts as painted
FIXED_AT = 0.7
PARTLY_FIXED_AT = 0.3
UNPAINTED_CHANGE_WARNING = 0.1  # mean RGB distance outside M above which the rest of the image changed visibly


@dataclass
class TowardSurrogate:
    """How far an image moved from the target toward the surrogate, on the pixels the operator changed.

    r = ⟨after − x_f, x_s − x_f⟩_M / ‖x_s − x_f‖²_M (1: the painted pixels look like the surrogate;
    0: unchanged) and residual = ‖(after − x_f) − r·(x_s − x_f)‖_M / ‖x_s − x_f‖_M (change off that line).
    unpainted_change is the mean RGB distance between after and x_f outside M: r says nothing
    about pixels the operator did not paint, so a fix that also wrecked the rest shows here.
    """

    r: float | None
    residual: float | None
    painted_fraction: float
    verdict: str
    unpainted_change: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def _pixels(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(image.convert("RGB").resize(size), dtype=np.float64) / 255.0


def painted_mask(target: Image.Image, surrogate: Image.Image, threshold: float = PAINT_THRESHOLD) -> np.ndarray:
    """M: the pixels where the surrogate differs from the target by more than `threshold` (RGB distance)."""
    difference = _pixels(surrogate, target.size) - _pixels(target, target.size)
    return np.linalg.norm(difference, axis=-1) > threshold


def verdict_for(r: float | None) -> str:
    if r is None:
        return "no painted pixels"
    return "fixed" if r >= FIXED_AT else "partly fixed" if r >= PARTLY_FIXED_AT else "not fixed"


def toward_surrogate(after: Image.Image, target: Image.Image, surrogate: Image.Image, threshold: float = PAINT_THRESHOLD) -> TowardSurrogate:
    """Project the change after − x_f onto the painted change x_s − x_f over M (see `TowardSurrogate`)."""
    size = target.size
    mask = painted_mask(target, surrogate, threshold)
    change = np.linalg.norm(_pixels(after, size) - _pixels(target, size), axis=-1)
    unpainted = round(float(change[~mask].mean()), 4) if (~mask).any() else 0.0
    if not mask.any():
        return TowardSurrogate(None, None, 0.0, verdict_for(None), unpainted)
    x_f = _pixels(target, size)[mask]
    painted = _pixels(surrogate, size)[mask] - x_f
    moved = _pixels(after, size)[mask] - x_f
    norm2 = float((painted**2).sum())
    # Rounded before it is judged: the r a job reports is the r its verdict and its early stop read
    # (unrounded, a job could stop at a shown r of 0.7000 and then call itself "partly fixed").
    r = round(float((moved * painted).sum() / norm2), 4)
    residual = float(np.sqrt(((moved - r * painted) ** 2).sum() / norm2))
    return TowardSurrogate(r, round(residual, 4), round(float(mask.mean()), 4), verdict_for(r), unpainted)
