"""The whole operator flow in a real headless Chromium (Playwright) against the real app server,
on the README's chad case with default settings:

generate `flag of chad` seeds 36-43 → flag seed 40 (purple stripe) → paint one stroke (the editor
works) → upload the corrected image as the surrogate → a default job → the verdict, the side-by-side
images and the integrity grid on Results → download. Screenshots of every tab go to
docs/screenshots/<tab>.png (the README shows them).
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageColor

from unlearn_core.metrics import painted_mask

from benchmarks.app_server import AppServer

ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / "docs" / "screenshots"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"]
EXAMPLES = ROOT / "assets" / "examples"
PROMPT, SEEDS, TARGET_SEED = "flag of chad", "36-43", 40
MODEL_SIDE = 64  # the demo model's images
RED, BAND_PIXEL, TOLERANCE = "#b90b2d", (55, 30), 80  # Chad's red, a pixel of seed 40's purple stripe, the region tool's default tolerance
UI_TIMEOUT_MS = 180_000
JOB_TIMEOUT_MS = 900_000  # a default job: about 30 s on an idle 2-core CPU, minutes on a busy one

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
        context = browser.new_context(viewport={"width": 1400, "height": 1000}, device_scale_factor=1, accept_downloads=True)
        context.set_default_timeout(UI_TIMEOUT_MS)
        page = context.new_page()
        page.goto(server.url)
        page.wait_for_selector("#gen-run")
        yield page
        browser.close()


def shoot(page, name: str) -> None:
    """A full-page screenshot once every image on the page has loaded (Chromium loads images below
    the fold lazily: scrolled through first, or they show blank)."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.evaluate("""async () => {
        for (let y = 0; y < document.body.scrollHeight; y += 400) { window.scrollTo(0, y); await new Promise(done => setTimeout(done, 50)); }
    }""")
    page.wait_for_function("[...document.images].every(image => image.complete)")
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name, exact=True).click()


def text_of(page, selector: str) -> str:
    return page.locator(selector).inner_text()


def wait_text(page, selector: str, needle: str, timeout: int = UI_TIMEOUT_MS) -> None:
    page.wait_for_function("([s, n]) => { const e = document.querySelector(s); return e && e.innerText.includes(n); }", arg=[selector, needle], timeout=timeout)


def natural_width(page, selector: str) -> int:
    """The image's own width, once it has loaded (Chromium loads an image only near the viewport)."""
    image = page.locator(selector).first
    image.scroll_into_view_if_needed()
    image.evaluate("e => e.complete && e.naturalWidth ? e.naturalWidth : new Promise(done => e.addEventListener('load', () => done(e.naturalWidth), {once: true}))")
    return image.evaluate("e => e.naturalWidth")


def image_at(page, src: str) -> "Image.Image":
    """The image an <img> shows, fetched as the browser would."""
    import base64
    import io

    if src.startswith("data:"):
        return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB")
    return Image.open(io.BytesIO(page.request.get(src).body())).convert("RGB")


def click_pixel(page, selector: str, pixel: tuple[int, int], side: int) -> None:
    """Click the middle of one pixel of an image `side` pixels wide, however large it is shown."""
    box = page.locator(selector).first.bounding_box()
    page.mouse.click(box["x"] + (pixel[0] + 0.5) * box["width"] / side, box["y"] + (pixel[1] + 0.5) * box["height"] / side)


def band_of(image: "Image.Image", pixel: tuple[int, int], tolerance: int) -> np.ndarray:
    """The connected pixels whose colour lies within `tolerance` (R+G+B) of `pixel`'s: the band a
    recolour at `pixel` should change, found with scipy's labelling, not the app's fill."""
    from scipy import ndimage

    rgb = np.asarray(image, dtype=np.int32)
    near = np.abs(rgb - rgb[pixel[1], pixel[0]]).sum(axis=-1) <= tolerance
    labels, _ = ndimage.label(near)
    return labels == labels[pixel[1], pixel[0]]


def pick(page, dropdown: str, option: str) -> None:
    page.locator(f"{dropdown} input").first.click()
    page.get_by_role("option", name=option, exact=True).click()


def test_operator_flow(page, server, tmp_path):
    from safetensors.torch import load_file

    # 1. generate the README's grid (default steps and guidance)
    page.locator("#gen-prompt textarea, #gen-prompt input").first.fill(PROMPT)
    page.locator("#gen-seeds textarea, #gen-seeds input").first.fill(SEEDS)
    page.click("#gen-run")
    page.wait_for_function("document.querySelectorAll('#gen-gallery img').length >= 8")
    assert f"seed {TARGET_SEED}" in text_of(page, "#gen-gallery")  # captions carry the provenance
    wait_text(page, "#gen-judge-note", "thinks")  # the flag judge marks what it thinks wrong, seed 40's purple stripe among them
    assert f"seed {TARGET_SEED} · ⚠ looks like" in text_of(page, "#gen-gallery")

    # 2. flag seed 40 (the purple stripe) by clicking it
    page.locator("#gen-gallery img").nth(TARGET_SEED - 36).click()
    wait_text(page, "#target-info", "Target flagged")
    assert f"seed **{TARGET_SEED}**" in page.locator("#target-info").inner_text() or f"seed {TARGET_SEED}" in text_of(page, "#target-info")
    page.wait_for_selector("#target-image img")
    shoot(page, "generate")

    # 3. the editor works (one stroke reaches the surrogate), then the corrected image is uploaded
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
    assert "PSNR" in similarity and ("SSCD" in similarity)  # SSCD is a value or "not on this server"
    assert float(re.search(r"SSIM: ([0-9.]+)", similarity).group(1)) < 0.99, "the painted stroke did not reach the surrogate"
    painted = page.locator("#sur-surrogate img").first.get_attribute("src")
    open_tab(page, "Upload")
    page.locator("#sur-upload input[type=file]").set_input_files(str(EXAMPLES / "chad_seed40_surrogate.png"))
    page.wait_for_selector("#sur-upload img")
    page.click("#sur-use-upload")
    page.wait_for_function("([s, old]) => { const e = document.querySelector(s); return e && e.getAttribute('src') !== old; }", arg=["#sur-surrogate img", painted])
    wait_text(page, "#sur-metrics", "from your image")

    # ... and the surrogate the job uses: the purple stripe recoloured red with the region tool
    uploaded = page.locator("#sur-surrogate img").first.get_attribute("src")
    open_tab(page, "Recolour region")
    region = page.locator("#sur-region img").first
    region.wait_for(state="visible")
    target = image_at(page, region.get_attribute("src")).resize((MODEL_SIDE, MODEL_SIDE), Image.Resampling.NEAREST)  # shown enlarged, pixel by pixel
    page.locator("#sur-colour .dialog-button").first.click()
    hex_box = page.locator("#sur-colour input[type=text]").first
    hex_box.fill(RED)
    hex_box.press("Enter")
    page.locator("#sur-tolerance").first.click(position={"x": 5, "y": 5})  # closes the colour dialog
    before = region.get_attribute("src")
    click_pixel(page, "#sur-region img", BAND_PIXEL, MODEL_SIDE)
    page.wait_for_function("([s, old]) => { const e = document.querySelector(s); return e && e.getAttribute('src') !== old; }", arg=["#sur-region img", before])
    page.click("#sur-use-region")
    page.wait_for_function("([s, old]) => { const e = document.querySelector(s); return e && e.getAttribute('src') !== old; }", arg=["#sur-surrogate img", uploaded])
    wait_text(page, "#sur-metrics", "from the recoloured region")
    surrogate = image_at(page, page.locator("#sur-surrogate img").first.get_attribute("src"))
    assert np.array_equal(painted_mask(target, surrogate), band_of(target, BAND_PIXEL, TOLERANCE)), "the recolour changed more or less than the band"
    assert surrogate.getpixel(BAND_PIXEL) == ImageColor.getrgb(RED)
    page.wait_for_timeout(500)  # let the new image and metrics settle before the screenshot
    shoot(page, "surrogate")

    # 4. a job with the default settings: the preset up front, expert settings behind
    open_tab(page, "Unlearn")
    assert page.locator("#unl-prompt textarea, #unl-prompt input").first.input_value() == PROMPT
    assert page.locator("#unl-seed input").first.input_value() == str(TARGET_SEED)
    wait_text(page, "#unl-preset-info", "balanced")
    wait_text(page, "#unl-surrogate-in-use", "from the recoloured region")  # which surrogate the job will use
    assert page.locator("#cfg-review-seeds textarea, #cfg-review-seeds input").first.input_value() == "36, 37, 38, 39, 41, 42, 43"  # the rest of the grid, checked after the job
    assert page.locator("#cfg-steps").is_visible() and page.locator("#cfg-stop-at-r").is_visible()
    assert not page.locator("#cfg-siss-mixture").is_visible() and not page.locator("#cfg-lora-rank").is_visible()  # SISS only for SISS; Advanced closed
    pick(page, "#cfg-method", "siss")
    page.locator("#cfg-siss-mixture").wait_for(state="visible")
    pick(page, "#cfg-method", "ours")
    page.locator("#cfg-siss-mixture").wait_for(state="hidden")
    assert page.locator("#unl-cancel").is_disabled() and page.locator("#unl-resume").is_disabled()  # no job yet
    page.click("#unl-start")
    page.wait_for_function("() => { const e = document.querySelector('#unl-job-id textarea, #unl-job-id input'); return e && e.value.length > 8; }")
    job_id = page.locator("#unl-job-id textarea, #unl-job-id input").first.input_value()
    wait_text(page, "#unl-progress", "→")  # the phase line
    counted, totals = False, set()  # the remember set counts its images; the step total never changes
    deadline = time.monotonic() + JOB_TIMEOUT_MS / 1000
    while "Done" not in (progress := text_of(page, "#unl-progress")):
        assert time.monotonic() < deadline, progress
        counted |= bool(re.search(r"\d+ of \d+ images of other seeds sampled", progress))
        totals |= set(re.findall(r"of up to (\d+) steps", progress))
        page.wait_for_timeout(300)
    totals |= set(re.findall(r"of up to (\d+) steps", progress))
    assert counted, "the remember set showed no count"
    assert len(totals) == 1, f"the step total changed during the job: {totals}"
    wait_text(page, "#job-table", job_id[:8])
    assert "✓ evaluating" in text_of(page, "#unl-progress")
    page.wait_for_function("() => document.querySelector('#unl-cancel').disabled && document.querySelector('#unl-resume').disabled")  # a finished job
    shoot(page, "unlearn")

    # 5. results: the verdict, target / surrogate / after side by side, the slider, the integrity grid
    open_tab(page, "Results")
    wait_text(page, "#res-verdict", "of the way to the surrogate")
    verdict = text_of(page, "#res-verdict")
    heading = re.search(r"(Fixed|Partly fixed|Not fixed)", verdict)
    assert heading, verdict
    moved = re.search(r"moved (\d+)% of the way", verdict).group(1)
    assert re.search(rf"moved {moved}% of the way to the surrogate[^\n]*: {heading.group(1).lower()}", progress), progress  # the Unlearn page's final line says the same
    trained = re.search(r"trained (\d+) of up to (\d+) steps", text_of(page, "#res-summary"))
    assert trained and {trained.group(2)} == totals and int(trained.group(1)) <= int(trained.group(2))
    assert "changed visibly" in verdict.lower()  # which seeds changed (or that none did)
    assert re.search(r"\d+/7 of the seeds you generated", verdict), verdict  # the operator's own grid, besides the fixed set
    assert page.locator("#res-rerun").is_visible() == (heading.group(1) != "Fixed")  # one click to the 'strong' preset when not fixed
    for name in ("target", "surrogate", "after"):
        page.wait_for_selector(f"#res-{name} img")
        assert natural_width(page, f"#res-{name} img") >= 256, f"{name} is not enlarged"
    page.wait_for_selector("#res-slider img")
    page.wait_for_selector("#res-grid img")
    assert natural_width(page, "#res-grid img") >= 1000  # every seed, labelled, at 2x
    wait_text(page, "#res-metrics", "after vs target")
    metrics_text = text_of(page, "#res-metrics")
    assert "SSIM" in metrics_text and "integrity" in metrics_text
    assert f"{moved}% of the way: {heading.group(1).lower()}" in metrics_text  # the headline's words and number
    wait_text(page, "#res-availability", "SSIM")
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
    model_card = (server.runs_dir / "jobs" / job_id / "README.md").read_text()  # the card that goes out with the adapter
    assert f"**Verdict: {heading.group(1).lower()}** — the painted pixels of the target seed moved {moved}% of the way" in model_card
    assert f"Trained {trained.group(1)} steps" in model_card

    # compare base and adapter: the flagged seed first, the pairs large enough to see
    page.click("#ada-compare")
    page.wait_for_selector("#ada-gallery img")
    captions = re.findall(r"seed (\d+)", text_of(page, "#ada-gallery"))
    assert captions[0] == str(TARGET_SEED) and sorted(set(map(int, captions))) == list(range(TARGET_SEED, TARGET_SEED + 4)), captions
    assert natural_width(page, "#ada-gallery img") >= 192
    shoot(page, "adapters")

    # the fix ledger and a release of it: the job's fix re-checked in the release
    open_tab(page, "Releases")
    page.wait_for_function("([id]) => { const e = document.querySelector('#rel-job input'); return e && e.value.includes(id); }", arg=[job_id])
    page.click("#rel-add")
    wait_text(page, "#rel-ledger", "flag of chad")
    page.wait_for_selector("#rel-thumbs img")
    page.click("#rel-make")
    wait_text(page, "#rel-note", "Every fix holds")
    wait_text(page, "#rel-result", "fixed")
    assert re.search(r"flag of chad\s+40\s+\d+%\s+\d+%\s+fixed", text_of(page, "#rel-result")), text_of(page, "#rel-result")
    page.locator("#rel-zip a").first.wait_for(state="visible")
    shoot(page, "releases")

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
    similarity = page.locator("#instr-similarity-plot img")  # loaded lazily: only once scrolled to
    similarity.wait_for(state="attached")
    similarity.scroll_into_view_if_needed()
    page.wait_for_function("document.querySelector('#instr-similarity-plot img').naturalWidth > 0")
    wait_text(page, "#instr-status", "Done in")
    assert re.search(r"(does not remove|cut the attention)", text_of(page, "#instr-status").split("\n")[0]), "no conclusion line"
    page.wait_for_timeout(1000)  # an event refused by the server shows its toast by now
    assert "greater than maximum" not in page.inner_text("body"), "the run's new step range was refused"
    shoot(page, "instruction")
