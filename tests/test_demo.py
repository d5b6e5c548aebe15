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
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "serving.demo",
                "--start-triton",
                str(ROOT / "model_repository"),
                "--port",
                str(port),
            ],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
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
        pytest.skip(
            "Chromium or chromedriver is not installed (.ci/run installs Debian's chromium and "
            "chromium-driver with apt; that failed or was not run)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--window-size=1400,1900",
    ):
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
    new_src = wait.until(
        lambda d: (s := d.find_element(By.CSS_SELECTOR, "#overlay img").get_attribute("src")) != overlay_src and s
    )
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
        handle_file(str(EXAMPLE)), 0.5, [], api_name="/segment"
    )
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
    result = subprocess.run(
        [sys.executable, "-m", "serving.demo", "--max-upload", "ten megs"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: argument --max-upload: 'ten megs': expected a size such as 10mb, 500kb or 1gb (see demo.py --help)"
    ]


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


# A K=4 MEDOE whose experts' split (0.6, 0.8, 0.95) is not the report's head/body/tail split at
# (0.80, 0.95): expert 1 owns part of the head, expert 2 the rest of it, experts 3 and 4 exactly
# the report's body and tail. Naming expert k after group k would call these head, body, tail, 4.
K4_NAMES = ["road", "building", "sky", "car", "person", "pole", "sign", "bicycle"]
K4_PIXELS = [300, 200, 150, 100, 100, 60, 50, 40]  # report: head {road..person}, body {pole, sign}, tail {bicycle}
K4_THRESHOLDS = [0.6, 0.8, 0.95]  # experts: {road, building, sky}, {car, person}, {pole, sign}, {bicycle}


def k4_checkpoint(directory: Path) -> Path:
    """A small random-weight K=4 MEDOE (as tests/test_export.py's make_checkpoint builds K=3)."""
    import torch

    from medoe.checkpoint import save_checkpoint
    from medoe.class_stats import ClassStats
    from medoe.config import ModelConfig
    from medoe.model import build_model
    from tests.data_fixtures import he_init

    config = ModelConfig(
        model="medoe",
        backbone="tiny",
        context="aspp",
        num_classes=8,
        num_experts=4,
        group_thresholds=K4_THRESHOLDS,
        decoder_channels=8,
        decision_hidden=8,
        class_names=K4_NAMES,
        palette=[[i * 30, 255 - i * 30, 90] for i in range(8)],
    )
    torch.manual_seed(0)
    model = build_model(config).eval()
    he_init(model)  # every expert gets a visible share of the weight
    stats = ClassStats(K4_NAMES, K4_PIXELS, [5] * 8, 5)
    model.set_groups(stats.groups(K4_THRESHOLDS))
    return save_checkpoint(directory, model, stats)


@pytest.fixture(scope="module")
def k4_server(tmp_path_factory):
    """The shipped repository with the K=4 model as `medoe`, on the embedded Triton."""
    from serving.supervisor import start_server
    from tests.test_serving_server import exported_repository

    root = tmp_path_factory.mktemp("k4")
    checkpoint = k4_checkpoint(root / "checkpoint")
    repo = exported_repository(root, checkpoint, "--verify-sizes", "48x64", "--verify-batches", "1")
    handle = start_server(repo, *free_ports(3), timeout=90)
    yield handle
    handle.stop()


@pytest.fixture()
def k4_page(k4_server, monkeypatch):
    """serving.demo in this process against the K=4 server, counting decodes and what is requested."""
    import tritonclient.http

    from serving import demo as app
    from serving.client import files

    decodes, requests = [], []

    def counted(real):
        def decode_image(data, *args, **kwargs):
            decodes.append(len(data))
            return real(data, *args, **kwargs)

        return decode_image

    for module in (app, files):  # every place an upload could be decoded in the demo's process
        monkeypatch.setattr(module, "decode_image", counted(module.decode_image))
    infer = tritonclient.http.InferenceServerClient.async_infer

    def recorded(self, model_name, inputs, *args, outputs=None, **kwargs):
        requests.append((model_name, [o.name() for o in outputs or []]))
        return infer(self, model_name, inputs, *args, outputs=outputs, **kwargs)

    monkeypatch.setattr(tritonclient.http.InferenceServerClient, "async_infer", recorded)
    monkeypatch.setitem(app.settings, "url", k4_server.http_url)
    monkeypatch.setitem(app.settings, "protocol", "http")
    return app, decodes, requests


def test_a_k4_models_experts_are_named_from_what_they_own(k4_page, tmp_path):
    app, decodes, requests = k4_page
    legend, _, status = app.load_metadata()
    assert (
        "8 classes, 4 experts (expert 1: road, building, +1; expert 2: car, person; body expert; tail expert)" in status
    ), status
    assert "car <small>head · expert 2</small>" in legend and "road <small>head · expert 1</small>" in legend
    assert "pole <small>body</small>" in legend and "bicycle <small>tail</small>" in legend  # namesakes: no extra tag

    image = cv2.cvtColor(cv2.imread(str(EXAMPLE)), cv2.COLOR_BGR2RGB)[:96, :128]
    upload = tmp_path / "scene.png"
    cv2.imwrite(str(upload), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    outputs = app.segment(str(upload), 0.5, [])
    state, overlay, experts, summary, status = outputs[0], outputs[1], outputs[5], outputs[6], outputs[7]
    assert status.startswith("Segmented **scene.png** (128x96)"), status
    rows = re.findall(r"<li>.*?</li>", summary)
    assert len(rows) == 4
    for row, (name, classes) in zip(
        rows,
        [
            ("expert 1", "road, building, sky"),
            ("expert 2", "car, person"),
            ("body expert", "pole, sign"),
            ("tail expert", "bicycle"),
        ],
        strict=True,
    ):
        assert f"<b>{name}</b>" in row and row.endswith(f"decides {classes}</li>"), row
    assert "head expert" not in summary
    assert experts.shape == (96, 128, 3) and overlay.shape == (96, 128, 3)
    np.testing.assert_array_equal(state["image"], image)

    # One decode for the upload, here; the model gets the pixels and is asked only for what the page draws.
    assert len(decodes) == 1
    assert requests == [("medoe", ["labels", "confidence", "expert_weights"])]


def test_an_upload_the_page_cannot_decode_is_judged_by_the_server(k4_page, tmp_path):
    app, decodes, requests = k4_page
    tiff = tmp_path / "grey.tif"
    cv2.imwrite(str(tiff), np.full((40, 60), 128, np.uint8))
    outputs = app.segment(str(tiff), 0.5, [])
    status = outputs[7]
    assert status.startswith("**Refused by the server:** grey.tif: ") and "TIFF images are not accepted" in status
    assert outputs[0] is None and outputs[1] is None
    assert len(decodes) == 1  # the attempt here; the server decoded nothing either (refused from the header)
    assert requests == [("segment", ["class_share"])]


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
