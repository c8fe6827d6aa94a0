"""The page at ``/`` in a real browser, and ``dsdkit serve --model demo`` itself: it starts in seconds without Ray,
serves the PyTorch engine (so the page shows heat maps), and stops on Ctrl-C.

The browser is Debian's ``chromium`` driven through Debian's ``chromedriver``, both given by path (nothing is
downloaded at test time; ``.ci/run`` installs them). Without them the browser test is skipped, unless ``CI`` is set:
then a missing browser fails it.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "examples" / "demo"
DEMO_CAPTIONS = [line for line in (DEMO / "captions.txt").read_text("utf-8").splitlines() if line.strip()]
DSDKIT = Path(sys.executable).parent / "dsdkit"
CHROMIUM = Path(os.environ.get("DSDKIT_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("DSDKIT_CHROMEDRIVER", "/usr/bin/chromedriver"))
#: Chromium's switches for a test: no sandbox (CI runs as root), and nothing that talks to the network by itself.
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)


def start_browser(profile: Path, width: int = 1100, height: int = 1400):
    """A headless Chromium under selenium (the binary and its driver by path), or a skip (a failure under ``CI``)
    naming what is missing."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("selenium (the dev extra)")
    if missing:
        message = f"the browser test needs {', '.join(missing)}: apt-get install chromium chromium-driver"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    options = Options()
    options.binary_location = str(CHROMIUM)
    for arg in CHROMIUM_ARGS:
        options.add_argument(arg)
    options.add_argument(f"--user-data-dir={profile}")
    options.add_argument(f"--window-size={width},{height}")
    return webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    """`dsdkit serve --model demo --port 0`: (process, URL, ready line, seconds to it)."""
    folder = tmp_path_factory.mktemp("serve-demo")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [DSDKIT, "serve", "--model", "demo", "--port", "0", "--threads", "1"]
    started = time.monotonic()
    stderr = (folder / "stderr.txt").open("w")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(process.stdout.readline, "")), daemon=True).start()
    while not any("ready at" in line for line in lines):
        if process.poll() is not None or time.monotonic() - started > 300:
            process.kill()
            pytest.fail(f"no ready line: {lines} {(folder / 'stderr.txt').read_text()[-3000:]}")
        time.sleep(0.05)
    seconds = time.monotonic() - started
    ready = next(line for line in lines if "ready at" in line).strip()
    url = re.search(r"ready at (\S+)", ready).group(1).rstrip("/")
    try:
        yield process, url, ready, seconds, folder / "stderr.txt"
    finally:
        if process.poll() is None:
            process.kill()


def test_demo_server_is_ready_in_seconds_without_ray(demo_server):
    process, url, ready, seconds, _ = demo_server
    assert "engine: pytorch demo" in ready and "mode: in-process" in ready and "limits:" in ready
    maps = Path(f"/proc/{process.pid}/maps")
    if maps.exists():  # every shared library the process loaded: Ray's core is not one of them
        assert "_raylet" not in maps.read_text()
    with urllib.request.urlopen(url + "/health", timeout=30) as response:
        health = json.loads(response.read())
    assert health["runner"] == "in-process" and health["explain"] is True
    print(f"dsdkit serve --model demo: ready in {seconds:.1f} s")  # the number, for the run's log


def test_page_ranks_explains_reports_errors_and_fits_375_px(demo_server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import Select, WebDriverWait

    _, url, _, _, _ = demo_server
    browser = start_browser(tmp_path / "profile")
    try:
        wait = WebDriverWait(browser, 180)
        browser.get(url + "/")
        wait.until(lambda b: "model demo" in b.find_element(By.ID, "model-line").text)
        # Every control has a label.
        unlabeled = browser.execute_script(
            "return [...document.querySelectorAll('input, select, textarea')]"
            ".filter(e => !e.labels || !e.labels.length).map(e => e.id || e.name);"
        )
        assert unlabeled == []

        # A demo example and its captions, ranked: the image's own caption comes first (the blue square: the red
        # circle prefers a two-object caption with a red object, as the README's try-it table shows).
        wait.until(lambda b: len(Select(b.find_element(By.ID, "example")).options) > 1)
        Select(browser.find_element(By.ID, "example")).select_by_visible_text(DEMO_CAPTIONS[1])
        wait.until(lambda b: b.find_element(By.ID, "preview").get_attribute("src").startswith("data:image/png"))
        browser.find_element(By.ID, "demo-captions").click()
        assert browser.find_element(By.ID, "captions").get_attribute("value").splitlines() == DEMO_CAPTIONS
        browser.find_element(By.ID, "rank").click()
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#results li")) == len(DEMO_CAPTIONS))
        captions = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#results button.caption")]
        assert captions[0] == DEMO_CAPTIONS[1] and sorted(captions) == sorted(DEMO_CAPTIONS)
        assert "over the next" in browser.find_element(By.CSS_SELECTOR, "#results li .margin").text

        # A caption chosen with the keyboard: its per-word heat maps are drawn, in colour.
        first = browser.find_element(By.CSS_SELECTOR, "#results button.caption")
        first.send_keys(Keys.ENTER)
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#maps canvas")) == 3)  # a, blue, square
        assert first.get_attribute("aria-pressed") == "true"
        labels = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#maps figcaption")]
        assert labels == ["a", "blue", "square"]
        coloured = browser.execute_script(
            "const c = document.querySelector('#maps canvas');"
            "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
            "let n = 0; for (let i = 0; i < d.length; i += 4) { if (Math.abs(d[i] - d[i + 2]) > 30) n++; }"
            "return [c.width, c.height, n];"
        )
        assert coloured[0] > 0 and coloured[2] > coloured[0] * coloured[1] * 0.05, coloured  # not a grey picture

        # The page at 375 px: nothing scrolls sideways, with results and maps shown.
        browser.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride", {"width": 375, "height": 800, "deviceScaleFactor": 1, "mobile": True}
        )
        time.sleep(0.5)
        widths = browser.execute_script(
            "return [window.innerWidth, document.documentElement.scrollWidth, document.body.scrollWidth];"
        )
        assert widths[0] == 375 and max(widths[1:]) <= 375, widths

        # A file that is not an image: the API's own one-line message on the page.
        bad = tmp_path / "not-an-image.png"
        bad.write_bytes(b"hello, this is text")
        browser.find_element(By.ID, "file").send_keys(str(bad))
        wait.until(lambda b: "not-an-image.png" in b.find_element(By.ID, "drop-text").text)
        browser.find_element(By.ID, "rank").click()
        error = wait.until(ready.visibility_of_element_located((By.ID, "error")))
        body = json.dumps({"image": {"base64": base64.b64encode(bad.read_bytes()).decode()}, "captions": ["a"]})
        request = urllib.request.Request(
            url + "/rank-captions", body.encode(), {"Content-Type": "application/json"}, method="POST"
        )
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=60)
        assert error.text == json.loads(caught.value.read())["error"]
        assert "not a readable image" in error.text
        assert browser.execute_script("return document.documentElement.scrollWidth;") <= 375
    finally:
        browser.quit()


def test_ctrl_c_stops_the_demo_server(demo_server):
    process, _, _, _, stderr_path = demo_server
    process.send_signal(signal.SIGINT)
    assert process.wait(60) == 0
    stderr = stderr_path.read_text()
    assert "Traceback" not in stderr and "\x1b[" not in stderr, stderr[-3000:]
