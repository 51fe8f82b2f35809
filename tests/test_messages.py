"""No message leaves the server with a server path in it (issue 37, finding 8).

Every handler of the app is wrapped by `ui.messages.guard_handlers`, so its errors pass through
`ui.messages.fail`: a `gr.Error` is scrubbed of absolute paths, anything unexpected becomes one
plain line (its traceback goes to the server's log). The handlers are called directly on a page
built by `app.build`, with real files: an unreadable after_0.png, a missing image, and an adapter
upload whose safetensors header claims a 40 GB tensor.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import gradio as gr
import pytest
from PIL import Image

from tests.test_jobs import instance
from ui.messages import UNEXPECTED, fail, guarded
from unlearn_core.config import UnlearnConfig
from unlearn_core.errors import ImageError
from unlearn_core.images import open_image
from unlearn_core.store import JobStore


def handlers(store: JobStore) -> dict:
    from app import build
    from ui.common import Services

    demo = build(Services(store, None, "cpu"))
    return {fn.name: fn.fn for fn in demo.fns.values()}


def unreadable(path: Path) -> Path:
    """`path` made a file that exists but cannot be opened, as a non-root server meets a run file
    with the wrong owner: mode 000, or for root (who reads any mode) a link to a write-only
    kernel file, which refuses root too."""
    path.unlink(missing_ok=True)
    if os.geteuid() != 0:
        path.write_bytes(b"\x89PNG")
        path.chmod(0)
    else:
        path.symlink_to("/proc/sys/vm/drop_caches")
    try:
        path.open("rb").close()
    except PermissionError:
        return path
    pytest.skip("cannot make an unreadable file here")


def test_fail_and_the_guard_scrub_every_message(tmp_path):
    leaked = f"cannot open {tmp_path}/jobs/jAbc/inputs/target_0.png"
    assert fail(leaked).message == "cannot open …/target_0.png"
    assert fail(ImageError(leaked)).message == "cannot open …/target_0.png"

    def raises_gradio_error(job):
        raise gr.Error(f"job {job}: see {tmp_path}/worker.log")

    def raises_a_bug(job, request: gr.Request):
        open(tmp_path / "no" / "such" / "file")

    def streams(job):
        yield 1
        raise RuntimeError(f"{tmp_path}/x")

    with pytest.raises(gr.Error) as caught:
        guarded(raises_gradio_error)("j1")
    assert caught.value.message == "job j1: see …/worker.log"
    with pytest.raises(gr.Error) as caught:
        guarded(raises_a_bug)("j1", None)
    assert caught.value.message == UNEXPECTED.format(kind="FileNotFoundError") and str(tmp_path) not in caught.value.message
    with pytest.raises(gr.Error) as caught:
        list(guarded(streams)("j1"))
    assert caught.value.message == UNEXPECTED.format(kind="RuntimeError")
    import inspect

    assert list(inspect.signature(guarded(raises_a_bug)).parameters) == ["job", "request"]  # Gradio still passes gr.Request
    assert inspect.isgeneratorfunction(guarded(streams))


def test_image_messages_name_the_file_not_its_folder(tmp_path):
    with pytest.raises(ImageError) as caught:
        open_image(tmp_path / "missing.png", "surrogate")
    assert str(tmp_path) not in str(caught.value) and "missing.png" in str(caught.value)
    with pytest.raises(ImageError) as caught:
        open_image(unreadable(tmp_path / "target.png"), "target")
    assert str(tmp_path) not in str(caught.value) and "cannot read target.png" in str(caught.value)


def test_results_with_an_unreadable_after_image(tmp_path):
    """Results on a job whose after_0.png cannot be opened showed Python's "[Errno 13] Permission
    denied: '<the runs folder>/…/after_0.png'"; now the image is named as damaged and the rest shows."""
    store = JobStore(tmp_path / "runs")
    job = store.create("assets/demo-model", UnlearnConfig(steps=7), [instance(1)], owner="session:unknown")
    store.update(job.id, state="done", step=7)
    Image.new("RGB", (64, 64), (200, 10, 10)).save(job.folder.training_image("target", 0))
    unreadable(job.folder.after_image(0))
    summary = handlers(store)["show"](job.id, None, None)[0]  # job, request, signed-in profile
    assert "after_0.png" in summary and "damaged" in summary, summary
    assert str(tmp_path) not in summary


def test_try_adapter_with_a_header_claiming_40_gb(tmp_path):
    """The loader's text named the server's temporary copy of the upload by its full path."""
    header = json.dumps({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight":
                         {"dtype": "F32", "shape": [100_000, 100_000], "data_offsets": [0, 40_000_000_000]}}).encode()
    upload = tmp_path / "upload" / "huge.safetensors"
    upload.parent.mkdir()
    upload.write_bytes(struct.pack("<Q", len(header)) + header + bytes(64))
    with pytest.raises(gr.Error) as caught:
        handlers(JobStore(tmp_path / "runs"))["try_adapter"](None, str(upload), "flag of chad", "0", 2, "assets/demo-model", None, None)
    message = caught.value.message
    assert "cannot load this adapter" in message, message
    assert "/tmp" not in message and str(tmp_path) not in message and "hotfix-adapter-" not in message, message
