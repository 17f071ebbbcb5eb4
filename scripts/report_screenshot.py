"""Screenshot of a run's report in headless Chromium (how docs/report-screenshot.png was made).

    python scripts/report_screenshot.py runs/calculator/report.html docs/report-screenshot.png

Needs the `playwright` package (dev extras) and a Chromium binary (`chromium` on PATH, or
AGENTRL_CHROMIUM). The viewer is set to the first saved episode that called a tool and succeeded, and
the whole page is captured at 1200 px wide. Any request the page makes is refused and reported.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from playwright.sync_api import sync_playwright


def main(report: str, out: str) -> None:
    browser_path = os.environ.get("AGENTRL_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if browser_path is None:
        sys.exit("no Chromium found: apt-get install chromium, or set AGENTRL_CHROMIUM")
    url = Path(report).resolve().as_uri()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        refused: list[str] = []
        page.route("**/*", lambda r: r.continue_() if r.request.url == url else (refused.append(r.request.url),
                                                                                 r.abort()))
        page.goto(url)
        sections = page.locator("section.episode")
        for i in range(sections.count()):
            s = sections.nth(i)
            if s.locator(".call").count() and "reward 1" in (s.locator("h3").text_content() or ""):
                page.select_option("#episode-select", s.get_attribute("data-index"))
                break
        page.screenshot(path=out, full_page=True)
        browser.close()
    if refused:
        sys.exit(f"the page asked for {refused}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
