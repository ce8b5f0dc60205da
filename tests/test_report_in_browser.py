"""report.html as a person sees it: rendered by headless Chromium (Debian's `chromium`, which
`.ci/run` installs), driven by Playwright. The verdict must be on screen at the top, and every
department must have a visible row, a visible epsilon line and a visible budget bar."""

from __future__ import annotations

import shutil

import pytest

from server.report import write_report
from tests.test_run_record import two_rounds

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")


def test_the_report_shows_its_verdict_first_and_every_department(tmp_path):
    from playwright.sync_api import sync_playwright

    two_rounds(tmp_path).finish(state="completed")
    write_report(tmp_path)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto((tmp_path / "report.html").as_uri())
            verdict = page.locator(".verdict")
            assert verdict.is_visible()
            box = verdict.bounding_box()
            assert box is not None and box["y"] + box["height"] <= 800  # above the fold, no scrolling needed
            text = verdict.inner_text()
            assert "completed: final accuracy 0.7000 (federated validation)" in text
            assert "differential privacy: on" in text and "secure aggregation: on (SecAgg+)" in text
            colours = {name: page.locator(".budgets .badge", has_text=f"{name}:").evaluate(
                "e => getComputedStyle(e).backgroundColor") for name in ("hr", "it")}
            assert colours["it"] == "rgb(198, 40, 40)"  # exhausted: red
            assert colours["hr"] in ("rgb(46, 125, 50)", "rgb(230, 81, 0)")  # within or near: green or amber
            for name in ("hr", "it"):
                assert page.locator("table tr", has=page.locator(f"td:text-is('{name}')")).first.is_visible()
                for element in (f"spent-{name}", f"epsilon-{name}"):  # its budget bar and its epsilon line
                    drawn = page.locator(f"[id='{element}']")
                    assert drawn.count() == 1 and drawn.bounding_box()["width"] > 0, element
        finally:
            browser.close()
