"""The web demo in a real browser: Debian's Chromium, driven by Selenium, uploads a real photo to the real app."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.conftest import GROCERY, ROOT

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
SCREENSHOT = ROOT / "var" / "web-demo.png"
PAGE_TIMEOUT = 90.0

pytestmark = pytest.mark.skipif(not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()),
                                reason=f"{CHROMIUM} or {CHROMEDRIVER} is missing (make setup installs Debian's "
                                       "chromium and chromium-driver)")
pytest.importorskip("selenium", reason="selenium is not installed (it is in the dev extra)")
pytest.importorskip("streamlit", reason="the web extra is not installed (pip install 'lookalike[web]')")

from selenium import webdriver  # noqa: E402 - only once selenium is known to be there
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from lookalike.client.embedder_client import EmbedderClient  # noqa: E402
from lookalike.tools.web import running_web_app  # noqa: E402
from tests.test_web_app import catalogue_photos, indexed_searcher, query_photo  # noqa: E402


@pytest.fixture(scope="module")
def app_url(embedder, grocery_train: list, grocery_val: list,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The real app (`streamlit run` in a child process, as `lookalike web` starts it) over real servers."""
    started_embedder, _ = embedder
    embedder_address = f"127.0.0.1:{started_embedder.port}"
    with indexed_searcher(embedder_address, tmp_path_factory.mktemp("browser-searcher"),
                          catalogue_photos(grocery_train)) as searcher_address, \
            running_web_app(embedder_address, searcher_address, samples=[grocery_val[-1].path],
                            image_roots=[GROCERY]) as (_, url):
        yield url


@pytest.fixture()
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    # Headless and quiet: no sandbox (CI runs as root), no GPU, nothing fetched from the network on its own.
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--disable-background-networking", "--disable-component-update", "--no-first-run",
                     "--disable-sync", "--no-proxy-server", f"--user-data-dir={tmp_path / 'chromium-profile'}",
                     "--window-size=1500,2500"):
        options.add_argument(argument)
    # The driver Debian ships beside the browser: selenium never downloads one.
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _result_images_loaded(driver: webdriver.Chrome, count: int) -> bool:
    images = driver.find_elements(By.CSS_SELECTOR, ".st-key-results img")
    return len(images) == count and all(
        driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", image)
        for image in images)


def test_uploading_a_photo_shows_its_lookalikes(app_url: str, browser: webdriver.Chrome, embedder,
                                                grocery_val: list) -> None:
    started_embedder, _ = embedder
    photo, predicted = query_photo(f"127.0.0.1:{started_embedder.port}", grocery_val)
    with EmbedderClient(f"127.0.0.1:{started_embedder.port}") as client:
        probability = client.embed([photo.path], top_categories=1)[0].categories[0][1]
    browser.get(app_url)
    wait = WebDriverWait(browser, PAGE_TIMEOUT)
    # The file picker's input (drag and drop lands on the same input).
    picker = wait.until(lambda driver: driver.find_element(By.CSS_SELECTOR, "[data-testid='stFileUploader'] "
                                                                            "input[type='file']"))
    picker.send_keys(str(photo.path.resolve()))
    wait.until(lambda driver: f"Query: uploaded {photo.path.name}" in driver.find_element(By.TAG_NAME, "body").text)
    wait.until(lambda driver: _result_images_loaded(driver, 10))
    page = browser.find_element(By.TAG_NAME, "body").text
    assert f"Predicted category: {predicted} ({probability:.2f})" in page
    assert "Probed shards (adaptive," in page and "Routing modes compared" in page
    time.sleep(1.0)  # the bar chart draws itself after the data arrives
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(SCREENSHOT)) and SCREENSHOT.stat().st_size > 10_000


def test_catalogue_text_cannot_put_markup_on_the_page(embedder, grocery_val: list, browser: webdriver.Chrome,
                                                      tmp_path: Path) -> None:
    """A catalogue writer may put any text but NUL in ids and attributes. A line break ended the code span the
    page shows it in: a line starting with # became a heading, and links and remote images became live (every
    visitor's browser fetched the writer's image)."""
    from lookalike.client.facade import Lookalike
    from tests.conftest import start_searcher

    started_embedder, _ = embedder
    embedder_address = f"127.0.0.1:{started_embedder.port}"
    photo = grocery_val[0]
    evil = "evil\n# HEADING FROM ID\n[click me](https://evil.example/login) ![img](http://127.0.0.1:9/track.png)"
    searcher, channel = start_searcher(tmp_path / "searcher", snapshot_interval=0)
    try:
        searcher_address = f"127.0.0.1:{searcher.port}"
        with Lookalike(embedder_address, searcher_address) as lookalike:
            stored = lookalike.index([photo.path], [evil], [photo.category],
                                     [{"path": str(photo.path), "note": "x\n\n[phish](https://evil.example/phish)"}])
            assert stored.indexed == [evil]
        with running_web_app(embedder_address, searcher_address, samples=[photo.path],
                             image_roots=[GROCERY]) as (_, url):
            browser.get(url)
            WebDriverWait(browser, PAGE_TIMEOUT).until(
                lambda driver: "Routing modes compared" in driver.find_element(By.TAG_NAME, "body").text)
            time.sleep(1.0)
            shown = browser.find_element(By.TAG_NAME, "body").text
            assert "HEADING FROM ID" in shown and "[click me](https://evil.example/login)" in shown
            assert not browser.find_elements(By.CSS_SELECTOR, ".st-key-results h1, .st-key-compare h1")
            links = [a.get_attribute("href") or "" for a in browser.find_elements(By.TAG_NAME, "a")]
            assert not [href for href in links if "evil.example" in href], links
            sources = [image.get_attribute("src") or "" for image in browser.find_elements(By.TAG_NAME, "img")]
            assert not [src for src in sources if "127.0.0.1:9/" in src], sources
    finally:
        channel.close()
        searcher.stop(None)
