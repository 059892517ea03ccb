"""The HTML report in a real headless browser: it renders, every plot loads with a size,
and the page logs no console error.

Uses Debian's ``chromium`` and ``chromium-driver`` (the README's test line and
``.ci/run`` install them) driven by selenium with the driver's path given, so
selenium never looks for or downloads a driver. Skips, with the reason, only when
those two programs are absent.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from edgerep.bench.report import write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="chromium and chromium-driver are not installed (the README's test line installs "
    "them: apt-get install chromium chromium-driver)",
)


def _row(variant, runtime, p50, *, target, fingerprint, precision=None, top1=0.96):
    rng = np.random.default_rng(len(variant) + len(runtime))
    samples = p50 * (1 + 0.05 * rng.random(200))
    samples[-5:] *= 30  # a p99 tail
    return {
        "variant": variant,
        "runtime": runtime,
        "format": "onnx",
        "precision": "fp32",
        "target": target,
        "fingerprint": fingerprint,
        "session": {"inference_precision": precision} if precision else {},
        "latency": {
            "stats": {
                "n": 200,
                "p50_ms": float(np.median(samples)),
                "p99_ms": float(samples.max()),
            },
            "p50_ci_ms": [p50 * 0.99, p50 * 1.01],
            "p50_spread": 0.02,
            "unstable": False,
        },
        "accuracy": {"top1": top1, "samples": 450},
        "reference": None,
        "roofline": {
            "fraction_of_peak": 0.2,
            "peak_precision": "fp32",
            "compute_precision": "fp32",
        },
        "samples_ms": [float(v) for v in samples],
    }


def _report():
    devices = [
        {"name": "local", "transport": "local", "fingerprint": "abc123", "environment": {}},
        {"name": "<board & 'jetson'>", "transport": "agent", "fingerprint": "def456"},
    ]
    rows = [
        _row("folded", "onnxruntime", 0.045, target="local", fingerprint="abc123"),
        _row("folded", "openvino", 0.037, target="local", fingerprint="abc123", precision="bf16"),
        _row("folded", "onnxruntime", 0.9, target="<board & 'jetson'>", fingerprint="def456"),
    ]
    return {
        "schema_version": 1,
        "kind": "edgerep-bench",
        "created": "2026-01-01T00:00:00+00:00",
        "environment": {"cpu": "test </pre><script>console.error('injected')</script>"},
        "settings": {"latency": {"repeats": 3}},
        "rows": rows,
        "devices": devices,
        "errors": [{"variant": "folded", "runtime": "tensorrt", "error": "not installed <here>"}],
    }


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",  # root (CI) cannot use chromium's user-namespace sandbox
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,2000",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()


def _images(driver):
    """(id, complete, natural width, natural height, rendered width, rendered height,
    displayed) of every image on the page."""
    return driver.execute_script(
        "return Array.from(document.images).map(i => [i.id, i.complete, i.naturalWidth, "
        "i.naturalHeight, i.getBoundingClientRect().width, i.getBoundingClientRect().height, "
        "getComputedStyle(i).visibility !== 'hidden' && getComputedStyle(i).display !== 'none'])"
    )


def _severe(driver):
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def test_report_renders_with_every_plot_and_no_console_error(browser, tmp_path):
    paths = write_report(_report(), tmp_path)
    browser.get(paths["html"].as_uri())
    assert browser.title == "edgerep bench"
    images = _images(browser)
    assert sorted(i[0] for i in images) == ["plot-latency", "plot-pareto"]
    for ident, complete, nat_w, nat_h, w, h, visible in images:
        assert complete and nat_w > 100 and nat_h > 100, f"{ident} did not load"
        assert w > 100 and h > 100 and visible, f"{ident} is not shown"
    assert _severe(browser) == []
    # the table has one line per row, and text from the report is text, not markup
    body_rows = browser.execute_script("return document.querySelectorAll('table')[0].rows.length")
    assert body_rows == 1 + 3
    text = browser.find_element("tag name", "body").text
    assert "<board & 'jetson'>" in text and "console.error('injected')" in text
    assert "not installed <here>" in text
    assert browser.execute_script("return document.scripts.length") == 0


def test_the_checks_catch_a_broken_plot_and_a_console_error(browser, tmp_path):
    """The same checks on a page with a broken image and a script error do fail."""
    page = tmp_path / "broken.html"
    page.write_text(
        "<!doctype html><html><head><title>broken</title></head><body>"
        "<img id='plot-x' src='data:image/png;base64,AAAA'>"
        "<script>console.error('boom')</script></body></html>"
    )
    browser.get(page.as_uri())
    (image,) = _images(browser)
    assert image[2] == 0  # naturalWidth: the check above would fail on it
    severe = _severe(browser)
    assert severe and "boom" in severe[0]["message"]
