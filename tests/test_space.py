"""What a Hugging Face Space needs: the README's config block, a server on 0.0.0.0 from Gradio's own
variables, binaries marked for LFS/Xet, and the licence file."""

from __future__ import annotations

import fnmatch
import re
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml

from benchmarks.app_server import AppServer

ROOT = Path(__file__).resolve().parent.parent


def front_matter() -> dict:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.match(r"---\n(.*?)\n---\n", text, re.DOTALL)
    assert match, "README.md must start with a YAML block between --- lines"
    return yaml.safe_load(match.group(1))


def pinned(package: str) -> str:
    text = (ROOT / "requirements.txt").read_text()
    match = re.search(rf"^{re.escape(package)}==(\S+)", text, re.MULTILINE)
    assert match, f"{package} is not pinned in requirements.txt"
    return match.group(1)


def test_readme_is_a_space_config():
    from huggingface_hub import SpaceHardware, SpaceStorage

    config = front_matter()
    assert config["sdk"] == "gradio"
    assert config["python_version"] == "3.11"  # a string: YAML would read 3.11 unquoted as a float
    assert str(config["sdk_version"]) == pinned("gradio")
    assert (ROOT / config["app_file"]).is_file()
    assert config["license"] == "apache-2.0"
    assert config["suggested_hardware"] in {flavor.value for flavor in SpaceHardware}
    assert config["suggested_storage"] in {size.value for size in SpaceStorage}
    assert {"write-repos", "manage-repos"} <= set(config["hf_oauth_scopes"]), "a signed-in visitor's token must create and write their repos"


class SpaceServer(AppServer):
    """`python app.py` configured the way a Space configures it: Gradio's variables, no HOTFIX_HOST/PORT."""

    def environment(self) -> dict:
        env = {key: value for key, value in super().environment().items() if key not in ("HOTFIX_HOST", "HOTFIX_PORT")}
        env.update({"GRADIO_SERVER_NAME": "0.0.0.0", "GRADIO_SERVER_PORT": str(self.port)})
        return env


def listening_addresses(pid: int, port: int) -> set[str]:
    """The local addresses on which `pid` or one of its children listens at `port`."""
    root = psutil.Process(pid)
    addresses = set()
    for process in [root, *root.children(recursive=True)]:
        try:
            connections = process.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        addresses |= {c.laddr.ip for c in connections if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
    return addresses


def test_the_app_listens_on_all_interfaces_from_gradio_variables(tmp_path):
    server = SpaceServer(tmp_path / "runs", cache_dir=tmp_path / "cache")
    try:
        server.start()
        assert listening_addresses(server.process.pid, server.port) == {"0.0.0.0"}, server.tail()
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/", timeout=10) as response:
            assert response.status == 200
    finally:
        server.stop()
    assert server.process.poll() is not None


def lfs_patterns() -> list[str]:
    patterns = []
    for line in (ROOT / ".gitattributes").read_text().splitlines():
        fields = line.split()
        if fields and not fields[0].startswith("#") and "filter=lfs" in fields[1:]:
            patterns.append(fields[0])
    return patterns


def test_binaries_are_marked_for_lfs():
    patterns = lfs_patterns()
    assert {"*.safetensors", "*.png", "*.jpg", "*.pt", "*.bin", "*.ckpt", "*.pth", "*.zip"} <= set(patterns)
    # every binary file shipped in the repository (weights, example and documentation images) is covered
    binaries = [path for folder in ("assets", "docs") for path in (ROOT / folder).rglob("*")
                if path.is_file() and b"\0" in path.read_bytes()[:8000]]
    assert binaries
    uncovered = [str(path.relative_to(ROOT)) for path in binaries
                 if not any(fnmatch.fnmatch(path.name, pattern) for pattern in patterns if "/" not in pattern)]
    assert not uncovered, f"binary files not marked for LFS/Xet in .gitattributes: {uncovered}"


def test_license_is_apache_2():
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.lstrip().startswith("Apache License")
    assert text.split("\n", 2)[1].strip() == "Version 2.0, January 2004"
    for part in ("TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION", "END OF TERMS AND CONDITIONS",
                 "APPENDIX: How to apply the Apache License to your work."):
        assert part in text


def test_dockerfile_follows_the_spaces_template():
    """Only read here (no docker daemon in the test environment)."""
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"useradd .*-u 1000 user", text)
    assert "ENV HOME=/home/user" in text and "PATH=/home/user/.local/bin:$PATH" in text
    assert "WORKDIR $HOME/app" in text and "COPY --chown=user" in text
    assert "EXPOSE 7860" in text and "GRADIO_SERVER_NAME=0.0.0.0" in text
    volume = re.search(r"^VOLUME (\S+)", text, re.MULTILINE).group(1)
    runs = re.search(r"HOTFIX_RUNS_DIR=(\S+)", text).group(1)
    assert runs.startswith(volume.rstrip("/") + "/")
    assert "HOTFIX_HOST" not in text and "HOTFIX_PORT" not in text  # they would override Gradio's variables
    assert text.index("pip install -r requirements.txt") < text.index("pip install --no-deps -e .")


# -- pushes and training from the web of a public server ----------------------------------------
class HubRecorder:
    """A real local HTTP server in the Hub's place: it records each request's Authorization header
    and refuses every request (401), as the Hub refuses a token it does not know."""

    def __init__(self):
        import http.server
        import threading

        seen = self.authorizations = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def _refuse(self):
                seen.append(self.headers.get("Authorization", ""))
                body = b'{"error": "Invalid credentials in Authorization header"}'
                self.send_response(401)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_HEAD = _refuse

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


def finished_job(store, owner: str) -> str:
    """A job of `owner` with adapter files (what a push uploads), as a finished job has."""
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    from unlearn_core.config import UnlearnConfig

    job = store.create("assets/demo-model", UnlearnConfig(), [{"prompt": "flag of chad", "seed": 40, "surrogate": Image.new("RGB", (64, 64)), "target": None}], owner=owner)
    save_file({"unet.lora_A.weight": torch.zeros(1)}, str(job.folder.path / "pytorch_lora_weights.safetensors"))
    job.folder.card_file.write_text("{}")
    return job.id


def test_a_push_from_the_web_never_uses_the_server_s_token_where_others_can_reach_the_server(tmp_path, monkeypatch):
    """The Adapters tab's push handler, called as Gradio calls it, against a recording Hub: the
    server's HF_TOKEN leaves the server only from a loopback server whose owner opted in."""
    import gradio as gr
    from huggingface_hub import constants

    import app
    from tests.gradio_calls import handler_call, handler_named, hugging_face_request
    from ui.common import Services
    from unlearn_core import settings
    from unlearn_core.store import JobStore
    from unlearn_core.worker import JobWorker

    hub = HubRecorder()
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_server_secret")
    store = JobStore(tmp_path / "runs")
    demo = app.build(Services(store, JobWorker(store)))
    push, push_release = handler_named(demo, "push_job"), handler_named(demo, "push_release")
    anonymous_job, alice_job = finished_job(store, "session:tab-1"), finished_job(store, "hf:alice")

    def attempt(env: dict, job: str, typed: str = "", signed_in: str | None = None) -> tuple[str, list[str]]:
        monkeypatch.setattr(settings, "_current", settings.Settings.from_env(env))
        hub.authorizations.clear()
        request = hugging_face_request(signed_in, access_token="hf_visitor_oauth")
        with pytest.raises(gr.Error) as refused:
            handler_call(push, request, [job, "someone/hotfix-test", typed, False])
        return refused.value.message, list(hub.authorizations)

    try:
        public = {"HOTFIX_HOST": "0.0.0.0", "HOTFIX_PUSH_WITH_SERVER_TOKEN": "1"}  # opted in, yet reachable from outside
        message, sent = attempt(public, anonymous_job)
        assert "sign in with Hugging Face, or paste a token" in message and sent == [], "pushed without a token of the visitor's"
        message, sent = attempt(public, anonymous_job, typed="hf_visitor_typed")
        assert "could not push" in message and sent and set(sent) == {"Bearer hf_visitor_typed"}
        message, sent = attempt(public, alice_job, signed_in="alice")
        assert sent and set(sent) == {"Bearer hf_visitor_oauth"}, "the signed-in visitor's own token"
        message, sent = attempt({"HOTFIX_HOST": "127.0.0.1"}, anonymous_job)  # loopback, not opted in
        assert "sign in" in message and sent == []
        message, sent = attempt({"HOTFIX_HOST": "127.0.0.1", "HOTFIX_PUSH_WITH_SERVER_TOKEN": "1"}, anonymous_job)
        assert sent and set(sent) == {"Bearer hf_server_secret"}, "the one case the owner's token is used: their own loopback server, opted in"
        monkeypatch.setattr(settings, "_current", settings.Settings.from_env(public))  # the Releases tab's push, by the same rule
        hub.authorizations.clear()
        with pytest.raises(gr.Error, match="sign in with Hugging Face, or paste a token"):
            handler_call(push_release, hugging_face_request(None), [store.get(anonymous_job).run_dir, "someone/hotfix-release", ""])
        assert hub.authorizations == []
    finally:
        hub.close()


def test_where_sign_in_is_required_an_anonymous_visitor_may_not_start_a_job(tmp_path, monkeypatch):
    import gradio as gr
    from PIL import Image

    import app
    from tests.gradio_calls import handler_call, handler_named, hugging_face_request
    from ui.common import Services
    from unlearn_core import settings
    from unlearn_core.store import JobStore
    from unlearn_core.worker import JobWorker

    store = JobStore(tmp_path / "runs")
    start = handler_named(app.build(Services(store, JobWorker(store))), "start_job")  # built off a Space: no sign-in button to mock here
    space = {"SYSTEM": "spaces", "SPACE_ID": "someone/hotfix-studio", "OAUTH_CLIENT_ID": "client-id"}
    monkeypatch.setattr(settings, "_current", settings.Settings.from_env(space))
    assert settings.current().requires_sign_in, "on by default on a Space with sign-in"
    surrogate = tmp_path / "surrogate.png"
    Image.new("RGB", (64, 64), (0, 120, 60)).save(surrogate)
    inputs = ["flag of chad", 40, str(surrogate), None, "{}", "assets/demo-model"]
    with pytest.raises(gr.Error, match="sign in with the Sign in with Hugging Face button"):
        handler_call(start, hugging_face_request(None), inputs)
    assert store.list(owner=None) == []
    job_id, _ = handler_call(start, hugging_face_request("alice"), inputs)
    assert store.get(job_id).owner == "hf:alice"
    monkeypatch.setattr(settings, "_current", settings.Settings.from_env({**space, "HOTFIX_REQUIRE_SIGN_IN": "0"}))
    handler_call(start, hugging_face_request(None), inputs)  # the owner turned it off


def test_the_package_declares_every_import_and_leaves_the_benchmarks_out():
    """pyproject.toml names the distribution of every third-party module the app and the core import
    (the ZeroGPU decorator and Ray in extras of their own), asks for the Gradio major the pins test, and installs
    only app.py, ui/ and unlearn_core/."""
    import ast
    import importlib.metadata
    import sys
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())

    def names(requirements: list[str]) -> set[str]:
        return {re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower().replace("_", "-") for requirement in requirements}

    declared = names(project["project"]["dependencies"])
    extras = project["project"]["optional-dependencies"]
    optional = names(extras["zerogpu"] + extras["ray"])
    sources = [ROOT / "app.py", *(ROOT / "ui").rglob("*.py"), *(ROOT / "unlearn_core").rglob("*.py")]
    imported = set()
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"app", "ui", "unlearn_core", "__future__"}
    distributions = importlib.metadata.packages_distributions()
    missing = {module: distributions.get(module) for module in third_party
               if not {name.lower().replace("_", "-") for name in distributions.get(module, [module])} & (declared | optional)}
    assert missing == {}, f"imported but not declared in pyproject.toml: {missing}"
    gradio_minimum = next(requirement for requirement in project["project"]["dependencies"] if requirement.startswith("gradio"))
    assert re.search(r">=(\d+)", gradio_minimum).group(1) == pinned("gradio").split(".")[0]
    assert project["build-system"]["requires"][0] == "setuptools>=77", "license = 'Apache-2.0' (SPDX) needs setuptools 77"
    assert not any(pattern.startswith("benchmarks") for pattern in project["tool"]["setuptools"]["packages"]["find"]["include"])


def test_the_hub_cache_goes_on_a_space_s_persistent_storage(tmp_path):
    from unlearn_core.settings import use_persistent_hub_cache

    storage = tmp_path / "data"
    storage.mkdir()
    space = {"SYSTEM": "spaces"}
    assert use_persistent_hub_cache(space, storage) == str(storage / ".huggingface") == space["HF_HOME"]
    kept = {"SYSTEM": "spaces", "HF_HOME": "/somewhere"}
    assert use_persistent_hub_cache(kept, storage) is None and kept["HF_HOME"] == "/somewhere"
    assert use_persistent_hub_cache({"SYSTEM": "spaces"}, tmp_path / "no-storage") is None
    assert use_persistent_hub_cache({}, storage) is None, "off a Space, HF_HOME is the user's business"
