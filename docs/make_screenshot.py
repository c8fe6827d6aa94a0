"""Make the serving page's screenshot for the docs (run by hand; its PNG is committed once):

    python docs/make_screenshot.py                      # writes docs/serving-page.png
    python docs/make_screenshot.py -o /tmp/page.png --width 420

Starts ``dsdkit serve --model demo`` on a free loopback port, opens the page in headless Chromium (Debian's
``chromium`` and ``chromedriver``, by path, through selenium: the dev extra), gives it the first demo example and
the demo captions, ranks them, opens the top caption's heat maps and the model panel, and saves the whole page.
Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import base64
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

logger = logging.getLogger("make_screenshot")

HERE = Path(__file__).resolve().parent
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
)


def start_server() -> tuple[subprocess.Popen, str]:
    dsdkit = Path(sys.executable).parent / "dsdkit"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [dsdkit, "serve", "--model", "demo", "--port", "0"], stdout=subprocess.PIPE, text=True, env=env
    )
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(process.stdout.readline, "")), daemon=True).start()
    started = time.monotonic()
    while not any("ready at" in line for line in lines):
        if process.poll() is not None or time.monotonic() - started > 300:
            process.kill()
            raise SystemExit(f"dsdkit serve --model demo did not start: {lines}")
        time.sleep(0.1)
    url = re.search(r"ready at (\S+)", next(line for line in lines if "ready at" in line)).group(1)
    return process, url


def screenshot(url: str, output: Path, width: int, chromium: Path, chromedriver: Path) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    with tempfile.TemporaryDirectory(prefix="dsdkit-chromium-") as profile:
        options = Options()
        options.binary_location = str(chromium)
        for arg in CHROMIUM_ARGS:
            options.add_argument(arg)
        options.add_argument(f"--user-data-dir={profile}")
        options.add_argument(f"--window-size={width},1000")
        browser = webdriver.Chrome(service=Service(executable_path=str(chromedriver)), options=options)
        try:
            wait = WebDriverWait(browser, 300)
            browser.get(url)
            wait.until(lambda b: len(Select(b.find_element(By.ID, "example")).options) > 1)
            examples = Select(browser.find_element(By.ID, "example"))
            examples.select_by_index(1)
            wait.until(lambda b: b.find_element(By.ID, "preview").get_attribute("src").startswith("data:"))
            browser.find_element(By.ID, "demo-captions").click()
            browser.find_element(By.ID, "rank").click()
            wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#results li"))
            browser.find_element(By.CSS_SELECTOR, "#results button.caption").click()
            wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#maps canvas"))
            browser.execute_script("document.getElementById('about').open = true; document.activeElement.blur();")
            time.sleep(0.5)
            size = browser.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
            clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
            shot = browser.execute_cdp_cmd(
                "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": clip}
            )
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_bytes(base64.b64decode(shot["data"]))
        finally:
            browser.quit()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--output", type=Path, default=HERE / "serving-page.png")
    parser.add_argument("--width", type=int, default=960, help="the browser window's width in pixels")
    parser.add_argument("--chromium", type=Path, default=Path("/usr/bin/chromium"))
    parser.add_argument("--chromedriver", type=Path, default=Path("/usr/bin/chromedriver"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    process, url = start_server()
    try:
        screenshot(url, args.output, args.width, args.chromium, args.chromedriver)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)
    logger.info("wrote %s", args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
