"""Configuration dataclasses shared by the CLI, the web app and the job store."""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from unlearn_core.errors import InvalidInput

DEMO_MODEL = "assets/demo-model"
METHODS = ("ours", "neggrad", "siss", "erasediff")
PROJECTIONS = ("none", "forget", "both")
LAMBDA_SCHEDULES = ("timestep", "timestep-late", "constant")
LOSS_SPACES = ("pixels", "x0", "native")
FORGET_STATES = ("trajectory", "random")
FORGET_TARGETS = ("painted", "surrogate")
REMEMBER_LOSSES = ("distill", "denoise")
REMEMBER_CHOICES = ("nearest", "first")
LORA_LAYERS = ("text-kv", "attention", "decoder", "all")


def _meta(help_text: str, **extra) -> dict:
    return {"help": help_text, **extra}


@dataclass
class InstanceTarget:
    """One output to unlearn: its prompt + seed (provenance), and image files for x_f and x_s."""

    prompt: str
    seed: int
    surrogate_path: str
    target_path: str | None = None  # default: the model's own output for prompt + seed

    def __post_init__(self):
        self.seed = check_seed(self.seed)
        check_prompt(self.prompt)
        if not self.surrogate_path:
            raise InvalidInput("a surrogate image is required")


@dataclass
class UnlearnConfig:
    """Settings of one unlearning run. Defaults are the 'balanced' preset (alias 'quick') on the demo model.

    Each field's metadata (help, choices, min, max; level 'basic' for the web form's front, method for
    one method's own settings) drives the web form, the CLI options and the
    checks in `__post_init__`."""

    method: str = field(default="ours", metadata=_meta("ours | neggrad | siss | erasediff", choices=METHODS, level="basic"))
    steps: int = field(default=60, metadata=_meta("optimisation steps (fewer when stop_at_r ends training earlier; up to extend_until_fixed more while the target is not yet fixed)", min=1, max=20000, level="basic"))
    batch_size: int = field(default=4, metadata=_meta("forget samples per step (NegGrad, SISS and EraseDiff: also their remember samples)", min=1, max=256))
    learning_rate: float = field(default=1.5e-3, metadata=_meta("AdamW learning rate of the LoRA weights", min=1e-7, max=1.0, level="basic"))
    lora_rank: int = field(default=8, metadata=_meta("LoRA rank", min=1, max=256))
    lora_alpha: float = field(default=8.0, metadata=_meta("LoRA alpha (scale = alpha / rank)", min=1e-3, max=1024.0))
    # Defaults chosen by `python -m benchmarks.quality` (docs/QUALITY.md): forgetting late in
    # sampling, measured on the decoded pixels, with remembering everywhere, held hardest at large t
    # (remember_large_t_boost) and also distilled at fresh noisings of three times as many of the
    # prompt's images (remember_renoised, renoised_seed_multiple), and LoRA on the U-Net's decoder,
    # fixed the most cases with the fewest other images changed; λ(s)=s^γ and LoRA on every layer
    # changed more other seeds. 60 planned steps with neighbour checks ended the slow corrections'
    # jobs sooner than 90 without, keeping the same seeds.
    lambda_schedule: str = field(default="timestep-late", metadata=_meta("timestep-late: λ(s)=c·(1−s)^γ, forgetting where the details are drawn (small t) and remembering everywhere; timestep: λ(s)=s^γ, the paper's form (forgetting at large t); constant: λ=c", choices=LAMBDA_SCHEDULES, method="ours"))
    gamma: float = field(default=1.0, metadata=_meta("exponent γ of λ(s)=s^γ", min=0.0, max=20.0, method="ours"))
    constant_lambda: float = field(default=0.5, metadata=_meta("c: λ of the constant schedule, the peak of timestep-late", min=0.0, max=1.0, method="ours"))
    projection: str = field(default="forget", metadata=_meta("gradient surgery: none | forget (project g_f) | both (PCGrad)", choices=PROJECTIONS, method="ours"))
    loss_space: str = field(default="pixels", metadata=_meta("pixels: both losses on the implied clean image x̂0 (so λ(s), not SNR(t), decides where each acts), the forget loss after decoding x̂0 with the VAE, on the painted pixels at full resolution; x0: the forget loss on the latents too; native: both in the prediction's own space (ε, v), dominated by small t", choices=LOSS_SPACES, method="ours"))
    forget_states: str = field(default="trajectory", metadata=_meta("trajectory: forget at the target seed's own guided sampling states, re-recorded as the model changes; random: x_t drawn from the target at random t (the paper's form)", choices=FORGET_STATES, method="ours"))
    forget_target: str = field(default="painted", metadata=_meta("painted: aim x̂0 at the surrogate on the painted pixels and at the frozen model's own estimate elsewhere; surrogate: at the whole surrogate (the paper's Eq. 9–11)", choices=FORGET_TARGETS, method="ours"))
    trajectory_refresh: int = field(default=5, metadata=_meta("re-record the target's trajectory every N steps (0 = never)", min=0, max=100000, method="ours"))
    stop_at_r: float = field(default=0.8, metadata=_meta("trajectory forgetting: stop once the target seed's output has moved this far toward the surrogate (r, checked at each refresh; 0 = run every step). With several targets: once every one has, the forget batch meanwhile drawn from those not yet there", min=0.0, max=1.0, level="basic", method="ours"))
    extend_until_fixed: int = field(default=90, metadata=_meta("trajectory forgetting: if the target is not yet fixed (r < 0.7) after `steps`, train up to this many more steps, stopping once it is (0 = never; stop_at_r 0 also turns it off: exactly `steps`)", min=0, max=20000, method="ours"))
    extend_remember_factor: float = field(default=0.5, metadata=_meta("trajectory forgetting: past `steps`, while training on for a target not yet fixed (extend_until_fixed), the remember loss is weighted this share of remember_weight: a correction that has not arrived within the planned steps is held back less by the other seeds (1 = the same weight throughout)", min=0.0, max=1.0, method="ours"))
    consolidate_steps: int = field(default=15, metadata=_meta("trajectory forgetting: once the target is fixed (r ≥ stop_at_r, or ≥ 0.7 at or past `steps`), train up to this many more steps with the remember loss weighted consolidate_remember_factor × remember_weight: the forget loss holds the fix while the other seeds it spilled onto are pulled back. It ends early once r falls more than 0.05 below where it stood, and the weights kept are the last whose r did not. A target fixed below r 0.75 has no r to trade and is not consolidated (0 = stop as soon as the target is fixed)", min=0, max=20000, method="ours"))
    consolidate_remember_factor: float = field(default=4.0, metadata=_meta("trajectory forgetting: the remember loss's multiplier during the consolidate_steps (1 = the same weight as before)", min=0.0, max=1e4, method="ours"))
    neighbour_checks: int = field(default=4, metadata=_meta("trajectory forgetting: while the target's r climbs slowly (under 0.05 in 10 steps) short of stop_at_r, sample this many of its nearest recorded remember seeds with the adapter, at most every 10 steps: if each still has SSIM ≥ 0.95 to its frozen image, the remember loss has room to give and its weight is halved (down to 1/8); if one has fallen under 0.9, it is doubled back (0 = never: the weight stays as set)", min=0, max=64, method="ours"))
    steps_when_held: int = field(default=90, metadata=_meta("trajectory forgetting: planned steps for a target not yet fixed at `steps` whose neighbour checks found its nearest seeds leaving under the full remember weight: it stops at the first fixed refresh at or past this step, so the remember loss has time to pull those seeds back (the other targets stop at the first fixed refresh at or past `steps`)", min=1, max=20000, method="ours"))
    remember_loss: str = field(default="distill", metadata=_meta("distill: match the frozen model at its sampling states of other seeds and prompts; denoise: the diffusion loss on generated remember images (the paper's Eq. 8)", choices=REMEMBER_LOSSES, method="ours"))
    remember_weight: float = field(default=1.5, metadata=_meta("multiplier of the remember loss against the forget loss (higher: other seeds keep more, the target moves slower)", min=0.0, max=1e4, method="ours"))
    remember_large_t_boost: float = field(default=12.0, metadata=_meta("k: the distilled remember loss is weighted remember_weight·(1 + k·s) at noise level s ∈ [0, 1], holding hardest where every seed's layout is decided (large t)", min=0.0, max=1e4, method="ours"))
    remember_renoised: int = field(default=4, metadata=_meta("distill remembering: remember samples per step, besides remember_batch_size, at fresh noisings x_t = a·x0 + b·ε of the remember seeds' final images, the frozen model's prediction there computed on the fly: states no recorded trajectory holds, so the adapter learns to leave the prompt's images alone, not only the recorded states (0 = recorded states only)", min=0, max=256, method="ours"))
    renoised_seed_multiple: int = field(default=3, metadata=_meta("distill remembering: the renoised samples are drawn from the images of remember_count × this many seeds per remember prompt (the pool): the recorded seeds' own final images, then the pool's other seeds' from the generation cache (generated once; more of the prompt's neighbourhood held), 1 = the recorded seeds' only", min=1, max=64, method="ours"))
    remember_choice: str = field(default="nearest", metadata=_meta("distill remembering: which seeds of a flagged prompt give recorded trajectories. nearest: the remember_count seeds, of the remember_count × renoised_seed_multiple whose images are renoised, whose images look most like the flagged output (its neighbours, the seeds a fix spills onto first); first: the first remember_count seeds", choices=REMEMBER_CHOICES, method="ours"))
    remember_batch_size: int = field(default=16, metadata=_meta("remember samples per step", min=1, max=256, method="ours"))
    lora_layers: str = field(default="decoder", metadata=_meta("text-kv: only the keys and values computed from the prompt (the change follows the prompt's words); attention: all attention projections; decoder: attention and ResNet convolutions of a U-Net's up blocks, where details and colours are drawn, leaving the blocks that set every seed's layout frozen (a transformer: every layer); all: attention, convolutions and feed-forward layers everywhere (more capacity, more risk)", choices=LORA_LAYERS))
    seed_noise_fraction: float = field(default=1.0, metadata=_meta("random forget states: share noised with the target seed's own initial noise (0 = random noise only, as in the paper)", min=0.0, max=1.0, method="ours"))
    remember_count: int = field(default=32, metadata=_meta("remember seeds per prompt (sampling trajectories to distill, or images to denoise)", min=1, max=1000))
    remember_prompts: list[str] = field(default_factory=list, metadata=_meta("extra prompts for the remember set", level="basic"))
    remember_dir: str | None = field(default=None, metadata=_meta("folder of remember images instead of generated ones"))
    remember_seed_offset: int = field(default=1000, metadata=_meta("remember seeds start here", min=0, max=2**31))
    generation_steps: int = field(default=25, metadata=_meta("denoising steps for generation", min=1, max=200))
    guidance_scale: float = field(default=5.0, metadata=_meta("classifier-free guidance scale", min=0.0, max=50.0))
    siss_mixture: float = field(default=0.5, metadata=_meta("SISS: probability λ that a mixture sample is drawn from the forget set", min=0.01, max=0.99, level="basic", method="siss"))
    siss_deletion_norm: float = field(default=0.0, metadata=_meta("SISS: norm the deletion gradient is rescaled to before it is subtracted (0 = 10 % of the first remember-gradient norm, SISS's advice)", min=0.0, max=1e6, level="basic", method="siss"))
    erasediff_weight: float = field(default=0.1, metadata=_meta("EraseDiff: λ of the uniform-noise forget gradient in g_r + λ·g_f (their lambda_bome)", min=0.0, max=100.0, level="basic", method="erasediff"))
    max_grad_norm: float = field(default=1.0, metadata=_meta("gradient clipping (0 = off)", min=0.0, max=1e6))
    checkpoint_every: int = field(default=20, metadata=_meta("save a resumable checkpoint every N steps (0 = off)", min=0, max=100000))
    eval_seeds: int = field(default=16, metadata=_meta("other seeds of the same prompt for integrity", min=0, max=256))
    eval_prompts: list[str] = field(default_factory=list, metadata=_meta("other prompts for integrity"))
    review_seeds: list[int] = field(default_factory=list, metadata=_meta("seeds of the target's prompt you looked at (the Generate tab fills in its grid): checked after the job as well as the eval seeds", level="basic"))
    seed: int = field(default=0, metadata=_meta("training seed", min=0, max=2**31))
    mixed_precision: str = field(default="no", metadata=_meta("no | bf16 (autocast)", choices=("no", "bf16")))
    gradient_checkpointing: bool = field(default=False, metadata=_meta("trade compute for memory"))
    full_finetune: bool = field(default=False, metadata=_meta("train all weights instead of LoRA (benchmarks only)"))

    def __post_init__(self):
        for spec in fields(self):
            value = _coerce(spec.name, spec.type, getattr(self, spec.name))
            setattr(self, spec.name, value)
            if "choices" in spec.metadata and value not in spec.metadata["choices"]:
                raise InvalidInput(f"{spec.name} must be one of {', '.join(spec.metadata['choices'])}; got {value!r}")
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if isinstance(value, float) and not math.isfinite(value):
                raise InvalidInput(f"{spec.name} must be a finite number, got {value!r}")
            low, high = spec.metadata.get("min"), spec.metadata.get("max")
            if low is not None and value < low or high is not None and value > high:
                raise InvalidInput(f"{spec.name} must be between {low} and {high}; got {value!r}")
        if self.full_finetune and self.method == "ours" and (self.forget_states == "trajectory" or self.forget_target == "painted" or self.remember_loss == "distill"):
            raise InvalidInput("full fine-tuning keeps no frozen copy of the model to aim at or distill from: use forget_states 'random', forget_target 'surrogate' and remember_loss 'denoise'")
        if self.remember_dir and self.remember_loss == "distill" and self.method == "ours":
            raise InvalidInput("a folder of remember images needs remember_loss 'denoise' (distillation learns from the model's own sampling states)")
        self.remember_prompts = [p for p in self.remember_prompts if p.strip()]
        self.eval_prompts = [p for p in self.eval_prompts if p.strip()]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def remember_seeds(self) -> range:
        """Seeds of the remember set, renoised images included (never used for evaluation)."""
        return range(self.remember_seed_offset, self.remember_seed_offset + max(self.remember_count, self.renoised_seed_count))

    @property
    def renoised_seed_count(self) -> int:
        """Seeds per remember prompt whose images renoised remembering draws from (0 when it is off)."""
        renoising = self.method == "ours" and self.remember_loss == "distill" and self.remember_renoised > 0
        return self.remember_count * self.renoised_seed_multiple if renoising else 0

    @classmethod
    def from_preset(cls, preset: str = "quick", **overrides) -> "UnlearnConfig":
        """A preset's settings (PRESETS), then `overrides` on top; unknown names are refused."""
        if preset not in PRESETS:
            raise InvalidInput(f"unknown preset {preset!r}; use one of {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[preset], **overrides})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "UnlearnConfig":
        known = {spec.name for spec in fields(cls)}
        data = {key: value for key, value in data.items() if key not in REMOVED_SETTINGS}  # jobs stored by older versions
        unknown = set(data) - known
        if unknown:
            raise InvalidInput(f"unknown setting(s): {', '.join(sorted(unknown))}")
        return cls(**data)


MAX_PROMPT_CHARS = 2000
MAX_LISTED_PROMPTS = 32  # remember_prompts / eval_prompts: more is a study for the CLI, not a web job
MAX_LISTED_SEEDS = 64  # review_seeds: a Generate grid's worth
MAX_PROMPT_BYTES = 16_000  # all prompts of one job together


def measures_r_while_training(config: "UnlearnConfig") -> bool:
    """Whether training re-records the targets' trajectories, and so measures r as it goes."""
    return config.method == "ours" and config.forget_states == "trajectory" and config.trajectory_refresh > 0


def _measures_r(config: "UnlearnConfig") -> bool:
    """Whether training measures r and acts on it (may stop early, train on or consolidate)."""
    return measures_r_while_training(config) and config.stop_at_r > 0


def max_training_steps(config: "UnlearnConfig") -> int:
    """The most steps a job may train: its one step total, fixed when it starts. A run that measures
    r plans `steps` (`steps_when_held` for a held target), trains on up to `extend_until_fixed` more
    while the target is not fixed, then consolidates; it stops early once the target is fixed."""
    if not _measures_r(config):
        return config.steps
    planned = max(config.steps, config.steps_when_held) if config.neighbour_checks and config.remember_loss == "distill" else config.steps
    return max(planned, config.steps + config.extend_until_fixed) + config.consolidate_steps


def estimated_work(config: "UnlearnConfig", targets: int = 1) -> int:
    """A job's size in single-image denoiser passes: the remember set's sampling, training (forward
    and backward of every sample, and re-recording the targets' trajectories) and evaluation."""
    sampling = config.generation_steps * (2 if config.guidance_scale > 1 else 1)  # guidance doubles each step
    prompts = targets + len(config.remember_prompts) + 1
    remember = max(config.remember_count, config.renoised_seed_count) * prompts * sampling  # a cold cache generates the extra renoised images
    measures_r = _measures_r(config)
    steps = max_training_steps(config)
    refreshes = steps // config.trajectory_refresh if config.trajectory_refresh else 0
    renoised = config.remember_renoised * 4 if config.renoised_seed_count else 0  # the teacher's forward, then forward and backward
    checks = config.neighbour_checks * targets * sampling * (steps // 10) if measures_r and config.remember_loss == "distill" else 0  # `neighbour_checks` at most every 10 steps
    training = steps * ((config.batch_size + config.remember_batch_size) * 3 + renoised) + (refreshes + 1) * targets * sampling * 2 + checks
    evaluation = ((config.eval_seeds + len(config.review_seeds)) * 2 * (1 + min(len(config.eval_prompts), 8)) + 3 * targets) * sampling
    return remember + training + evaluation


def check_job_size(config: "UnlearnConfig", targets: int, ceiling: int) -> None:
    """Refuse a web job whose lists or estimated work exceed this server's limits, saying by how much."""
    for name in ("remember_prompts", "eval_prompts"):
        if len(getattr(config, name)) > MAX_LISTED_PROMPTS:
            raise InvalidInput(f"{name}: {len(getattr(config, name))} prompts; this server takes at most {MAX_LISTED_PROMPTS}")
    size = sum(len(prompt.encode()) for prompt in config.remember_prompts + config.eval_prompts)
    if size > MAX_PROMPT_BYTES:
        raise InvalidInput(f"the job's prompts are {size} bytes together; this server takes at most {MAX_PROMPT_BYTES}")
    work = estimated_work(config, targets)
    if work > ceiling:
        raise InvalidInput(f"this job would take about {work:,} image-steps of work (remember set, training and evaluation); "
                           f"this server takes at most {ceiling:,}: lower steps, remember_count, eval_seeds or batch sizes")


REMOVED_SETTINGS = {"siss_superfactor"}  # SISS now rescales its deletion gradient (siss_deletion_norm)


def check_prompt(prompt) -> str:
    """A prompt is text of at most MAX_PROMPT_CHARS characters without NUL or other control bytes."""
    if not isinstance(prompt, str):
        raise InvalidInput(f"the prompt must be text, got {type(prompt).__name__}")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InvalidInput(f"prompt is {len(prompt)} characters; the limit is {MAX_PROMPT_CHARS}")
    if any(ord(ch) < 32 and ch not in "\t\n\r" for ch in prompt):
        raise InvalidInput("the prompt contains control characters (e.g. a NUL byte); remove them")
    return prompt


def check_seed(value, name: str = "seed") -> int:
    """An integer seed in [0, 2^63) (what torch generators accept), from an int or an integral float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not (math.isfinite(value) and value.is_integer())):
        raise InvalidInput(f"{name} must be a whole number in [0, 2^63), got {value!r}")
    if int(value) < 0:
        raise InvalidInput(f"{name} must be a non-negative whole number in [0, 2^63), got {int(value)}")
    if int(value) >= 2**63:
        raise InvalidInput(f"{name} must be a whole number in [0, 2^63); {int(value)} is not below 2^63")
    return int(value)


def _coerce(name: str, kind, value):
    """Check a config value against its field's type (JSON and forms give loosely typed values):
    whole-number floats become ints, ints become floats; anything else of the wrong type is refused."""
    kind = str(getattr(kind, "__name__", kind)).replace(" ", "")
    if kind == "bool":
        if not isinstance(value, bool):
            raise InvalidInput(f"{name} must be true or false, got {value!r}")
    elif kind == "int":
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise InvalidInput(f"{name} must be a whole number, got {value!r}")
        if not isinstance(value, numbers.Integral):
            if not math.isfinite(value):
                raise InvalidInput(f"{name} must be a finite number, got {value!r}")
            if not float(value).is_integer():
                raise InvalidInput(f"{name} must be a whole number, got {value!r}")
        value = int(value)
    elif kind == "float":
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise InvalidInput(f"{name} must be a number, got {value!r}")
        value = float(value)
    elif kind == "str":
        if not isinstance(value, str):
            raise InvalidInput(f"{name} must be text, got {value!r}")
    elif kind == "str|None":
        if value is not None and not isinstance(value, str):
            raise InvalidInput(f"{name} must be text or null, got {value!r}")
    elif kind == "list[int]":
        if not isinstance(value, (list, tuple)) or len(value) > MAX_LISTED_SEEDS:
            raise InvalidInput(f"{name} must be a list of at most {MAX_LISTED_SEEDS} seeds, got {value!r}"[:300])
        value = list(dict.fromkeys(check_seed(item, name) for item in value))
    elif kind == "list[str]":
        if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) for item in value):
            raise InvalidInput(f"{name} must be a list of prompts (strings), got {value!r}")
        value = [check_prompt(item) for item in value]
    return value


PRESETS: dict[str, dict[str, Any]] = {
    "gentle": {"learning_rate": 1e-3, "remember_weight": 2.0, "stop_at_r": 0.75},
    "balanced": {},
    "strong": {"steps": 150, "learning_rate": 2e-3, "remember_weight": 0.25, "stop_at_r": 0.9},
    "paper": {"lambda_schedule": "timestep", "loss_space": "native", "forget_states": "random", "forget_target": "surrogate", "remember_loss": "denoise", "seed_noise_fraction": 0.0, "steps": 240, "batch_size": 8, "remember_count": 100, "learning_rate": 1e-4, "lora_rank": 16, "lora_alpha": 16.0},
}
PRESETS["quick"] = PRESETS["balanced"]  # the old name of the defaults, still accepted (API, CLI)
PRESET_DESCRIPTIONS: dict[str, str] = {  # what the web form offers, in this order
    "gentle": "changes the least: a lower learning rate, a heavier remember loss, and training stops once the target moved 75 % of the way; other seeds keep more, the fix may stay partial",
    "balanced": "the defaults: up to 60 steps until the target has moved 80 % of the way (more while it is not yet fixed), then up to 15 more that pull the other seeds back while the fix holds; about 30–60 s per job on the demo model on a 2-core CPU with the prompt seen before, about a minute more for a prompt's first job (docs/PERFORMANCE.md)",
    "strong": "for a fix that stayed partial: up to 150 steps, a higher learning rate and a lighter remember loss, stops at 90 %; other seeds change more, so check the integrity grid",
    "paper": "the paper's original recipe (random noise levels, a denoising remember loss, 240 steps): for comparison; slower and less precise",
}


@dataclass
class GenerationRequest:
    """A seed grid: prompt, seeds, steps, guidance."""

    prompt: str = ""
    seeds: list[int] = field(default_factory=lambda: list(range(8)))
    steps: int = 25
    guidance_scale: float = 5.0

    def __post_init__(self):
        if not self.seeds:
            raise InvalidInput("give at least one seed")
        if len(self.seeds) > 64:
            raise InvalidInput(f"at most 64 seeds per grid; got {len(self.seeds)}")
        self.seeds = [check_seed(seed) for seed in self.seeds]
        if not isinstance(self.steps, int) or not 1 <= self.steps <= 200:
            raise InvalidInput(f"steps must be an integer between 1 and 200; got {self.steps!r}")
        if not isinstance(self.guidance_scale, (int, float)) or not math.isfinite(self.guidance_scale) or not 0 <= self.guidance_scale <= 50:
            raise InvalidInput(f"guidance must be a number between 0 and 50; got {self.guidance_scale!r}")
        check_prompt(self.prompt)


def parse_seeds(text: str | int | list, limit: int = 64) -> list[int]:
    """'0-7', '1,5,9', '3' or a count like 8 (→ 0..7) into a list of seeds."""
    if isinstance(text, list):
        return [int(s) for s in text]
    if isinstance(text, int):
        text = f"0-{text - 1}" if text > 0 else ""
    seeds: list[int] = []
    for part in str(text).replace(" ", "").split(","):
        if not part:
            continue
        try:
            if "-" in part[1:]:
                lo, hi = part.split("-", 1)
                lo_i, hi_i = int(lo), int(hi)
                if hi_i < lo_i:
                    raise ValueError
                if hi_i - lo_i + 1 > limit:
                    raise InvalidInput(f"too many seeds (limit {limit})")
                seeds.extend(range(lo_i, hi_i + 1))
            else:
                seeds.append(int(part))
        except ValueError as error:
            detail = f": {error}" if str(error) else ""
            raise InvalidInput(f"cannot read seeds {text!r}: use '0-7', '1,5,9' or a count{detail}") from None
    if not seeds:
        raise InvalidInput("give at least one seed, e.g. '0-7'")
    if len(seeds) > limit:
        raise InvalidInput(f"too many seeds ({len(seeds)}); the limit is {limit}")
    return [check_seed(seed) for seed in seeds]
