"""The playground page driven by a real headless chromium (Debian's, with its chromedriver; see
scripts/ensure-browser.sh): submit, queue position, progress, the image, cancel, the curl line."""

import shutil
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.select import Select
from selenium.webdriver.support.wait import WebDriverWait

from tests.support import Stack, wait_for_job, wait_until

# Long enough on any CPU that the job is still running when the page's job is canceled behind it.
BLOCKER = {
    "prompt": "keeps the worker busy",
    "width": 1024,
    "height": 1024,
    "num_inference_steps": 150,
}
WAIT_S = 120


def _browser_binary() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    raise RuntimeError("no chromium: run scripts/ensure-browser.sh (make test does)")


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = _browser_binary()
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(argument)
    options.add_argument("--window-size=1280,900")
    driver_path = shutil.which("chromedriver")
    if driver_path is None:
        raise RuntimeError("no chromedriver: run scripts/ensure-browser.sh (make test does)")
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    yield driver
    driver.quit()


def text(browser: WebDriver, element_id: str) -> str:
    return browser.find_element(By.ID, element_id).text


def wait_for_text(browser: WebDriver, element_id: str, wanted: str) -> None:
    WebDriverWait(browser, WAIT_S).until(
        lambda _: wanted in text(browser, element_id),
        f"#{element_id} to show {wanted!r}",
    )


def fill(browser: WebDriver, element_id: str, value: str) -> None:
    field = browser.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(value)


def current_job(browser: WebDriver) -> str:
    return browser.execute_script("return currentJob;")


def test_the_playground_submits_shows_progress_and_the_image_and_cancels(
    customization_stack: Stack, browser: WebDriver
) -> None:
    browser.get(f"{customization_stack.base_url}/")
    assert browser.current_url.endswith("/playground")
    fill(browser, "api-key", customization_stack.api_key)
    # The key field's change event loads the models, adapters and control types.
    browser.find_element(By.ID, "prompt").click()
    WebDriverWait(browser, WAIT_S).until(
        lambda _: len(Select(browser.find_element(By.ID, "lora")).options) == 3, "the adapters"
    )
    assert "euler_a" in [o.text for o in Select(browser.find_element(By.ID, "scheduler")).options]
    control_types = Select(browser.find_element(By.ID, "control-type")).options
    assert [option.text for option in control_types] == ["none", "canny"]
    # The size inputs follow the default model's family (SD 1.5): its default and bounds.
    width = browser.find_element(By.ID, "width")
    sizes = [width.get_attribute(name) for name in ("value", "min", "max", "step")]
    assert sizes == ["512", "256", "1024", "8"]
    fill(browser, "prompt", "a red kite over the sea")
    fill(browser, "width", "256")
    fill(browser, "height", "256")
    fill(browser, "steps", "4")
    fill(browser, "seed", "77")
    Select(browser.find_element(By.ID, "lora")).select_by_visible_text("tiny-style")

    with customization_stack.client() as client:
        # Behind a long job of another size, the page's job waits in the queue.
        blocker = client.post("/v1/jobs", json=BLOCKER).raise_for_status().json()
        wait_until(
            lambda: client.get(f"/v1/jobs/{blocker['id']}").json()["status"] == "running",
            WAIT_S,
            "the blocking job to run",
        )
        browser.find_element(By.ID, "submit").click()
        wait_for_text(browser, "queue-position", "queue position")
        assert text(browser, "status") == "queued"
        browser.find_element(By.ID, "cancel").click()
        wait_for_text(browser, "status", "canceled")
        canceled = client.get(f"/v1/jobs/{current_job(browser)}").json()
        assert canceled["status"] == "canceled"
        client.post(f"/v1/jobs/{blocker['id']}/cancel").raise_for_status()
        assert wait_for_job(client, blocker["id"])["status"] == "canceled"

        browser.find_element(By.ID, "submit").click()
        wait_for_text(browser, "status", "succeeded")
        job = client.get(f"/v1/jobs/{current_job(browser)}").json()

    assert job["request"]["loras"] == [{"name": "tiny-style", "scale": 1.0}]
    assert job["request"]["seed"] == 77
    progress = browser.find_element(By.ID, "progress")
    assert progress.get_attribute("value") == progress.get_attribute("max") == "4"
    assert text(browser, "progress-text").startswith("step 4 of 4")
    image = browser.find_element(By.CSS_SELECTOR, "#images img")
    WebDriverWait(browser, WAIT_S).until(
        lambda _: browser.execute_script("return arguments[0].naturalWidth;", image) == 256,
        "the image to load",
    )
    # Each read of a job signs its URLs afresh: the same image, not the same signature.
    assert urlsplit(image.get_attribute("src")).path == urlsplit(job["images"][0]["url"]).path
    assert httpx.get(image.get_attribute("src"), timeout=10).status_code == 200
    curl = text(browser, "curl")
    assert curl.startswith(f"curl -sS -X POST '{customization_stack.base_url}/v1/jobs'")
    assert '"prompt":"a red kite over the sea"' in curl and '"name":"tiny-style"' in curl
    assert text(browser, "error") == ""


def test_the_playground_shows_the_image_sharpening_as_it_renders(
    customization_stack: Stack, browser: WebDriver
) -> None:
    browser.get(f"{customization_stack.base_url}/playground")
    fill(browser, "api-key", customization_stack.api_key)
    fill(browser, "prompt", "a lighthouse at dusk")
    fill(browser, "width", "512")
    fill(browser, "height", "512")
    fill(browser, "steps", "12")
    fill(browser, "preview-every", "2")
    # Every preview the page shows, as it shows it.
    browser.execute_script(
        """
        window.previewsShown = [];
        const preview = document.getElementById("preview");
        new MutationObserver(() => {
          if (preview.src) window.previewsShown.push([Number(preview.dataset.step), preview.src]);
        }).observe(preview, { attributes: true, attributeFilter: ["src"] });
        """
    )
    browser.find_element(By.ID, "submit").click()
    wait_for_text(browser, "status", "succeeded")
    shown = browser.execute_script("return window.previewsShown;")
    steps = [step for step, _ in shown]
    assert len(shown) >= 2 and steps == sorted(steps) and set(steps) <= {2, 4, 6, 8, 10, 12}
    assert len({source for _, source in shown}) == len(shown), "each preview is a new image"
    assert all(source.startswith("data:image/webp;base64,") for _, source in shown)
    # Once the job has succeeded, the images replace the preview.
    assert not browser.find_element(By.ID, "preview").is_displayed()
    assert browser.find_element(By.CSS_SELECTOR, "#images img")
