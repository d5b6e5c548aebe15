"""The Gradio demo over the real Triton server with the shipped model: in headless Chromium,
through gradio_client, and its start/stop as `make demo` runs it.

The browser screenshot lands in work/test-output/ (MEDOE_TEST_OUTPUT overrides), which is
where the README's picture comes from.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest

from serving.demo import EXAMPLES
from serving.processes import descendants, free_ports

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = Path(os.environ.get("MEDOE_TEST_OUTPUT", ROOT / "work" / "test-output"))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
EXAMPLE = next(p for p in EXAMPLES if p.name == "street_bicycle.png")

pytestmark = pytest.mark.slow


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def demo():
    """`python -m serving.demo --start-triton model_repository`, as `make demo` runs it."""
    port = free_ports(1)[0]
    log = OUTPUT / "demo.log"
    OUTPUT.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "serving.demo", "--start-triton", str(ROOT / "model_repository"),
                                    "--port", str(port)], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    while "demo: http" not in log.read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"demo did not come up: {log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.3)
    children = descendants(process.pid)
    yield process, url
    if process.poll() is None:  # a test failed before the Ctrl-C test: stop it the same way
        process.send_signal(signal.SIGINT)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
    for pid in children:  # never leave a tritonserver behind, whatever happened above
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _image(url: str) -> np.ndarray:
    with urllib.request.urlopen(url, timeout=10) as response:
        image = cv2.imdecode(np.frombuffer(response.read(), np.uint8), cv2.IMREAD_COLOR)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("Chromium or chromedriver is not installed (.ci/run installs Debian's chromium and "
                    "chromium-driver with apt; that failed or was not run)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--window-size=1400,1900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def test_browser_upload_overlay_toggle_and_screenshot(demo, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    _, url = demo
    wait = WebDriverWait(browser, 60, poll_frequency=0.2)
    browser.get(url)
    wait.until(lambda d: "Connected to Triton" in d.find_element(By.ID, "status").text)
    legend = browser.find_element(By.ID, "legend").text
    assert "road" in legend and "bicycle" in legend  # from the model's metadata

    browser.find_element(By.CSS_SELECTOR, "#input-image input[type=file]").send_keys(str(EXAMPLE))
    wait.until(lambda d: "Segmented" in d.find_element(By.ID, "status").text)
    overlay_src = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#overlay img").get_attribute("src"))
    status = browser.find_element(By.ID, "status").text
    assert re.search(r"in \d+ ms", status), status

    original = cv2.cvtColor(cv2.imread(str(EXAMPLE)), cv2.COLOR_BGR2RGB)
    overlay = _image(overlay_src)
    assert overlay.shape == original.shape  # the image's own size, 512x256
    assert overlay.std() > 10  # not blank
    tinted = np.abs(overlay.astype(int) - original).mean()
    assert tinted > 5  # the class colours are blended in
    experts = _image(browser.find_element(By.CSS_SELECTOR, "#experts img").get_attribute("src"))
    assert experts.shape == original.shape and len(np.unique(experts.reshape(-1, 3), axis=0)) > 10
    assert "head expert" in browser.find_element(By.ID, "experts-legend").text
    assert browser.find_element(By.CSS_SELECTOR, "#confidence img").get_attribute("src")

    # Untick "road": its pixels go back to the plain image, so the overlay moves towards it.
    road = next(label for label in browser.find_elements(By.CSS_SELECTOR, "#classes label") if label.text == "road")
    road.click()
    new_src = wait.until(lambda d: (s := d.find_element(By.CSS_SELECTOR, "#overlay img").get_attribute("src")) != overlay_src and s)
    toggled = _image(new_src)
    assert toggled.shape == original.shape
    assert np.abs(toggled.astype(int) - original).mean() < 0.8 * tinted

    time.sleep(1)  # let the plots finish drawing before the picture
    OUTPUT.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(OUTPUT / "demo.png"))
    assert (OUTPUT / "demo.png").stat().st_size > 10_000


def test_gradio_client_api(demo):
    from gradio_client import Client, handle_file

    _, url = demo
    client = Client(url, verbose=False)
    assert "/segment" in client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    overlay, annotated, share, confidence, experts, experts_legend, status, classes = client.predict(
        handle_file(str(EXAMPLE)), 0.5, [], api_name="/segment")
    assert status.startswith("Segmented **street_bicycle.png** (512x256)")
    assert cv2.imread(overlay).shape == (256, 512, 3) and cv2.imread(experts).shape == (256, 512, 3)
    assert cv2.imread(confidence).shape == (256, 512, 3)
    assert annotated["color_map"]["road"] == "#804080"  # Cityscapes road, from the model's palette
    names = [choice[0] for choice in classes["choices"]]
    assert names[0] == "road" and len(names) == 14
    assert "head expert" in experts_legend and "tail expert" in experts_legend


def test_refused_image_shows_the_servers_message(demo, tmp_path):
    from gradio_client import Client, handle_file

    _, url = demo
    tiff = tmp_path / "grey.tif"
    cv2.imwrite(str(tiff), np.full((40, 60), 128, np.uint8))
    outputs = Client(url, verbose=False).predict(handle_file(str(tiff)), 0.5, [], api_name="/segment")
    status = outputs[6]
    assert status.startswith("**Refused by the server:**")
    assert "TIFF images are not accepted: send JPEG, PNG, BMP or WebP" in status, status
    assert outputs[0] is None  # no stale overlay left from an earlier image


def test_upload_over_the_limit_is_refused(demo, tmp_path):
    import httpx

    _, url = demo
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(11 * 1024 * 1024))
    with open(big, "rb") as handle:
        response = httpx.post(f"{url}gradio_api/upload", files={"files": ("big.png", handle, "image/png")}, timeout=30)
    assert response.status_code == 413, response.text[:200]


def test_a_bad_upload_limit_is_one_line_and_exit_2():
    result = subprocess.run([sys.executable, "-m", "serving.demo", "--max-upload", "ten megs"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: argument --max-upload: 'ten megs': expected a size such as 10mb, 500kb or 1gb (see demo.py --help)"]


def test_unreachable_triton_is_a_message_in_the_page():
    from serving import demo as app

    previous = dict(app.settings)
    app.settings.update(url=f"127.0.0.1:{free_ports(1)[0]}", protocol="http")  # nothing listens there
    try:
        outputs = app.segment(str(EXAMPLE), 0.5, [])
        legend, _, load_status = app.load_metadata()
    finally:
        app.settings.update(previous)
    assert outputs[7].startswith("**Triton is unreachable**") and "cannot reach" in outputs[7]
    assert outputs[1] is None and legend == ""
    assert load_status.startswith("**Triton is unreachable**")


def test_ctrl_c_stops_the_demo_and_triton(demo):
    """Last in this file: it ends the shared demo process."""
    process, url = demo
    children = descendants(process.pid)
    assert any("tritonserver" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace") for pid in children)
    process.send_signal(signal.SIGINT)
    assert process.wait(60) == 0
    assert not [pid for pid in children if _alive(pid)]
    with pytest.raises(OSError):
        urllib.request.urlopen(url, timeout=2)
