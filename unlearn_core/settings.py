"""Server and tool settings, read from the environment once at start-up.

`Settings.from_env()` is called by the app's and the CLI's entry points and the result is passed
to what needs it; nothing else reads `HOTFIX_*` variables. The server binds to `HOTFIX_HOST` /
`HOTFIX_PORT` when they are set, else to Gradio's own `GRADIO_SERVER_NAME` / `GRADIO_SERVER_PORT`
(which Hugging Face Spaces set to 0.0.0.0:7860), else to 127.0.0.1:7860.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
DEMO_MODEL_DIR = PACKAGE_ROOT / "assets" / "demo-model"  # resolved from the package, not the working directory
DTYPES = ("auto", "fp32", "fp16", "bf16")
EXECUTORS = ("local", "ray")


SPACE_STORAGE = Path("/data")  # where a Hugging Face Space mounts its persistent storage


def use_persistent_hub_cache(environ: dict | None = None, storage: Path = SPACE_STORAGE) -> str | None:
    """On a Space with persistent storage, the Hugging Face cache (HF_HOME: hub models, tokens) goes
    on it, so a restart does not download every model again. Call before huggingface_hub is imported
    (it reads HF_HOME then). An HF_HOME already set is kept. Returns the HF_HOME set, or None."""
    env = os.environ if environ is None else environ
    if env.get("HF_HOME") or env.get("SYSTEM") != "spaces" or not storage.is_dir() or not os.access(storage, os.W_OK):
        return None
    env["HF_HOME"] = str(storage / ".huggingface")
    return env["HF_HOME"]


def _list(text: str | None) -> tuple[str, ...]:
    return tuple(item.strip() for item in (text or "").split(",") if item.strip())


def _flag(text: str | None) -> bool | None:
    """'1'/'true'/'yes' → True, '0'/'false'/'no' → False, unset → None (the default applies)."""
    if not text:
        return None
    return text.strip().lower() in ("1", "true", "yes")


@dataclass(frozen=True)
class Settings:
    """Everything configurable from the environment, with its default."""

    host: str = "127.0.0.1"
    port: int = 7860
    runs_dir: Path = PACKAGE_ROOT / "runs"
    device: str = "auto"
    dtype: str = "auto"  # auto: half precision on a GPU (bf16 where supported, else fp16), fp32 elsewhere and for the demo model
    without_t5: bool = False  # SD3: leave out the T5 text encoder (about 10 GB in fp16)
    username: str | None = None
    password: str | None = None
    users_file: Path | None = None  # HOTFIX_USERS: user:hash lines (unlearn_core.accounts)
    admins: tuple[str, ...] = ()  # HOTFIX_ADMINS: users who see every job
    model_allowlist: tuple[str, ...] = ()
    local_models: bool | None = None  # HOTFIX_LOCAL_MODELS: may the web load any folder or Hub id? None: only when listening on loopback
    cache_dir: Path = Path.home() / ".cache" / "hotfix-studio"
    cache_max_gb: float = 5.0  # HOTFIX_CACHE_MAX_GB: the generation cache (pretrained images, recorded sampling) is kept under this size, least recently used first out
    sscd_path: Path | None = None
    sscd_sha256: str | None = None  # HOTFIX_SSCD_SHA256: the digest of the one SSCD file trusted; unset, only a digest known in code (metrics.SSCD_KNOWN_SHA256) is
    clip_model: str | None = None
    download_timeout_s: float = 10.0
    max_job_work: int = 200_000  # estimated image-steps of one web job (the default job is about 30,000 at most: its extension past `steps` and its consolidation counted in; the paper preset 34,000)
    max_pending_per_owner: int = 8  # queued or running web jobs per owner
    max_pending_per_address: int = 8  # HOTFIX_MAX_PENDING_PER_ADDRESS: queued or running jobs of all anonymous sessions from one network address
    max_queued: int = 32  # HOTFIX_MAX_QUEUED: queued or running web jobs of everyone together
    login_failures: int = 5  # HOTFIX_LOGIN_FAILURES: failed logins of one username, or from one address, before logins are refused ...
    login_window_s: float = 60.0  # HOTFIX_LOGIN_WINDOW_S: ... within this many seconds
    trust_proxy: bool | None = None  # HOTFIX_TRUST_PROXY: take a visitor's address from X-Forwarded-For? None: only on a Hugging Face Space
    hf_oauth: bool = False  # a Space with `hf_oauth: true`: owners sign in with their Hugging Face account
    warm_worker: bool = True  # HOTFIX_WARM_WORKER=0: start each job's process at its job, not ahead (saves ~1 GB of idle memory)
    lease_s: float = 30.0  # HOTFIX_LEASE_S: a running job whose worker has not renewed its lease for this long is marked interrupted
    zero_gpu: bool = False  # a Hugging Face ZeroGPU Space: a GPU only inside @spaces.GPU calls of the server process
    require_sign_in: bool | None = None  # HOTFIX_REQUIRE_SIGN_IN: may only signed-in visitors train? None: only on a Space with hf_oauth
    push_with_server_token: bool = False  # HOTFIX_PUSH_WITH_SERVER_TOKEN=1: a push from the web without a visitor's token uses the server's (on loopback only)
    devices: tuple[str, ...] = ()  # HOTFIX_DEVICES: one worker per device listed (e.g. cuda:0,cuda:1); empty: every CUDA device, else HOTFIX_DEVICE
    executor: str = "local"  # HOTFIX_EXECUTOR: local (job processes of this machine) or ray (actors on the Ray cluster at RAY_ADDRESS, or a local Ray)
    gpu_slot_s: float = 120.0  # HOTFIX_GPU_SLOT_S: on ZeroGPU, the length of one GPU call of a job (`gpu_slots`); ZeroGPU's own default is 60

    @classmethod
    def from_env(cls, environ: dict | None = None) -> "Settings":
        env = os.environ if environ is None else environ
        cache = Path(env["HOTFIX_CACHE"]) if env.get("HOTFIX_CACHE") else cls.cache_dir
        return cls(
            host=env.get("HOTFIX_HOST") or env.get("GRADIO_SERVER_NAME") or cls.host,
            port=int(env.get("HOTFIX_PORT") or env.get("GRADIO_SERVER_PORT") or cls.port),
            runs_dir=Path(env.get("HOTFIX_RUNS_DIR") or cls.runs_dir).resolve(),
            device=env.get("HOTFIX_DEVICE") or cls.device,
            dtype=env.get("HOTFIX_DTYPE") or cls.dtype,
            without_t5=(env.get("HOTFIX_NO_T5") or "").lower() in ("1", "true", "yes"),
            username=env.get("HOTFIX_USERNAME") or None,
            password=env.get("HOTFIX_PASSWORD") or None,
            users_file=Path(env["HOTFIX_USERS"]) if env.get("HOTFIX_USERS") else None,
            admins=_list(env.get("HOTFIX_ADMINS")),
            model_allowlist=_list(env.get("HOTFIX_MODEL_ALLOWLIST")),
            local_models=_flag(env.get("HOTFIX_LOCAL_MODELS")),
            cache_dir=cache,
            cache_max_gb=float(env.get("HOTFIX_CACHE_MAX_GB") or cls.cache_max_gb),
            sscd_path=Path(env["HOTFIX_SSCD_PATH"]) if env.get("HOTFIX_SSCD_PATH") else None,
            sscd_sha256=env.get("HOTFIX_SSCD_SHA256") or None,
            clip_model=env.get("HOTFIX_CLIP_MODEL") or None,
            download_timeout_s=float(env.get("HOTFIX_DOWNLOAD_TIMEOUT") or cls.download_timeout_s),
            warm_worker=_flag(env.get("HOTFIX_WARM_WORKER")) is not False,
            zero_gpu=(env.get("SPACES_ZERO_GPU") or "").lower() in ("1", "true"),
            gpu_slot_s=float(env.get("HOTFIX_GPU_SLOT_S") or cls.gpu_slot_s),
            devices=_list(env.get("HOTFIX_DEVICES")),
            executor=(env.get("HOTFIX_EXECUTOR") or cls.executor).strip().lower(),
            require_sign_in=_flag(env.get("HOTFIX_REQUIRE_SIGN_IN")),
            push_with_server_token=_flag(env.get("HOTFIX_PUSH_WITH_SERVER_TOKEN")) is True,
            hf_oauth=env.get("SYSTEM") == "spaces" and bool(env.get("SPACE_ID") and env.get("OAUTH_CLIENT_ID")),  # as gradio.utils.get_space() tells a Space
            max_job_work=int(env.get("HOTFIX_MAX_JOB_WORK") or cls.max_job_work),
            max_pending_per_owner=int(env.get("HOTFIX_MAX_PENDING_JOBS") or cls.max_pending_per_owner),
            max_pending_per_address=int(env.get("HOTFIX_MAX_PENDING_PER_ADDRESS") or cls.max_pending_per_address),
            max_queued=int(env.get("HOTFIX_MAX_QUEUED") or cls.max_queued),
            login_failures=int(env.get("HOTFIX_LOGIN_FAILURES") or cls.login_failures),
            login_window_s=float(env.get("HOTFIX_LOGIN_WINDOW_S") or cls.login_window_s),
            trust_proxy=_flag(env.get("HOTFIX_TRUST_PROXY")) if env.get("HOTFIX_TRUST_PROXY") else env.get("SYSTEM") == "spaces",
            lease_s=float(env.get("HOTFIX_LEASE_S") or cls.lease_s),
        )

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"HOTFIX_DTYPE must be one of {', '.join(DTYPES)}; got {self.dtype!r}")
        for name, value in (("HOTFIX_MAX_PENDING_JOBS", self.max_pending_per_owner), ("HOTFIX_MAX_PENDING_PER_ADDRESS", self.max_pending_per_address),
                            ("HOTFIX_MAX_QUEUED", self.max_queued), ("HOTFIX_LOGIN_FAILURES", self.login_failures)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1; got {value!r}")
        if not self.cache_max_gb >= 0:  # also refuses NaN
            raise ValueError(f"HOTFIX_CACHE_MAX_GB must be a number of gigabytes, 0 or more; got {self.cache_max_gb!r}")
        if self.sscd_sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", self.sscd_sha256.strip()):
            raise ValueError(f"HOTFIX_SSCD_SHA256 must be a SHA-256 digest (64 hexadecimal digits, as sha256sum prints); got {self.sscd_sha256!r}")
        if self.executor not in EXECUTORS:
            raise ValueError(f"HOTFIX_EXECUTOR must be one of {', '.join(EXECUTORS)}; got {self.executor!r}")
        if not self.gpu_slot_s >= 10:
            raise ValueError(f"HOTFIX_GPU_SLOT_S must be at least 10 seconds; got {self.gpu_slot_s!r}")
        if not self.lease_s > 0:
            raise ValueError(f"HOTFIX_LEASE_S must be a positive number of seconds; got {self.lease_s!r}")

    @property
    def web_loads_folders(self) -> bool:
        """Whether a web caller may name any model (a folder here, any Hub id). By default only a
        server that listens on loopback (one person's workstation) allows it; a server others can
        reach, a Space among them, offers the demo model and the allow-list (`models.check_web_model`)."""
        if self.local_models is not None:
            return self.local_models
        return self.on_loopback

    @property
    def requires_sign_in(self) -> bool:
        """Whether training needs a signed-in account (a login, or Sign in with Hugging Face)."""
        return self.require_sign_in if self.require_sign_in is not None else self.hf_oauth

    @property
    def on_loopback(self) -> bool:
        """Whether the server listens on loopback only (one person's workstation): no one else can reach it."""
        return self.host in ("127.0.0.1", "localhost", "::1")

    @property
    def web_pushes_with_server_token(self) -> bool:
        """Whether a push from the web may use the server's own Hub token: only where its owner opted
        in and no one else can reach the server (the CLI always uses it)."""
        return self.push_with_server_token and self.on_loopback

    @property
    def login(self) -> tuple[str, str] | None:
        return (self.username, self.password) if self.username and self.password else None


_current: Settings | None = None


def current() -> Settings:
    """The process's settings: read from the environment on first use, then fixed."""
    global _current
    if _current is None:
        _current = Settings.from_env()
    return _current


def forget() -> None:
    """The next `current()` reads the environment again (tests start each case this way)."""
    global _current
    _current = None


def use(settings: Settings) -> Settings:
    """Install settings read by an entry point (the app, the CLI, the worker, a test)."""
    global _current
    _current = settings
    return settings
