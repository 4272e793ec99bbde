"""Reading a Snakemake HTML report: its embedded results, and the pages its browser code builds.

The report's JavaScript (snakemake/report/html_reporter/template/components/abstract_results.js)
lists the results of a subcategory as a table keyed by their labels; a label other than the first
with exactly two values, each on half of the results, becomes a toggle. Every (row, toggle value)
combination must name a result, or the page stays blank (``TypeError ... mime_type``).
:func:`offered_combinations` does the same in Python.
"""

from __future__ import annotations

import base64
import io
import itertools
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path


def embedded(report_html: Path) -> tuple[dict, dict]:
    """The report's ``results`` (path -> record) and ``categories`` (category -> subcategory -> paths)."""
    text = report_html.read_text()
    found = {}
    for name in ("results", "categories"):
        m = re.search(rf'<script id="{name}">\s*var {name} = (.*?);\s*</script>', text, re.S)
        assert m, f"no embedded '{name}' in {report_html}"
        found[name] = json.loads(m.group(1))
    return found["results"], found["categories"]


def workflow_description(report_html: Path) -> str:
    """The report's home page text (the Snakefile's ``report:`` file, rendered), tags removed."""
    m = re.search(r'<script id="workflow-desc">\s*var workflow_desc = (.*?);\s*</script>', report_html.read_text(),
                  re.S)
    assert m, f"no workflow description in {report_html}"
    return plain_text(json.loads(m.group(1)))


def plain_text(html_text: str) -> str:
    """The text of an HTML fragment, whitespace collapsed."""
    parts: list[str] = []
    parser = HTMLParser()
    parser.handle_data = parts.append
    parser.feed(html_text)
    return " ".join("".join(parts).split())


def decoded(record: dict) -> bytes:
    """The file a result embeds (its base64 data URI)."""
    return base64.b64decode(record["data_uri"].split("base64,", 1)[1])


def image_title(data: bytes) -> str:
    """The title stored in a figure file: the JPEG comment, or the PNG ``Title``."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        title = im.info.get("comment", im.info.get("Title", b""))
    return title.decode() if isinstance(title, bytes) else title


def _labels(records: list[dict]) -> list[str] | None:
    """The labels of a subcategory, in order of first appearance (None unless every result has labels)."""
    if not all(r.get("labels") for r in records):
        return None
    order = {}
    for r in records:
        for i, key in enumerate(r["labels"]):
            order.setdefault(key, i)
    return sorted(order, key=order.get)


def offered_combinations(paths: list[str], results: dict) -> list[tuple[tuple, tuple, str | None]]:
    """Every (row labels, toggle values, result path or None) a subcategory page offers."""
    records = [results[p] for p in paths]
    labels = _labels(records)
    toggles = {}
    if labels and len(labels) > 1:
        for label in labels[1:]:
            values = [r["labels"][label] for r in records if label in r["labels"]]
            unique = sorted(set(values))
            if len(unique) == 2 and all(values.count(v) * 2 == len(records) for v in unique):
                toggles[label] = unique
    if len(toggles) > 1:  # the report shows one toggle at most
        toggles = {}
    rows: dict[tuple, dict[tuple, str]] = {}
    for path, r in zip(paths, records):
        if labels is None:
            row, toggle = (path,), ()
        else:
            row = tuple(r["labels"].get(k, "") for k in labels if k not in toggles)
            toggle = tuple(r["labels"].get(k) for k in toggles)
        rows.setdefault(row, {})[toggle] = path
    offered = []
    for row, by_toggle in rows.items():
        for toggle in itertools.product(*toggles.values()):
            offered.append((row, toggle, by_toggle.get(toggle)))
    return offered


def missing_results(results: dict, categories: dict) -> list[str]:
    """The combinations a page offers that name no result (what leaves a page blank)."""
    problems = []
    for category, subcategories in categories.items():
        for subcategory, paths in subcategories.items():
            for row, toggle, path in offered_combinations(paths, results):
                if path is None or path not in results or not results[path].get("mime_type"):
                    problems.append(f"{category} / {subcategory}: {row} {toggle} -> {path}")
    return problems


REPORT_WINDOW = (1600, 1000)  # a laptop's browser window, px
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run", "--enable-logging=stderr", "--v=0"]

# Opens every category and subcategory page in turn and every result of each, as a user clicks
# through the report; prints how many table rows each page shows.
VISIT_ALL_PAGES = """
<script>
window.addEventListener("load", async () => {
  const wait = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
  await wait(500);
  try {
    for (const category of Object.keys(categories)) {
      for (const subcategory of Object.keys(categories[category])) {
        // via the menu, as a user clicks: the subcategory page is built anew, not reused
        app.setView({navbarMode: "menu"});
        await wait(200);
        app.setView({navbarMode: "subcategory", category: category, subcategory: subcategory});
        await wait(300);
        for (const path of categories[category][subcategory]) {
          new ToggleViewManager(app).handleSelectedResult(path);
          await wait(100);
          const frame = document.querySelector("#app iframe");
          if (frame) console.log("M2OST-FRAME " + frame.clientWidth + " " + path);
        }
        const rows = document.querySelectorAll("#app table tr").length;
        console.log("M2OST-PAGE " + category + " / " + subcategory + " rows=" + rows);
      }
    }
  } catch (err) {
    console.error("M2OST-ERROR " + err);
  }
  console.log("M2OST-DONE");
});
</script>
"""


# Measures a table page as drawn: the page's overflow past the frame, the cells whose text does
# not fit (clipped) or that end beyond the frame, the headers and the column notes below.
MEASURE_TABLE = """
<script>
window.addEventListener("load", () => {
  const width = document.documentElement.clientWidth;
  const cells = [...document.querySelectorAll("th, td")];
  const clipped = cells.filter((c) => c.scrollWidth > c.clientWidth + 1 ||
                                      c.getBoundingClientRect().right > width + 1).map((c) => c.textContent);
  const found = JSON.stringify({
    width: width, overflow: document.documentElement.scrollWidth - width, clipped: clipped,
    headers: [...document.querySelectorAll("th")].map((c) => c.textContent),
    notes: [...document.querySelectorAll("dt")].map((c) => c.textContent)});
  console.log("M2OST-TABLE " + btoa(unescape(encodeURIComponent(found))));  // base64: no quoting in the log
});
</script>
"""


def table_layout(page_html: str, workdir: Path, width: int, timeout: float = 60) -> dict:
    """Open a table page in headless Chromium ``width`` px wide; what :data:`MEASURE_TABLE` logs."""
    page = workdir / f"table_{width}.html"
    head, _, tail = page_html.rpartition("</body>")
    page.write_text(head + MEASURE_TABLE + "</body>" + tail)
    proc = subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={workdir / 'profile'}",
                           f"--window-size={width},900", "--virtual-time-budget=5000", "--dump-dom",
                           page.as_uri()], capture_output=True, text=True, timeout=timeout)
    found = [m for m in console_messages(proc.stderr) if m.startswith("M2OST-TABLE ")]
    assert found, f"the table page was not measured:\n{proc.stderr[-3000:]}"
    return json.loads(base64.b64decode(found[-1].removeprefix("M2OST-TABLE ")).decode())


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def browse_every_page(report_html: Path, workdir: Path, timeout: float = 180) -> str:
    """Open the report in headless Chromium, visit every page; returns Chromium's log (the console)."""
    page = workdir / "report_visit.html"
    head, _, tail = report_html.read_text().rpartition("</body>")  # the last one: libraries hold others in strings
    page.write_text(head + VISIT_ALL_PAGES + "</body>" + tail)
    proc = subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={workdir / 'profile'}",
                           f"--window-size={REPORT_WINDOW[0]},{REPORT_WINDOW[1]}",
                           "--virtual-time-budget=60000", "--dump-dom", page.as_uri()],
                          capture_output=True, text=True, timeout=timeout)
    return proc.stderr


def console_messages(log: str) -> list[str]:
    """The page's console lines in Chromium's log (``...:CONSOLE:line] "message", source: ...``;
    older versions write ``CONSOLE(line)``)."""
    return [m.group(1) for m in re.finditer(r':CONSOLE(?:\(\d+\)|:\d+)\] "(.*?)", source:', log)]
