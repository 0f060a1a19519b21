"""The report's index.html in a real browser: headless Chromium (Debian's ``chromium`` package) loads
the page and a probe script reports every image's natural width (0: it did not load), the tables
and the header. Skipped, with the reason, where Chromium is not installed."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from metaplast.analysis.report import TABLE1_PAPER, main
from test_report import write_meta_run, write_online_run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="headless Chromium is not installed (Debian: apt-get install -y chromium); "
    "the report's rendering in a browser is not checked",
)

#: Runs after the page (and so every image) has loaded; writes what it found into the page.
PROBE = """<script>
window.addEventListener('load', function () {
  var images = Array.from(document.images).map(function (img) {
    var shown = img.getBoundingClientRect().width;
    return {src: img.getAttribute('src'), natural: img.naturalWidth, shown: shown};
  });
  var header = document.querySelector('header');
  var out = document.createElement('pre');
  out.id = 'probe';
  out.textContent = JSON.stringify({
    images: images,
    tables: document.querySelectorAll('table').length,
    captions: document.querySelectorAll('figcaption').length,
    header: header ? header.innerText : '',
    title: document.title
  });
  document.body.appendChild(out);
});
</script>"""


def render(page: Path, tmp_path: Path, extra: str = "") -> dict:
    """Load ``page`` (with the probe, and ``extra`` HTML) in headless Chromium; the probe's findings."""
    probe = page.with_name("_probe.html")
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", PROBE + extra + "</body>"))
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--virtual-time-budget=20000",
        "--dump-dom",
        probe.as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    found = re.search(r'<pre id="probe">(.*?)</pre>', done.stdout, re.S)
    assert found, f"Chromium did not run the probe (exit {done.returncode}):\n{done.stderr[-2000:]}"
    probe.unlink()
    return json.loads(html.unescape(found.group(1)))


@pytest.fixture
def report_dir(tmp_path):
    """A report of two meta runs, two Table 1 jobs and two online evaluations."""
    runs = tmp_path / "runs"
    fa = write_meta_run(runs / "fa", {"name": "f0", "terms": [0]}, "fa", "none", [90, 80, 80, 80, 70])
    bp = write_meta_run(runs / "bp", {"name": "f0", "terms": [0]}, "bp", "none", [0] * 5, acc=0.6)
    jobs = []
    for job, uses in list(enumerate(TABLE1_PAPER))[::6]:
        per_layer = ["ehebb" if u else "f0" for u in uses]
        jobs.append(
            write_meta_run(runs / "table1" / str(job), {"per_layer": per_layer}, "fa", "none", [10, 20, 30])
        )
    online = [write_online_run(runs / f"online_{kind}", kind) for kind in ("fa", "bp")]
    out = tmp_path / "report"
    main([*map(str, [fa, bp, *jobs, *online]), "--out", str(out), "--window", "3", "--burn-in", "4"])
    return out


def test_every_figure_and_table_shows_in_chromium(report_dir, tmp_path):
    page = report_dir / "index.html"
    found = render(page, tmp_path)
    images = {image["src"]: image for image in found["images"]}
    assert set(images) == {p.name for p in report_dir.glob("*.png")}  # every figure is on the page
    for src, image in images.items():
        assert image["natural"] > 0, f"{src} did not load in the browser"
        assert image["shown"] > 100, f"{src} is not shown at a readable size"
    assert found["captions"] == len(images)
    source = page.read_text(encoding="utf-8")
    assert found["tables"] == source.count("<table") == 5  # runs, summary, final Θ, Table 1, online
    for name in ("summary.csv", "theta_final.csv", "table1.csv", "online_accuracy.csv"):
        assert f"href='{name}'" in source and (report_dir / name).exists()
    assert "python -m metaplast.report" in found["header"] and "Made " in found["header"]
    assert "glyphs (SYNTHETIC)" in found["header"] and "5-way, K = 50, Q = 10" in found["header"]
    assert found["title"].startswith("metaplast report")


def test_the_probe_sees_an_image_that_does_not_load(report_dir, tmp_path):
    found = render(report_dir / "index.html", tmp_path, extra="<img src='missing.png' alt='missing'>")
    broken = [image for image in found["images"] if image["natural"] == 0]
    assert [image["src"] for image in broken] == ["missing.png"]
