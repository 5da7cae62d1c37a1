"""report.py: charts and a self-contained HTML report, checked as files and, in a real
headless browser (Debian's Chromium), as a rendered page that fetches nothing."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from html.parser import HTMLParser

import matplotlib.image
import pytest

from conftest import result_payload, write_run_history
from harness.report import main, report


def write_results(folder):
    folder.mkdir(parents=True)
    payloads = [
        result_payload("pytorch", step_times=(0.300, 0.302, 0.298)),
        result_payload("tensorflow", step_times=(0.20, 0.30, 0.25)),  # unstable
        result_payload("jax", parameters=3_441_000),  # parameter count differs
        result_payload("mxnet", status="failed", error="ModuleNotFoundError: No module named 'mxnet'"),
        result_payload("pytorch", device="gpu", gpu_name="NVIDIA H100 80GB HBM3", cuda="12.8", cudnn="9",
                       step_times=(0.010, 0.0101, 0.0099)),
    ]
    for number, payload in enumerate(payloads):
        payload["cell"]["id"] = f"cnn_cifar10.{payload['cell']['framework']}.{number}"
        (folder / f"{number}.json").write_text(json.dumps(payload))
    return folder


class Tables(HTMLParser):
    """The text of every table cell, row by row, and every src/href."""

    def __init__(self):
        super().__init__()
        self.rows, self.links, self._row, self._cell = [], [], None, None

    def handle_starttag(self, tag, attrs):
        self.links += [value for name, value in attrs if name in ("src", "href")]
        if tag == "tr":
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append(self._cell)
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def parse(text):
    parser = Tables()
    parser.feed(text)
    return parser


def test_the_report_holds_tables_charts_flags_and_the_environment(tmp_path):
    page = report([write_results(tmp_path / "run")], tmp_path / "out")
    text = page.read_text(encoding="utf-8")
    parsed = parse(text)
    row = next(r for r in parsed.rows if r[0] == "pytorch")
    assert row[1].startswith("300.0 ms [299.0–301.0], 213 images/s") and row[2].startswith("10.0 ms")
    assert 'class="unstable"' in text and 'class="mismatch"' in text and 'class="not-run"' in text
    assert "Flagged cells" in text and "No module named" in text and "CPU (Test CPU, 2 cores)" in text
    assert all(link.startswith(("#", "data:image/png;base64,")) for link in parsed.links)
    assert 'id="history"' not in text  # one run: no history
    charts = list((tmp_path / "out" / "charts").glob("*.png"))
    assert len(charts) == 1 and matplotlib.image.imread(charts[0]).shape[2] in (3, 4)
    assert (tmp_path / "out" / "tables" / "README.md").is_file()


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    assert main([str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'missing'}: no such results folder")


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def render(page, tmp_path):
    """The DOM Chromium builds from the file, and the URLs the page itself asked for (the
    browser's own update and account requests are not the page's: their initiator is none)."""
    if not CHROMIUM:
        message = "no Chromium; install Debian's chromium package"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    netlog = tmp_path / f"{page.stem}-net.json"
    done = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           f"--user-data-dir={tmp_path / 'profile'}", f"--log-net-log={netlog}",
                           "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    log = json.loads(netlog.read_text())
    names = {number: name for name, number in log["constants"]["logEventTypes"].items()}
    fetched = [event["params"]["url"] for event in log["events"]
               if names[event["type"]] == "URL_REQUEST_START_JOB" and "url" in event.get("params", {})
               and event["params"].get("initiator") != "not an origin"]
    return done.stdout, fetched


def test_the_report_renders_in_chromium_with_the_numbers_and_fetches_nothing(tmp_path):
    page = report([write_results(tmp_path / "run")], tmp_path / "out")
    dom, fetched = render(page, tmp_path)
    rendered = [row for row in parse(dom).rows if row and row[0] in ("pytorch", "tensorflow", "jax", "mxnet")]
    written = [row for row in parse(page.read_text(encoding="utf-8")).rows if row and row[0] in
               ("pytorch", "tensorflow", "jax", "mxnet")]
    assert rendered == written and len(rendered) == 4
    assert fetched == []
    # The check can fail: a page that loads an image from elsewhere is caught.
    leaky = tmp_path / "leaky.html"
    leaky.write_text('<!doctype html><html><body><img src="http://example.invalid/x.png"></body></html>')
    assert render(leaky, tmp_path)[1] == ["http://example.invalid/x.png"]


def test_several_folders_merge_into_a_new_folder_of_their_own(tmp_path, monkeypatch, capsys):
    from harness import report as report_module

    monkeypatch.setattr(report_module, "REPO_ROOT", tmp_path)
    first, second = write_results(tmp_path / "a"), write_results(tmp_path / "b")
    assert main([str(first), str(second)]) == 0
    [merged] = (tmp_path / "results").iterdir()
    assert merged.name.startswith("merged-") and (merged / "report.html").is_file()
    assert not (first / "tables").exists()  # a run's own tables are left as they are
    assert "| pytorch" in capsys.readouterr().out


def test_several_runs_get_a_history_section_that_renders_in_chromium_and_fetches_nothing(tmp_path):
    page = report([write_run_history(tmp_path / "history")], tmp_path / "out")
    assert '<li><a href="#history">History</a></li>' in page.read_text(encoding="utf-8")
    chart = tmp_path / "out" / "charts" / "history-cnn_cifar10.png"
    assert matplotlib.image.imread(chart).shape[2] in (3, 4)
    dom, fetched = render(page, tmp_path)
    assert '<section id="history"><h2>History</h2>' in dom
    assert '<img alt="history chart: cnn_cifar10" src="data:image/png;base64,' in dom
    [change] = [row for row in parse(dom).rows if row[0].startswith("cnn_cifar10: pytorch")]
    assert change[1].startswith("slowdown ×1.") and change[1].endswith(", latest")
    assert change[5] == "cuda 12.8 → 13.0; framework version 1.0 → 2.0"
    assert fetched == []


def test_a_report_of_two_sets_compares_them_and_renders_in_chromium(tmp_path, monkeypatch):
    from harness import report as report_module

    monkeypatch.setattr(report_module, "REPO_ROOT", tmp_path)
    sets = []
    for name, cuda, scale in (("a", "12.8", 1.0), ("b", "13.0", 1.2)):
        folder = tmp_path / name
        folder.mkdir()
        for framework in ("pytorch", "jax"):
            times = [t * (scale if framework == "pytorch" else 1.0) for t in (0.0100, 0.0101, 0.0099, 0.0100, 0.0102)]
            payload = result_payload(framework, device="gpu", gpu_name="NVIDIA H100 80GB HBM3", cuda=cuda, cudnn="9",
                                     step_times=times, cell_id=f"cnn_cifar10.{framework}.cuda-{cuda}")
            (folder / f"{framework}.json").write_text(json.dumps(payload))
        sets.append(folder)
    assert main([str(folder) for folder in sets]) == 0
    [page] = (tmp_path / "results").glob("merged-*/report.html")
    dom, fetched = render(page, tmp_path)
    assert '<section id="comparison"><h2>B against A</h2>' in dom and '<li><a href="#comparison">' in dom
    assert f"<p>B ({sets[1]}) against A ({sets[0]}); they differ in: cuda 12.8 → 13.0</p>" in dom
    assert "2 pairs judged together (Benjamini–Hochberg false-discovery control at 5%): 0 faster, 1 slower" in dom
    assert '<img alt="comparison chart" src="data:image/png;base64,' in dom
    verdicts = {row[1]: row[-1] for row in parse(dom).rows if row and row[0] == "cnn_cifar10"}
    assert verdicts == {"pytorch": "slower by 20.0%", "jax": "no significant difference"}
    assert fetched == []
