"""``deepfeat serve`` in a real browser: uvicorn on a free localhost port, Debian's headless Chromium driven
by Selenium through Debian's chromedriver. Upload and pick queries, wait for the grid, check the DOM and a
screenshot (size, not blank, real thumbnails), the error shown for a bad upload, and the side-by-side
comparison.

Screenshots go to ``tmp_path``, and also to ``$DEEPFEAT_SCREENSHOT_DIR`` when it is set.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from support.serve import MEMORY_ID, TRICKY_LABEL, ServeData

from deepfeat.recipes.serve import create_app

pytest.importorskip("selenium", reason="needs selenium (pip install selenium) to drive Chromium")
pytest.importorskip("uvicorn", reason='needs the serve extra: pip install "deepfeat[serve]"')

from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import Select, WebDriverWait

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WINDOW = (1440, 1000)

pytestmark = pytest.mark.skipif(
    not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()),
    reason="needs Debian's Chromium and its driver: apt-get install chromium chromium-driver",
)


@contextmanager
def live_server(app: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a thread on a free loopback port; yields the base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))  # bound before uvicorn starts: no race for the port
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start within 30 s")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    """Headless Chromium with a fresh profile, offline, no background traffic."""
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    # the viewport itself (--window-size includes the window's frame in headless mode)
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": WINDOW[0], "height": WINDOW[1], "deviceScaleFactor": 1, "mobile": False},
    )
    try:
        yield driver
    finally:
        driver.quit()


def wait(driver: WebDriver, condition: Any, timeout: float = 60) -> Any:
    # the page redraws the grid on every search: an element found a moment ago may be gone
    ignored = (StaleElementReferenceException,)
    return WebDriverWait(driver, timeout, poll_frequency=0.1, ignored_exceptions=ignored).until(condition)


def hits_of(panel: WebElement) -> list[WebElement]:
    return panel.find_elements(By.CSS_SELECTOR, ".hit")


def open_page(driver: WebDriver, url: str) -> None:
    driver.get(url)
    wait(driver, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")
    wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#examples .example")) == 8)


def all_images_loaded(driver: WebDriver) -> bool:
    return bool(
        driver.execute_script(
            "return [...document.querySelectorAll('#panels img, #examples img')]"
            ".every(i => i.complete && i.naturalWidth > 0);"
        )
    )


def check_screenshot(driver: WebDriver, path: Path, grid: WebElement) -> Image.Image:
    """Save a screenshot and check it is the page, drawn: window-sized, varied, with real thumbnails."""
    png = driver.get_screenshot_as_png()
    path.write_bytes(png)
    if os.environ.get("DEEPFEAT_SCREENSHOT_DIR"):
        out = Path(os.environ["DEEPFEAT_SCREENSHOT_DIR"])
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, out / path.name)
    image = Image.open(io.BytesIO(png)).convert("RGB")
    assert image.size == WINDOW
    pixels = np.asarray(image, dtype=np.float64)
    assert pixels.std() > 20, "the screenshot is (nearly) blank"
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 500, "the screenshot has too few colours to be the page"
    # the first hit's thumbnail: the stripes of a class image, not an empty box
    thumb = grid.find_element(By.CSS_SELECTOR, ".hit .thumb")
    r = thumb.rect
    box = pixels[int(r["y"]) + 4 : int(r["y"] + r["height"]) - 4, int(r["x"]) + 4 : int(r["x"] + r["width"]) - 4]
    assert box.size and box.std() > 30, "the first hit's thumbnail is not drawn"
    return image


def test_upload_shows_the_grid_group_by_and_a_bad_upload_message(
    browser: WebDriver, serve_data: ServeData, tmp_path: Path
) -> None:
    app = create_app([serve_data.base("off-the-shelf")])
    with live_server(app) as url:
        open_page(browser, url)
        query = serve_data.file_of("class_01/img_02.png")
        browser.find_element(By.ID, "file").send_keys(str(query))
        wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".panel .hit")) == 12)
        wait(browser, all_images_loaded)
        panels = browser.find_elements(By.CSS_SELECTOR, ".panel")
        assert len(panels) == 1
        hits = hits_of(panels[0])
        assert hits[0].get_attribute("data-record-id") == "class_01/img_02.png"
        scores = [float(h.find_element(By.CSS_SELECTOR, ".score").text) for h in hits]
        assert scores[0] == pytest.approx(1.0, abs=1e-4) and scores == sorted(scores, reverse=True)
        assert [h.get_attribute("data-rank") for h in hits] == [str(i) for i in range(1, 13)]
        assert browser.find_element(By.ID, "query-name").text == "img_02.png"
        assert not browser.find_element(By.ID, "error").is_displayed()
        check_screenshot(browser, tmp_path / "serve_single.png", panels[0])

        # group by label: one hit per class, each label drawn as text (the tricky one is not markup)
        Select(browser.find_element(By.ID, "group-by")).select_by_value("label")
        wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".panel .hit")) == 4)
        labels = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".panel .hit .hit-label")]
        assert sorted(labels) == sorted(["class_00", "class_01", "class_02", TRICKY_LABEL])
        assert not browser.find_elements(By.CSS_SELECTOR, ".hit-label b")

        # a text file instead of an image: the server's message, in the page
        bad = tmp_path / "notes.txt"
        bad.write_text("not an image")
        browser.find_element(By.ID, "file").send_keys(str(bad))
        wait(browser, lambda d: d.find_element(By.ID, "error").is_displayed())
        message = browser.find_element(By.ID, "error-text").text
        assert message.startswith("cannot read image 'notes.txt': not an image") and "Upload a JPEG, PNG" in message
        png = browser.get_screenshot_as_png()
        (tmp_path / "serve_bad_upload.png").write_bytes(png)
        if os.environ.get("DEEPFEAT_SCREENSHOT_DIR"):
            shutil.copy(tmp_path / "serve_bad_upload.png", Path(os.environ["DEEPFEAT_SCREENSHOT_DIR"]))


def test_compare_side_by_side_with_a_picked_example_and_a_filter(
    browser: WebDriver, serve_data: ServeData, tmp_path: Path
) -> None:
    app = create_app([serve_data.base("off-the-shelf"), serve_data.tuned("fine-tuned")])
    with live_server(app) as url:
        open_page(browser, url)
        # the in-memory record is not in the "tuned" collection: that panel would show an error instead
        example = next(
            e
            for e in browser.find_elements(By.CSS_SELECTOR, "#examples .example")
            if e.get_attribute("data-record-id") != MEMORY_ID
        )
        picked = example.get_attribute("data-record-id")
        example.click()
        wait(browser, lambda d: [len(hits_of(p)) for p in d.find_elements(By.CSS_SELECTOR, ".panel")] == [12, 12])
        wait(browser, all_images_loaded)
        left, right = browser.find_elements(By.CSS_SELECTOR, ".panel")
        assert left.find_element(By.TAG_NAME, "h2").text == "off-the-shelf"
        assert right.find_element(By.TAG_NAME, "h2").text == "fine-tuned"
        assert left.rect["y"] == right.rect["y"] and right.rect["x"] >= left.rect["x"] + left.rect["width"]
        for panel in (left, right):
            ids = [h.get_attribute("data-record-id") for h in hits_of(panel)]
            assert picked not in ids  # a picked record is left out of its own hits by default
        # hits that share the query's label are framed green, the others red
        assert len(browser.find_elements(By.CSS_SELECTOR, ".hit.match, .hit.miss")) == 24
        check_screenshot(browser, tmp_path / "serve_compare.png", left)

        # a filter applies to both panels
        browser.find_element(By.ID, "add-filter").click()
        row = browser.find_element(By.CSS_SELECTOR, "#filters .filter")
        Select(row.find_element(By.CSS_SELECTOR, ".f-field")).select_by_value("label")
        row.find_element(By.CSS_SELECTOR, ".f-value").send_keys("class_02")
        wait(
            browser,
            lambda d: {e.text for e in d.find_elements(By.CSS_SELECTOR, ".panel .hit .hit-label")} == {"class_02"},
        )
        assert len(browser.find_elements(By.CSS_SELECTOR, ".panel .expr")) == 2
