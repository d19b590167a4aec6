"""report.html: one self-contained page with the same content as report.md, checked as text
and rendered in a real headless browser (Chromium; skipped, saying so, where none is installed).

The experiment is built by hand rather than by a Ray sweep: one trial really trained for one
step (so it has a sample grid, and a checkpoint for the denoising diagnostic), one written by
hand with a lower loss and neither (so the report has a problem to list: the best trial's grid
is missing), and one that errored with a message crafted to be HTML.
"""

from __future__ import annotations

import base64
import html
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from analysis.report import analyze_experiment
from diffusion_lib.build import create_trainer
from record.files import TrialFile

from conftest import tiny_config, write_sweep_file, write_trial

CRAFTED = "<script>document.title='pwned'</script><img src=x onerror=\"document.title='pwned'\"> & <b>bold</b>"
BROWSERS = ["chromium", "chromium-browser", "google-chrome", "google-chrome-stable"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def analysed(tmp_path_factory) -> Path:
    experiment = tmp_path_factory.mktemp("html") / "tiny"
    write_sweep_file(experiment, {"optim.lr": {"grid": [1e-4, 1e-3, 2e-3]}}, metric="train/loss")

    config = tiny_config(
        optim={"lr": 1e-3}, train={"total_steps": 1, "batch_size": 4}, eval={"every": 1}, ema={"decay": 0.01}
    )
    trained = experiment / "trial_00000_lr=0.001"
    create_trainer(config, trained, progress=False).fit()
    TrialFile({"optim.lr": 1e-3}, config.flat()).write(trained)

    rows = [{"step": 10, "train/loss": 1e-3, "wall_time_s": 1.0}, {"step": 20, "train/loss": 2e-4, "wall_time_s": 2.0}]
    write_trial(experiment, "trial_00001_lr=0.002", rows, searched={"optim.lr": 2e-3}, total_steps=20)
    error = f'Traceback (most recent call last):\n  File "x.py", line 1\nValueError: {CRAFTED}\n'
    write_trial(
        experiment,
        "trial_00002_lr=0.0001",
        [{"step": 10, "train/loss": 50.0, "wall_time_s": 1.0}],
        searched={"optim.lr": 1e-4},
        total_steps=20,
        error=error,
    )

    analyze_experiment(experiment)
    return experiment / "analysis"


class _Page(HTMLParser):
    """Every start tag with its attributes, and the trials table's rows as lists of cell texts."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.rows: list[list[str]] = []
        self._in_trials = self._in_body = False
        self._cell = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag == "table":
            self._in_trials = attrs.get("id") == "trials"
        elif tag == "tbody" and self._in_trials:
            self._in_body = True
        elif tag == "tr" and self._in_body:
            self.rows.append([])
        elif tag == "td" and self._in_body:
            self._cell = []

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self.rows[-1].append("".join(self._cell))
            self._cell = None
        elif tag == "table":
            self._in_trials = self._in_body = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _markdown_images(report_md: str) -> dict[str, str]:
    """{caption: relative file} of the `![caption](file)` lines."""
    return dict(re.findall(r"^!\[(.*)\]\((.*)\)$", report_md, flags=re.M))


def _markdown_trial_ids(report_md: str) -> list[str]:
    table = report_md.split("## Trials, best first\n\n")[1].split("\n\n")[0].splitlines()
    return [line.split(" | ")[0].removeprefix("| ") for line in table[2:]]


def _as_html(text: str) -> str:
    """`text` as report.html writes it: escaped, non-ASCII characters as references."""
    return html.escape(text, quote=True).encode("ascii", "xmlcharrefreplace").decode("ascii")


def _png_width(data: bytes) -> int:
    assert data.startswith(PNG_MAGIC)
    return int.from_bytes(data[16:20], "big")


def test_report_html_is_self_contained_escaped_and_says_what_report_md_says(analysed):
    page_text = (analysed / "report.html").read_text(encoding="utf-8")
    report_md = (analysed / "report.md").read_text()
    page = _Page()
    page.feed(page_text)

    # Self-contained: no scripts, stylesheets or frames; every src/href is a data: URI; nothing says http(s).
    tags = {tag for tag, _ in page.tags}
    assert not tags & {"script", "link", "iframe", "object", "embed", "base"}
    references = [
        value for _, attrs in page.tags for name, value in attrs.items() if name in {"src", "href", "srcset", "poster"}
    ]
    assert references and all(value.startswith("data:image/png;base64,") for value in references)
    assert (
        "http://" not in page_text
        and "https://" not in page_text
        and "url(" not in page_text
        and "@import" not in page_text
    )
    assert any(tag == "meta" and attrs.get("http-equiv") == "Content-Security-Policy" for tag, attrs in page.tags)
    assert page_text.isascii()  # whatever encoding it was written in, it reads the same

    # The same images as report.md's links, byte for byte, of every kind the analysis makes.
    linked = _markdown_images(report_md)
    embedded = {
        attrs["alt"]: base64.b64decode(attrs["src"].split(",", 1)[1]) for tag, attrs in page.tags if tag == "img"
    }
    assert list(embedded) == list(linked)
    for caption, file in linked.items():
        assert embedded[caption] == (analysed / file).read_bytes(), f"{file} is not embedded as it is"
    assert {"grid_rank2.png", "denoise.png", "loss_vs_step.png", "best_by_optim.lr.png"} <= set(linked.values())

    # The same trials table (one row per trial, best first), sentences and problems.
    assert (
        [row[0] for row in page.rows]
        == _markdown_trial_ids(report_md)
        == ["trial_00001_lr=0.002", "trial_00000_lr=0.001", "trial_00002_lr=0.0001"]
    )
    for text in [
        "Effects",
        "Problems met while analysing",
        "no sample grid for its best milestone",
        "Denoising diagnostic",
    ]:
        assert text in report_md and _as_html(text) in page_text, text
    plain_items = [line[2:] for line in report_md.splitlines() if line.startswith("- ") and "`" not in line]
    assert len(plain_items) >= 2 and all(f"<li>{_as_html(item)}</li>" in page_text for item in plain_items)

    # Trial data is text: escaped in the page, unchanged in report.md.
    assert "<script>document.title" not in page_text and "<b>bold</b>" not in page_text
    assert _as_html(f"ValueError: {CRAFTED}") in page_text
    assert f"- `trial_00002_lr=0.0001`: ValueError: {CRAFTED}" in report_md.splitlines()


PROBE = """<script>
addEventListener("load", () => {
  const probe = document.createElement("pre");
  probe.id = "probe";
  probe.textContent = JSON.stringify({
    title: document.title,
    rows: document.querySelectorAll("table#trials > tbody > tr").length,
    images: [...document.images].map(img => [img.alt, img.complete, img.naturalWidth]),
    scripts: document.scripts.length,
    text: document.body.innerText,
  });
  document.body.append(probe);
});
</script>
"""


def _browser() -> str | None:
    return next((path for path in map(shutil.which, BROWSERS) if path), None)


@pytest.mark.skipif(
    _browser() is None,
    reason=f"no headless browser installed (looked for {', '.join(BROWSERS)}); "
    ".ci/run installs Debian's chromium when it runs as root",
)
def test_report_html_renders_in_headless_chromium(analysed, tmp_path):
    """Chromium loads the page; a probe appended to a copy (the product has no script, and its
    Content-Security-Policy would refuse one, so the copy drops it) records what it shows."""
    page_text = (analysed / "report.html").read_text(encoding="utf-8")
    probed, csp_removed = re.subn(r'<meta http-equiv="Content-Security-Policy"[^>]*>\n?', "", page_text)
    assert csp_removed == 1 and probed.count("</body>") == 1
    page = tmp_path / "report.html"
    page.write_text(probed.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    command = [
        _browser(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--dump-dom",
        page.as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    found = re.search(r'<pre id="probe">(.*?)</pre>', done.stdout, flags=re.S)
    assert done.returncode == 0 and found, f"rc {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    shown = json.loads(html.unescape(found.group(1)))

    assert shown["title"] == "Sweep report: tiny"  # no injected script ran
    assert shown["scripts"] == 1  # the probe only: the crafted <script> is text
    assert shown["rows"] == 3
    linked = _markdown_images((analysed / "report.md").read_text())
    assert [alt for alt, _, _ in shown["images"]] == list(linked)  # no injected <img>
    for alt, complete, width in shown["images"]:
        expected = _png_width((analysed / linked[alt]).read_bytes())
        assert complete and width == expected > 0, f"{linked[alt]}: shown {width} px wide, the file is {expected}"
    assert f"ValueError: {CRAFTED}" in shown["text"]
