"""The demo page in real headless Chromium against a real server: key, draw, predict, see blocks."""

from __future__ import annotations

import base64
import math
from pathlib import Path

import httpx
import numpy as np
import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


def _missing_browser() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (it is in the `test` extra)"
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    if missing:
        return (f"{' and '.join(missing)} missing: apt-get install -y chromium chromium-driver "
                "(.ci/run installs them)")
    return None


if (_reason := _missing_browser()) is not None:
    pytest.skip(_reason, allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.chrome.service import Service as DriverService  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from tests.app.conftest import API_KEY  # noqa: E402


@pytest.fixture(scope="module")
def site(server) -> str:
    """The service tests' server (the digits model from the real trainer and exporter, behind
    an API key): its base URL."""
    return server.url


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.add_argument("--window-size=1280,1000")
    # The driver path is given, so Selenium Manager has nothing to find; offline makes sure it
    # never tries the network either.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SE_OFFLINE", "true")
        driver = webdriver.Chrome(service=DriverService(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _screenshot(driver, name: str) -> Path:
    """A full-page PNG under test-artifacts/ (the viewport alone would cut the blocks off)."""
    ARTIFACTS.mkdir(exist_ok=True)
    # Captured beyond the viewport the page lays out without its scroll bar, at innerWidth.
    width, height = driver.execute_script(
        "return [window.innerWidth, document.documentElement.scrollHeight]")
    clip = {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}
    shot = driver.execute_cdp_cmd("Page.captureScreenshot",
                                  {"format": "png", "captureBeyondViewport": True, "clip": clip})
    path = ARTIFACTS / name
    path.write_bytes(base64.b64decode(shot["data"]))
    return path


def _wait(driver, seconds: float = 20) -> WebDriverWait:
    return WebDriverWait(driver, seconds)


def _open_with_key(driver, url: str, wrong_key_first: bool = False) -> None:
    """Open the page in a fresh tab state: it must ask for the key, then load the model."""
    driver.get(url + "/")
    driver.execute_script("sessionStorage.clear()")
    driver.get(url + "/")
    key = _wait(driver).until(EC.visibility_of_element_located((By.ID, "api-key")))
    assert driver.switch_to.active_element == key  # focus moves to the question
    if wrong_key_first:
        key.send_keys("not-the-key", Keys.ENTER)
        _wait(driver).until(EC.text_to_be_present_in_element((By.ID, "error"), "not accepted"))
        key = _wait(driver).until(EC.visibility_of_element_located((By.ID, "api-key")))
    key.send_keys(API_KEY, Keys.ENTER)
    _wait(driver).until(EC.text_to_be_present_in_element((By.ID, "model-status"), "Ready"))
    assert not driver.find_element(By.ID, "key-panel").is_displayed()


def _predicted(driver, seq_before: int) -> dict:
    """Wait for the answer to a request sent after `seq_before` and read what the page shows."""
    try:
        _wait(driver).until(lambda d: d.execute_script(
            "const s = window.hffDemo.state; return s.seq > arguments[0] && s.shown === s.seq;",
            seq_before))
    except TimeoutException:
        pytest.fail(f"no prediction shown; the page says: {driver.find_element(By.ID, 'error').text!r}")
    exit_el = driver.find_element(By.ID, "pred-exit")
    return {
        "class_name": driver.find_element(By.ID, "pred-class").text,
        "exit_block": int(exit_el.get_attribute("data-exit-block")),
        "exit_text": exit_el.text,
        "charts": driver.find_elements(By.CSS_SELECTOR, "#blocks .block.ran .chart"),
        "skipped": driver.find_elements(By.CSS_SELECTOR, "#blocks .block.skipped"),
        "request": driver.execute_script("return window.hffDemo.state.lastRequest"),
    }


def _seq(driver) -> int:
    return driver.execute_script("return window.hffDemo.state.seq")


def _api_predict(url: str, body: dict) -> dict:
    r = httpx.post(f"{url}/predict", json=body, headers={"X-API-Key": API_KEY}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["predictions"][0]


def _stroke(driver, points: list[tuple[float, float]], steps: int = 6) -> None:
    """One pointer stroke through `points` (fractions of the canvas from its centre)."""
    canvas = driver.find_element(By.ID, "draw-canvas")
    w, h = canvas.size["width"], canvas.size["height"]
    path = [points[0]]
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        path += [(x0 + (x1 - x0) * s / steps, y0 + (y1 - y0) * s / steps) for s in range(1, steps + 1)]
    px = [(round(x * w), round(y * h)) for x, y in path]  # offsets from the centre, in CSS px
    chain = ActionChains(driver, duration=5)
    chain.move_to_element_with_offset(canvas, *px[0]).click_and_hold()
    for (x0, y0), (x1, y1) in zip(px, px[1:], strict=False):
        chain.move_by_offset(x1 - x0, y1 - y0)
    chain.release().perform()


def _touch_stroke(driver, points: list[tuple[float, float]]) -> float:
    """One finger stroke through `points` (fractions of the canvas from its centre); returns
    how far the page scrolled meanwhile."""
    driver.execute_script("document.getElementById('draw-canvas').scrollIntoView({block: 'center'})")
    r = driver.execute_script("return document.getElementById('draw-canvas').getBoundingClientRect()")
    cx, cy = r["left"] + r["width"] / 2, r["top"] + r["height"] / 2
    px = [{"x": cx + x * r["width"], "y": cy + y * r["height"]} for x, y in points]
    scrolled = driver.execute_script("return window.scrollY")
    driver.execute_cdp_cmd("Input.dispatchTouchEvent", {"type": "touchStart", "touchPoints": [px[0]]})
    for p in px[1:]:
        driver.execute_cdp_cmd("Input.dispatchTouchEvent", {"type": "touchMove", "touchPoints": [p]})
    driver.execute_cdp_cmd("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
    return driver.execute_script("return window.scrollY") - scrolled


def _zero_points() -> list[tuple[float, float]]:
    """An upright ellipse, clockwise from the top."""
    return [(0.25 * math.sin(2 * math.pi * i / 32), -0.38 * math.cos(2 * math.pi * i / 32))
            for i in range(33)]


def _draw_zero(driver) -> None:
    """An upright ellipse in one mouse stroke."""
    _stroke(driver, _zero_points(), steps=1)


def _draw_seven(driver) -> None:
    """Three strokes, the way many of the training 7s are written: top bar, stem, crossbar."""
    _stroke(driver, [(-0.22, -0.38), (0.22, -0.38)])
    _stroke(driver, [(0.22, -0.38), (0.02, 0.02), (-0.1, 0.38)])
    _stroke(driver, [(-0.15, 0.02), (0.2, 0.02)])


def _check_blocks(shown: dict, num_blocks: int) -> None:
    k = shown["exit_block"]
    assert 1 <= k <= num_blocks
    assert f"block {k} of {num_blocks}" in shown["exit_text"]
    assert len(shown["charts"]) == k  # one bar chart per block that ran ...
    assert len(shown["skipped"]) == num_blocks - k  # ... and the rest marked as not run
    for chart in shown["charts"]:
        assert len(chart.find_elements(By.CSS_SELECTOR, ".bar")) == 10


def test_draw_a_digit_predict_and_see_each_block(site, browser):
    _open_with_key(browser, site, wrong_key_first=True)
    assert not browser.find_element(By.ID, "error").is_displayed()
    meta = httpx.get(f"{site}/v1/models", headers={"X-API-Key": API_KEY}).json()["models"][0]
    assert browser.find_element(By.ID, "meta-name").text == meta["name"]
    assert browser.find_element(By.ID, "meta-blocks").text == str(meta["num_blocks"])
    num_blocks = meta["num_blocks"]

    browser.find_element(By.ID, "live-check").click()  # predict only when asked
    _draw_zero(browser)
    assert browser.find_elements(By.ID, "pred-class") == []  # nothing sent yet
    before = _seq(browser)
    browser.find_element(By.ID, "predict-btn").click()
    shown = _predicted(browser, before)

    sent = np.asarray(shown["request"]["instances"][0], dtype=np.float64)
    assert sent.shape == (1, 8, 8)
    assert sent.min() >= 0 and sent.max() <= 1
    assert shown["request"]["return_blocks"] is True and shown["request"]["early_exit"] == "auto"
    # A drawn ring: ink round the border of the frame, none in the middle.
    assert sent[0, 3:5, 3:5].max() < 0.2 and sent[0, :, 1].max() > 0.5
    assert shown["class_name"] == "0"
    _check_blocks(shown, num_blocks)
    # the operating point that answered ('auto', no latency target: the calibrated one)
    assert browser.find_element(By.ID, "pred-point").text.startswith("Operating point #0")
    assert browser.find_element(By.ID, "meta-point").text.startswith("#0 (calibrated)")
    # The page shows what the service answers for exactly the array the page sent.
    direct = _api_predict(site, shown["request"])
    assert (direct["class_name"], direct["exit_block"]) == (shown["class_name"], shown["exit_block"])
    assert len(direct["blocks"]) == shown["exit_block"]
    path = _screenshot(browser, "demo-page.png")
    assert path.stat().st_size > 10_000

    # Early exit off: every block runs and the last one answers.
    browser.find_element(By.CSS_SELECTOR, 'input[name="exit-mode"][value="off"]').click()
    shown = _predicted(browser, before + 1)
    assert shown["request"]["early_exit"] == "off"
    assert shown["exit_block"] == num_blocks
    _check_blocks(shown, num_blocks)

    # The lowest threshold the slider allows: every sample exits at block 1.
    browser.find_element(By.CSS_SELECTOR, 'input[name="exit-mode"][value="threshold"]').click()
    seq = _seq(browser)
    _predicted(browser, seq - 1)
    slider = browser.find_element(By.ID, "threshold-range")
    slider.send_keys(Keys.HOME)
    shown = _predicted(browser, seq)
    assert shown["request"]["early_exit"] == {"threshold": 0.01}
    assert shown["exit_block"] == 1
    _check_blocks(shown, num_blocks)

    # Clear, then a second digit drawn in three strokes, predicted after each stroke.
    browser.find_element(By.ID, "clear-btn").click()
    browser.find_element(By.CSS_SELECTOR, 'input[name="exit-mode"][value="auto"]').click()
    browser.find_element(By.ID, "live-check").click()
    seq = _seq(browser)
    _draw_seven(browser)
    shown = _predicted(browser, seq + 2)  # the earlier strokes' answers are superseded
    assert shown["class_name"] == "7"
    _check_blocks(shown, num_blocks)
    _screenshot(browser, "demo-page-seven.png")
    # The only console error allowed is the 401 that made the page ask for the key.
    errors = [e["message"] for e in browser.get_log("browser")
              if e["level"] == "SEVERE" and "401" not in e["message"]]
    assert errors == []


def test_upload_a_digit_image(site, browser, tmp_path):
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    meta = httpx.get(f"{site}/v1/models", headers={"X-API-Key": API_KEY}).json()["models"][0]
    # The first digits the served model gets right on its own (by the API, not the page).
    index = next(i for i in range(len(digits.target))
                 if _api_predict(site, {"instances": [(digits.images[i] / 16).tolist()]})["label"]
                 == digits.target[i] and digits.target[i] != 0)
    pixels = np.round(digits.images[index] / 16 * 255).astype(np.uint8)  # white ink on black
    png = tmp_path / "digit.png"
    Image.fromarray(pixels, mode="L").save(png)

    _open_with_key(browser, site)
    before = _seq(browser)
    browser.find_element(By.ID, "file-input").send_keys(str(png))
    shown = _predicted(browser, before)
    assert not browser.find_element(By.ID, "invert-check").is_selected()  # black border: no invert
    sent = np.asarray(shown["request"]["instances"][0])
    np.testing.assert_allclose(sent[0], pixels / 255, atol=1e-3)  # an 8x8 image reaches the model as is
    assert shown["class_name"] == meta["class_names"][digits.target[index]]
    _check_blocks(shown, meta["num_blocks"])
    assert "digit.png" in browser.find_element(By.ID, "source-note").text


def _area_reference(plane: np.ndarray, dst: tuple[int, int]) -> np.ndarray:
    """Exact area averaging: repeat every pixel dst times, then average blocks of src pixels."""
    (h0, w0), (h, w) = plane.shape, dst
    fine = plane.repeat(h, axis=0).repeat(w, axis=1)  # (h0*h, w0*w): same image, finer grid
    return fine.reshape(h, h0, w, w0).mean(axis=(1, 3))


@pytest.mark.parametrize(("src", "dst"), [((37, 23), (8, 8)), ((64, 64), (8, 8)), ((5, 9), (7, 4))])
def test_the_page_downsamples_by_exact_area_averaging(site, browser, src, dst):
    browser.get(site + "/")
    plane = np.random.default_rng(0).random(src, dtype=np.float32)  # (h0, w0)
    got = browser.execute_script(
        "return Array.from(window.hffDemo.areaResize(Float32Array.from(arguments[0]),"
        " arguments[1], arguments[2], arguments[3], arguments[4]))",
        plane.ravel().tolist(), *src, *dst)
    np.testing.assert_allclose(np.reshape(got, dst), _area_reference(plane, dst), atol=1e-5)


def test_an_upload_is_fitted_to_the_model_not_stretched(site, browser):
    """A wide photo is padded top and bottom (a tall one left and right) to the model's aspect
    ratio with its border colour, so a garment keeps its shape on the way to 28x28."""
    browser.get(site + "/")
    h, w = 2, 4
    rgb = np.full((3, h, w), 0.9, dtype=np.float32)  # a light background ...
    rgb[:, :, 1:3] = 0.2  # ... with a dark object in the middle columns
    got = browser.execute_script(
        "const r = window.hffDemo.letterbox(Float32Array.from(arguments[0]), arguments[1],"
        " arguments[2], arguments[3]); return [r.h, r.w, Array.from(r.rgb)]",
        rgb.ravel().tolist(), h, w, 1.0)
    assert got[:2] == [4, 4]
    planes = np.reshape(got[2], (3, 4, 4))
    border = rgb[0][[0, 0, 0, 0, 1, 1, 1, 1], [0, 1, 2, 3, 0, 1, 2, 3]].mean()  # every pixel is on it
    np.testing.assert_allclose(planes[:, 0], border, atol=1e-6)  # the padding: the border colour
    np.testing.assert_allclose(planes[:, 1:3], rgb, atol=1e-6)  # the photo, centred, unscaled
    tall = browser.execute_script(
        "const r = window.hffDemo.letterbox(new Float32Array(3 * 6 * 2), 6, 2, 1.0);"
        " return [r.h, r.w]")
    assert tall == [6, 6]


def test_phone_width_keyboard_and_labels(site, browser):
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                            {"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True})
    try:
        browser.execute_cdp_cmd("Emulation.setTouchEmulationEnabled",
                                {"enabled": True, "maxTouchPoints": 1})
        _open_with_key(browser, site)
        assert _touch_stroke(browser, _zero_points()) == 0  # a finger draws; the page stays put
        assert browser.execute_script("return window.hffDemo.state.strokes.length") == 1
        assert _predicted(browser, 0)["class_name"] == "0"
        scroll, inner = browser.execute_script(
            "return [document.documentElement.scrollWidth, window.innerWidth]")
        assert scroll <= inner, "the page scrolls sideways at phone width"
        unlabelled = browser.execute_script(
            "return [...document.querySelectorAll('input, button')]"
            ".filter(e => !(e.labels && e.labels.length) && !e.textContent.trim()"
            " && !e.getAttribute('aria-label')).map(e => e.id)")
        assert unlabelled == []
        _screenshot(browser, "demo-page-phone.png")
        focused = set()
        browser.execute_script("document.activeElement.blur()")
        for _ in range(20):
            ActionChains(browser).send_keys(Keys.TAB).perform()
            active = browser.switch_to.active_element
            focused.add(active.get_attribute("id") or active.get_attribute("value"))
        assert {"clear-btn", "file-input", "predict-btn", "fit-check", "live-check",
                "auto"} <= focused
    finally:
        browser.execute_cdp_cmd("Emulation.setTouchEmulationEnabled", {"enabled": False})
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def test_the_page_is_open_without_the_key_but_the_api_is_not(site):
    page = httpx.get(f"{site}/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert httpx.get(f"{site}/static/app.js").status_code == 200
    r = httpx.get(f"{site}/v1/models")
    assert r.status_code == 401 and "error" in r.json()
    paths = httpx.get(f"{site}/openapi.json").json()["paths"]
    assert "/" not in paths and "/predict" in paths


def test_the_model_selector_sends_to_the_model_chosen(digits_model_dir, browser, tmp_path):
    """A repository of two models: the page lists both and predicts with the one selected."""
    from selenium.webdriver.support.ui import Select

    from tests.app.conftest import ServerProcess, metric
    from tests.app.test_model_repository import LETTERS, add_version

    repo = tmp_path / "repo"
    for name, names in (("digits", None), ("letters", LETTERS)):
        (repo / name).mkdir(parents=True)
        add_version(digits_model_dir, repo, name, 1, names)
    srv = ServerProcess(None, tmp_path / "server.log", model_repository=repo, api_key=API_KEY,
                        threads=1)
    try:
        _open_with_key(browser, srv.url)
        picker = browser.find_element(By.ID, "model-picker")
        assert picker.is_displayed()
        select = Select(browser.find_element(By.ID, "model-select"))
        assert [o.text for o in select.options] == ["digits (version 1)", "letters (version 1)"]
        assert browser.find_element(By.ID, "meta-name").text == "digits"
        select.select_by_visible_text("letters (version 1)")
        assert browser.find_element(By.ID, "meta-name").text == "letters"
        browser.find_element(By.ID, "live-check").click()  # predict only when asked
        _draw_zero(browser)
        before = _seq(browser)
        browser.find_element(By.ID, "predict-btn").click()
        shown = _predicted(browser, before)
        assert shown["class_name"] == "a"  # letters' name for the label 0
        text = httpx.get(srv.url + "/metrics").text
        assert 'hff_requests_total{route="/v1/models/{name}:predict",status="200"}' in text
        assert metric(text, 'hff_batch_size_count{model="letters",version="1"}') >= 1
    finally:
        srv.stop()
    assert "Traceback" not in srv.log()
