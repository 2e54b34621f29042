"""The web UI in a real browser: Playwright driving Debian's headless Chromium.

The app runs in this process on a free loopback port, on the embedded shapes model with 5 steps.
Screenshots are written to tests/artifacts/ (ignored by git) and their paths printed.
Skipped, with the reason, when playwright, gradio or /usr/bin/chromium is missing
(``apt-get install -y chromium && pip install playwright``; CI installs both).
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("ATTNCTRL_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
STEPS = 5
RUN_TIMEOUT_MS = 180_000

pytest.importorskip("gradio", reason="the web UI needs gradio: pip install 'attnctrl[app]'")
sync_api = pytest.importorskip("playwright.sync_api", reason="the browser tests need playwright: pip install playwright")
if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)) and not shutil.which(CHROMIUM):
    pytest.skip(f"the browser tests need Chromium at {CHROMIUM} (apt-get install -y chromium)", allow_module_level=True)

pytestmark = pytest.mark.timeout(600)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def app_url():
    from attnctrl.app import launch

    port = _free_port()
    demo = launch(None, host="127.0.0.1", port=port, preload=True, prevent_thread_lock=True, quiet=True, steps=STEPS)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--headless"])
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture()
def page(browser, app_url):
    context = browser.new_context(viewport={"width": 1400, "height": 1100})
    page = context.new_page()
    page.goto(app_url)
    page.wait_for_selector("#edit-run")
    try:
        yield page
    finally:
        context.close()


def _fill(page, elem_id: str, text: str) -> None:
    page.locator(f"#{elem_id}").get_by_role("textbox").fill(text)


def _screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path


def _errors(page) -> list[str]:
    return [t for t in page.locator(".toast-body").all_inner_texts() if t.strip()]


def test_edit_shows_source_and_edit_side_by_side(page):
    assert page.locator("#model").get_by_role("textbox").input_value() == "shapes"
    _fill(page, "edit-source", "a red circle on the left")
    _fill(page, "edit-edited", "a blue circle on the left")
    page.locator("#edit-run").click()
    page.wait_for_function("document.querySelectorAll('#edit-gallery img').length >= 2", timeout=RUN_TIMEOUT_MS)
    page.locator("#edit-info").get_by_text("Replace on shapes").wait_for(timeout=RUN_TIMEOUT_MS)
    images = page.locator("#edit-gallery img")
    assert images.count() == 2
    for k in range(2):
        images.nth(k).wait_for()
        width = images.nth(k).evaluate("img => img.complete ? img.naturalWidth : 0")
        assert width >= 64
    text = page.locator("#edit-gallery").inner_text()
    assert "source: a red circle on the left" in text and "edit 1: a blue circle on the left" in text
    assert f"{STEPS} steps" in page.locator("#edit-info").inner_text()
    assert _errors(page) == []
    _screenshot(page, "app_edit.png")

    # the Attention maps tab draws the last edit's maps
    page.get_by_role("tab", name="Attention maps").click()
    page.locator("#maps-run").click()
    page.wait_for_function("document.querySelectorAll('#maps-image img').length >= 1", timeout=RUN_TIMEOUT_MS)
    assert _errors(page) == []
    _screenshot(page, "app_attention.png")


def test_bad_input_shows_the_library_message(page):
    _fill(page, "edit-source", "a red circle on the left")
    _fill(page, "edit-edited", "a blue circle on the left")
    _fill(page, "edit-weights", "green=2")
    page.locator("#edit-run").click()
    toast = page.locator(".toast-body").filter(has_text="green")
    toast.wait_for(timeout=RUN_TIMEOUT_MS)
    message = toast.inner_text()
    assert "'green'" in message and "words are" in message and "'blue'" in message
    assert "Traceback" not in page.content()
    _screenshot(page, "app_error.png")
    assert page.locator("#edit-gallery img").count() == 0


def test_real_image_invert_then_edit(page, tmp_path):
    from PIL import Image, ImageDraw

    photo = tmp_path / "photo.png"
    image = Image.new("RGB", (64, 64), (255, 255, 255))
    ImageDraw.Draw(image).ellipse((8, 20, 32, 44), fill=(220, 30, 30))
    image.save(photo)
    page.get_by_role("tab", name="Real image").click()
    page.locator("#real-upload input[type=file]").set_input_files(str(photo))
    page.wait_for_function("document.querySelectorAll('#real-preview img').length >= 1", timeout=RUN_TIMEOUT_MS)
    _fill(page, "real-caption", "a red circle on the left")
    page.locator("#real-invert").click()
    page.locator("#real-invert-info").get_by_text("inversion of 64x64").wait_for(timeout=RUN_TIMEOUT_MS)
    for k, edited in enumerate(("a blue circle on the left", "a green circle on the left"), start=1):
        _fill(page, "real-edited", edited)
        page.locator("#real-run").click()
        page.wait_for_function(
            f"document.querySelector('#real-gallery') && document.querySelector('#real-gallery').innerText.includes({edited!r})",
            timeout=RUN_TIMEOUT_MS,
        )
        assert page.locator("#real-gallery img").count() == 2
    assert "reconstruction: a red circle on the left" in page.locator("#real-gallery").inner_text()
    assert _errors(page) == []
    _screenshot(page, "app_real_image.png")


def test_real_image_method_sets_its_default_guidance(page):
    """Choosing an inversion method puts its default guidance in the slider (edit-friendly 3.5,
    the flow ODE solvers 1); the user can still move it afterwards."""
    page.get_by_role("tab", name="Real image").click()
    guidance = page.locator("#real-guidance input[type=number]")
    assert float(guidance.input_value()) == 7.5
    for method, expected in (("edit-friendly", 3.5), ("fireflow", 1.0), ("null-text", 7.5)):
        page.locator("#real-method input").click()
        page.get_by_role("option", name=method, exact=True).click()
        page.wait_for_function(
            f"Number(document.querySelector('#real-guidance input[type=number]').value) === {expected}", timeout=30_000)
    assert _errors(page) == []


def _toast(page, text: str) -> str:
    toast = page.locator(".toast-body").filter(has_text=text)
    toast.first.wait_for(timeout=RUN_TIMEOUT_MS)
    assert "Traceback" not in page.content()
    return toast.first.inner_text()


def test_edit_refuses_an_out_of_range_weight(page):
    _fill(page, "edit-source", "a red circle on the left")
    _fill(page, "edit-edited", "a blue circle on the left")
    _fill(page, "edit-weights", "blue=1e30")
    page.locator("#edit-run").click()
    assert "out of range" in _toast(page, "out of range")
    assert page.locator("#edit-gallery img").count() == 0


def test_attention_maps_tab_refuses_a_missing_prompt(page):
    page.get_by_role("tab", name="Attention maps").click()
    page.locator("#maps-choice").get_by_text("Generate").click()
    _fill(page, "maps-prompt", "   ")
    page.locator("#maps-run").click()
    assert "Prompt" in _toast(page, "Prompt")
    _screenshot(page, "app_maps_error.png")


def test_real_image_tab_refuses_an_edit_before_an_inversion(page):
    page.get_by_role("tab", name="Real image").click()
    page.locator("#real-invert").click()
    assert "upload the image" in _toast(page, "upload the image")
    _fill(page, "real-edited", "a blue circle on the left")
    page.locator("#real-run").click()
    assert "Invert an image first" in _toast(page, "Invert an image first")
    assert page.locator("#real-gallery img").count() == 0


def test_consistent_subjects_tab(page):
    page.get_by_role("tab", name="Consistent subjects").click()
    _fill(page, "cs-subjects", "ball | a red circle in the centre")  # the word is missing
    page.locator("#cs-run").click()
    assert "name | portrait prompt | word" in _toast(page, "portrait prompt")
    _fill(page, "cs-subjects", "ball | a red circle in the centre | circle")
    _fill(page, "cs-scenes", "a red circle on the left")
    page.locator("#cs-run").click()
    page.wait_for_function("document.querySelectorAll('#cs-scenes-out img').length >= 1", timeout=RUN_TIMEOUT_MS)
    assert page.locator("#cs-references img").count() >= 1
    _screenshot(page, "app_consistent.png")


def test_speed_tab(page):
    page.get_by_role("tab", name="Speed").click()
    for name in ("agent", "window"):  # untick the defaults: nothing to compare
        page.locator("#speed-policies").get_by_label(name, exact=True).uncheck()
    page.locator("#speed-run").click()
    assert "tick at least one" in _toast(page, "tick at least one")
    page.locator("#speed-policies").get_by_label("window", exact=True).check()
    page.locator("#speed-run").click()
    page.wait_for_function("document.querySelectorAll('#speed-gallery img').length >= 2", timeout=RUN_TIMEOUT_MS)
    assert "window" in page.locator("#speed-info").inner_text()
    _screenshot(page, "app_speed.png")
