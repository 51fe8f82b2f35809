"""The whole operator flow in a real headless Chromium (Playwright) against the real app server.

generate → flag (click) → paint one stroke → canvas as surrogate → short job → results → download.
Screenshots of every tab go to docs/screenshots/<tab>.png.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from tests.test_api import AppServer

ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / "docs" / "screenshots"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"]
SHORT = {"steps": "4", "batch-size": "2", "remember-count": "2", "eval-seeds": "2", "generation-steps": "4", "checkpoint-every": "0"}
UI_TIMEOUT_MS = 180_000
JOB_TIMEOUT_MS = 480_000

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason=f"no chromium binary ({CHROMIUM}); install it with `apt-get install -y chromium`")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    app = AppServer(root / "runs", cache_dir=root / "cache").start()
    yield app
    app.stop()


@pytest.fixture()
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
        context.set_default_timeout(UI_TIMEOUT_MS)
        page = context.new_page()
        page.goto(server.url)
        page.wait_for_selector("#gen-run")
        yield page
        browser.close()


def shoot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name, exact=True).click()


def text_of(page, selector: str) -> str:
    return page.locator(selector).inner_text()


def wait_text(page, selector: str, needle: str, timeout: int = UI_TIMEOUT_MS) -> None:
    page.wait_for_function("([s, n]) => { const e = document.querySelector(s); return e && e.innerText.includes(n); }", arg=[selector, needle], timeout=timeout)


def test_operator_flow(page, server, tmp_path):
    from safetensors.torch import load_file

    # 1. generate a small grid
    page.locator("#gen-seeds textarea, #gen-seeds input").first.fill("0-3")
    page.locator("#gen-steps input").fill("4")
    page.click("#gen-run")
    page.wait_for_function("document.querySelectorAll('#gen-gallery img').length >= 4")
    assert "seed 1" in text_of(page, "#gen-gallery")  # captions carry the provenance

    # 2. flag one image by clicking it
    page.locator("#gen-gallery img").nth(1).click()
    wait_text(page, "#target-info", "Target flagged")
    assert "seed **1**" in page.locator("#target-info").inner_text() or "seed 1" in text_of(page, "#target-info")
    page.wait_for_selector("#target-image img")
    shoot(page, "generate")

    # 3. paint one stroke over the target on the canvas, use it as the surrogate
    open_tab(page, "Surrogate")
    open_tab(page, "Paint")
    canvas = page.locator("#sur-editor canvas").first
    canvas.wait_for(state="visible")
    page.locator("#sur-editor button[aria-label='Brush']").first.click()
    page.wait_for_timeout(500)  # let the editor draw its background and pick the brush
    box = canvas.bounding_box()  # the target sits in the middle of the canvas area
    x0, y0 = box["x"] + box["width"] / 2 - 80, box["y"] + box["height"] / 2
    page.mouse.move(x0, y0)
    page.mouse.down()
    for i in range(1, 21):
        page.mouse.move(x0 + 8 * i, y0 + i)
        page.wait_for_timeout(15)
    page.mouse.up()
    page.click("#sur-use-canvas")
    wait_text(page, "#sur-metrics", "SSIM")
    similarity = text_of(page, "#sur-metrics")
    assert "PSNR" in similarity and ("SSCD" in similarity)  # SSCD is a value or "unavailable: <reason>"
    assert float(re.search(r"SSIM: ([0-9.]+)", similarity).group(1)) < 0.99, "the painted stroke did not reach the surrogate"
    page.wait_for_selector("#sur-surrogate img")
    shoot(page, "surrogate")

    # 4. a short job
    open_tab(page, "Unlearn")
    assert page.locator("#unl-prompt textarea, #unl-prompt input").first.input_value() == "flag of ireland"
    page.get_by_text("Settings", exact=True).click()
    for name, value in SHORT.items():
        page.locator(f"#cfg-{name} input").fill(value)
    page.click("#unl-start")
    page.wait_for_function("() => { const e = document.querySelector('#unl-job-id textarea, #unl-job-id input'); return e && e.value.length > 8; }")
    job_id = page.locator("#unl-job-id textarea, #unl-job-id input").first.input_value()
    wait_text(page, "#unl-progress", "Done", timeout=JOB_TIMEOUT_MS)
    wait_text(page, "#job-table", job_id[:8])
    assert "4/4" in text_of(page, "#unl-progress")
    shoot(page, "unlearn")

    # 5. results: the before/after grid and the metrics table
    open_tab(page, "Results")
    page.wait_for_selector("#res-grid img")
    wait_text(page, "#res-metrics", "after vs target")
    metrics_text = text_of(page, "#res-metrics")
    assert "SSIM" in metrics_text and "integrity" in metrics_text
    wait_text(page, "#res-availability", "SSIM")
    wait_text(page, "#res-verdict", "of the way to the surrogate")
    assert re.search(r"(Fixed|Partly fixed|Not fixed)", text_of(page, "#res-verdict"))
    shoot(page, "results")

    # 6. adapters: download the LoRA and check the file
    open_tab(page, "Adapters")
    page.wait_for_function("([id]) => { const e = document.querySelector('#ada-job input'); return e && e.value.includes(id); }", arg=[job_id])
    page.click("#ada-prepare")
    link = page.locator("#ada-download a").first
    link.wait_for(state="visible")
    with page.expect_download() as download_info:
        link.click()
    saved = tmp_path / "adapter.safetensors"
    download_info.value.save_as(saved)
    state = load_file(str(saved))
    assert state and any("lora" in key for key in state)
    wait_text(page, "#ada-card-json", "base_model")
    shoot(page, "adapters")

    # 7. the instruction-forgetting tab: a short probe, its images, table and heat map
    open_tab(page, "Instruction forgetting")
    page.locator("#instr-seeds textarea, #instr-seeds input").first.fill("0")
    steps_box = page.locator("#instr-steps input[type=number]").first
    steps_box.fill("3")
    steps_box.press("Enter")
    page.click("#instr-run")
    page.wait_for_selector("#instr-gallery img")
    wait_text(page, "#instr-table", "unlearning")
    page.wait_for_selector("#instr-heatmap img")
    shoot(page, "instruction")
