"""Debian's Chromium driven by Selenium through /usr/bin/chromedriver, for the browser tests of the job report, the
operator dashboard and the member page: headless, no sandbox (tests may run as root), nothing fetched in the
background, a fresh profile in the test's tmp_path, the browser's console log kept, and every process stopped by
PID when the test ends. Where Chromium is missing the tests skip if this is not root (`make test` installs it with
apt-get as root, as it installs Mosquitto) and fail if it is (then `make chromium` should have run)."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1200,1600",
)


def require_chromium() -> None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if not missing:
        return
    if os.geteuid() != 0:
        pytest.skip(f"{', '.join(missing)} missing and not root: `sudo apt-get install chromium chromium-driver`")
    pytest.fail(f"{', '.join(missing)} missing: `make chromium` (part of `make test`) installs them as root")


@contextlib.contextmanager
def chromium(tmp_path: Path) -> Iterator[Any]:
    """A Selenium WebDriver on a fresh headless Chromium; on exit the driver quits and the chromedriver process and
    every process below it are killed by PID if still alive."""
    require_chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    profile = tmp_path / "chromium-profile"
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    process = service.process
    below = [p.pid for p in psutil.Process(process.pid).children(recursive=True)] if process else []
    try:
        yield driver
    finally:
        with contextlib.suppress(Exception):
            driver.quit()
        for pid in [*([process.pid] if process else []), *below]:
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()
        shutil.rmtree(profile, ignore_errors=True)


def console_errors(driver: Any) -> list[dict[str, object]]:
    """The browser console's SEVERE entries since the last call (reading the log empties it)."""
    return [entry for entry in driver.get_log("browser") if entry.get("level") == "SEVERE"]


def visit(driver: Any, url: str | None, shots: Path, name: str) -> str:
    """Open `url` (None: stay on the page the browser shows), wait until it has loaded, save a screenshot as
    shots/NAME.png and assert the console stayed clean; the page's text."""
    from selenium.webdriver.support.ui import WebDriverWait

    if url is not None:
        driver.get(url)
    WebDriverWait(driver, 30).until(lambda d: d.execute_script("return document.readyState") == "complete")
    shots.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(shots / f"{name}.png"))
    errors = console_errors(driver)
    assert errors == [], f"{driver.current_url}: {errors}"
    return str(driver.find_element("tag name", "body").text)
