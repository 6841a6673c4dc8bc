"""Take the picture of a report that the docs show: ``python docs/screenshot.py runs/demo/report.html``
writes ``docs/report.png`` (the side-by-side gallery, from the system's Chromium driven by Playwright,
as tests/workbench/test_report_html.py drives it)."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


def main(report: str, out: str = str(Path(__file__).with_name("report.png"))) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("needs Chromium (Debian: apt-get install chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=ARGS)
        page = browser.new_page(viewport={"width": 1300, "height": 900})
        page.goto(Path(report).resolve().as_uri())
        page.select_option("#error", "any")           # the images where some caption states a false fact
        page.locator("h2", has_text="Every held-out image").scroll_into_view_if_needed()
        page.screenshot(path=out)
        browser.close()
    print(f"wrote {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
