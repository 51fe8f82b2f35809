"""What a Hugging Face Space needs: the README's config block, a server on 0.0.0.0 from Gradio's own
variables, binaries marked for LFS/Xet, and the licence file."""

from __future__ import annotations

import fnmatch
import re
import urllib.request
from pathlib import Path

import psutil
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
