"""The page of `var-rt serve`, in a real browser: Debian's chromium, headless, driven through its chromedriver by
selenium (.ci/run installs both; the test is skipped where they are not installed). Load /, choose a class and a
method, generate, watch the previews arrive, and check that the download link holds the PNG the offline pipeline
draws."""
import base64
import os
import shutil

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
webdriver = pytest.importorskip("selenium.webdriver")

from var_rt import images  # noqa: E402
from var_rt.demo import models as dm  # noqa: E402

from serve_util import engine_for, png_to_array, serving  # noqa: E402

CHROMIUM = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if os.path.exists(p)), None)
DRIVER = shutil.which("chromedriver") or next((p for p in ("/usr/bin/chromedriver",) if os.path.exists(p)), None)
pytestmark = [pytest.mark.skipif(CHROMIUM is None or DRIVER is None,
                                 reason="no chromium + chromedriver (apt-get install chromium chromium-driver)"),
              pytest.mark.usefixtures("one_thread")]


@pytest.fixture
def browser():
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1000,900"):
        opts.add_argument(flag)
    # the driver given explicitly: selenium-manager never downloads one
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.set_page_load_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()


def test_page_generates_with_previews_and_download(browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait
    engine = engine_for("--demo")
    with serving(engine) as (url, app):
        browser.get(url + "/")
        wait = WebDriverWait(browser, 20)
        wait.until(lambda d: d.find_element(By.ID, "generate").is_enabled())
        Select(browser.find_element(By.ID, "class")).select_by_index(6)          # yellow ring
        Select(browser.find_element(By.ID, "method")).select_by_visible_text("CoDe N=2")
        seed = browser.find_element(By.ID, "seed")
        seed.clear()
        seed.send_keys("5")
        browser.find_element(By.ID, "generate").click()
        wait.until(lambda d: d.find_element(By.ID, "status").get_attribute("data-done") == "1")
        status = browser.find_element(By.ID, "status")
        assert browser.find_element(By.ID, "error").text == ""
        assert int(status.get_attribute("data-previews")) == 5   # scales 1..5 of 6, then the final image
        link = browser.find_element(By.ID, "download")
        assert link.is_displayed() and link.get_attribute("download") == "var-rt-class6-seed5.png"
        href = link.get_attribute("href")
        assert href.startswith("data:image/png;base64,")
        got = png_to_array(href.split(",", 1)[1])
        final = browser.find_element(By.ID, "final").get_attribute("src")
        assert base64.b64decode(final.split(",", 1)[1]) == base64.b64decode(href.split(",", 1)[1])
    ref = images.to_uint8(dm.load_demo_var(draft_steps=2)([6], seed=5, **dm.demo_sampling()))[0]
    assert np.array_equal(got, ref)
    assert app.state.metrics.streams == 1
