"""GET /docs through the real Envoy, in Debian's headless Chromium driven by selenium: Swagger
UI renders every route of /openapi.json, and a "Try it out" call to POST /v1/embeddings gets a
200 that the page shows."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.wait import WebDriverWait

from tests.e2e.conftest import Gateway

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# Nothing but the page's own requests: no updates, sync, field trials or QUIC probes.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-quic",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,2000",
)
# Loading a 1.7 MB script and rendering on a busy 2-core machine; a call to a tiny model.
WAIT_S = 60
OPERATION = "#operations-OpenAIService-OpenAIService_CreateEmbeddings"


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[webdriver.Chrome]:
    """Headless Chromium with a fresh profile. A machine without it fails here rather than
    skipping: CI installs it (.ci/run)."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} not found: install Debian's chromium and chromium-driver "
            "(`apt-get update && apt-get install -y chromium chromium-driver`; .ci/run does)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    # Both paths given: selenium's driver manager, which would download a browser, never runs.
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()


def _visible(browser: webdriver.Chrome, selector: str) -> WebElement:
    element: WebElement = WebDriverWait(browser, WAIT_S).until(
        expected_conditions.visibility_of_element_located((By.CSS_SELECTOR, selector))
    )
    return element


def _click(browser: webdriver.Chrome, selector: str) -> None:
    WebDriverWait(browser, WAIT_S).until(expected_conditions.element_to_be_clickable((By.CSS_SELECTOR, selector)))
    browser.find_element(By.CSS_SELECTOR, selector).click()


def test_docs_page_renders_every_route_from_this_envoy_alone(gateway: Gateway, browser: webdriver.Chrome) -> None:
    with urllib.request.urlopen(gateway.base_url + "/openapi.json", timeout=30) as response:
        paths = set(json.load(response)["paths"])
    browser.get(gateway.base_url + "/docs")
    _visible(browser, OPERATION)
    shown = {e.get_attribute("data-path") for e in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")}
    assert shown == paths
    assert "/v1/embeddings" in browser.find_element(By.CSS_SELECTOR, OPERATION).text
    # Swagger UI and the document came from this Envoy: no CDN, no validator badge.
    loaded = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert loaded and all(url.startswith(gateway.base_url + "/") for url in loaded), loaded


def test_try_it_out_on_embeddings_gets_a_200_shown_in_the_page(gateway: Gateway, browser: webdriver.Chrome) -> None:
    browser.get(gateway.base_url + "/docs")
    _click(browser, f"{OPERATION} .opblock-summary-control")
    _click(browser, f"{OPERATION} .try-out__btn")
    body = _visible(browser, f"{OPERATION} textarea.body-param__text")
    # Select all, then type: the first key replaces Swagger UI's example body.
    body.send_keys(Keys.CONTROL, "a")
    body.send_keys(json.dumps({"input": ["hello from the docs page"]}))
    _click(browser, f"{OPERATION} .execute")
    response = f"{OPERATION} .live-responses-table tbody tr.response"
    status = _visible(browser, f"{response} .response-col_status")
    answer = browser.find_element(By.CSS_SELECTOR, f"{response} .response-col_description")
    assert status.text.strip() == "200", answer.text
    assert '"embedding"' in answer.text
    assert "sentence-transformers/all-MiniLM-L6-v2" in answer.text
