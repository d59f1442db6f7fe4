"""`sweep report`: the plots and the one-file HTML page, on disk and on the MLflow parent run, and
both pages (the report, and the MLflow UI of `sweep ui`) seen by a real headless browser."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image
from typer.testing import CliRunner

from sweeps.cli import app
from sweeps.report import TrialRecord, write_plots

PNGS = ["history", "importances", "parallel", "slice", "loss_curves", "memory"]
# Set to a folder to keep the browser screenshots (e.g. SWEEP_SCREENSHOTS=/tmp/report_shots).
SCREENSHOTS = os.environ.get("SWEEP_SCREENSHOTS")
REPORT_SPACE = """
method: {type: categorical, choices: [lora, full]}
learning_rate: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
lora_rank: {type: categorical, choices: [2, 8], when: {method: [lora]}}
"""


def sweep(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def swept(tmp_path_factory, tiny_model, sort_data, empty_mlflow_db) -> Path:
    """A finished 4-trial sweep of the tiny model (LoRA and full trials), in its own project folder."""
    from tests.conftest import DEFAULT_TRAINING, config_text, copy_mlflow_db

    project = tmp_path_factory.mktemp("report")
    copy_mlflow_db(empty_mlflow_db, project)
    config = project / "tiny.yaml"
    config.write_text(config_text(tiny_model, *sort_data, "tiny", REPORT_SPACE, DEFAULT_TRAINING, ""))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(project)
        result = sweep("run", config, "--trials", 4)
        assert result.exit_code == 0, result.output
        report = sweep("report", config)
        assert report.exit_code == 0, report.output
    return project


def _client(project: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")


def _parent(project: Path):
    client = _client(project)
    experiment = client.get_experiment_by_name("tiny")
    (parent,) = client.search_runs([experiment.experiment_id], "tags.`sweep.role` = 'parent'")
    return parent


@pytest.mark.slow  # reads a real 4-trial sweep
def test_the_report_writes_every_plot_as_a_png_that_decodes(swept):
    folder = swept / "mlruns" / "reports" / "tiny"
    for name in PNGS:
        with Image.open(folder / f"{name}.png") as image:
            image.load()  # decodes the whole file, not just the header
            assert image.width > 200 and image.height > 200, name


@pytest.mark.slow  # reads a real 4-trial sweep
def test_the_report_page_is_one_file_that_names_every_trial_and_embeds_every_plot(swept):
    page = (swept / "mlruns" / "reports" / "tiny" / "index.html").read_text(encoding="utf-8")
    for number in range(4):
        assert f"trial-{number}" in page
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == len(PNGS)
    assert all(base64.b64decode(data).startswith(b"\x89PNG") for data in images)
    # Self-contained: nothing to fetch and nothing to run when the page is opened.
    assert "<script" not in page and "http://" not in page and "https://" not in page


@pytest.mark.slow  # reads a real 4-trial sweep
def test_the_report_is_logged_under_report_on_the_sweeps_parent_run(swept):
    paths = {a.path for a in _client(swept).list_artifacts(_parent(swept).info.run_id, "report")}
    assert paths == {"report/index.html", *(f"report/{name}.png" for name in PNGS)}


@pytest.mark.slow  # reads a real 4-trial sweep
def test_sweep_run_refreshes_the_report_when_it_finishes(swept):
    index = swept / "mlruns" / "reports" / "tiny" / "index.html"
    index.unlink()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(swept)
        result = sweep("run", swept / "tiny.yaml", "--trials", 4)  # already finished: no new trial
    assert result.exit_code == 0, result.output
    assert index.is_file() and f"report: {index}" in result.output.replace("\n", "")


def test_a_report_of_a_sweep_that_never_ran_is_one_error_line(project, write_config):
    result = sweep("report", write_config())
    assert result.exit_code == 2
    assert result.output.strip().startswith("error: no study named 'tiny' yet")


def _two_objective_study() -> tuple[optuna.Study, list[TrialRecord]]:
    study = optuna.create_study(directions=["maximize", "minimize"])
    distributions = {"learning_rate": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)}
    records = []
    for number, (lr, accuracy, memory) in enumerate([(1e-4, 0.1, 300), (1e-3, 0.6, 320), (1e-2, 0.9, 400)]):
        study.add_trial(
            optuna.trial.create_trial(
                params={"learning_rate": lr}, distributions=distributions, values=[accuracy, memory]
            )
        )
        records.append(TrialRecord(number, "COMPLETE", accuracy, {"learning_rate": lr}, memory, 1.0))
    return study, records


def test_a_multi_objective_sweep_gets_a_pareto_front_and_a_best_so_far_history(tmp_path):
    study, records = _two_objective_study()
    images, skipped = write_plots(study, records, "accuracy", tmp_path)
    assert {"history", "memory", "parallel", "slice"} <= set(images), skipped
    for path in images.values():
        with Image.open(path) as image:
            image.load()


# --- a real browser ----------------------------------------------------------------------------


def _chromium() -> str:
    """Debian's chromium, installed here when running as root (CI), else the test is skipped."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("chromium is not installed and cannot be installed here (needs root and apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
        if done.returncode != 0:
            pytest.skip(f"could not install chromium: {' '.join(command)}: {done.stderr.strip()[-300:]}")
    return shutil.which("chromium") or pytest.skip("apt-get installed chromium but it is not on PATH")


@pytest.fixture(scope="module")
def chromium() -> str:
    return _chromium()


def _browse(chromium: str, url: str, out: Path, *, budget_ms: int = 0, dump_dom: bool = False):
    """Open `url` headless: screenshot to `out`; returns (DOM or "", chromium's log with console lines)."""
    args = [
        chromium,
        "--headless",
        "--no-sandbox",  # root in a container has no user namespace for the sandbox
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--hide-scrollbars",
        f"--user-data-dir={out.parent / (out.stem + '-profile')}",
        "--window-size=1400,1000",
        "--enable-logging=stderr",
        "--v=0",
    ]
    if budget_ms:
        # Lets a JavaScript app fetch and render before the shot; the clock is virtual, so it is fast.
        args.append(f"--virtual-time-budget={budget_ms}")
    screenshot = subprocess.run(
        [*args, f"--screenshot={out}", url], capture_output=True, text=True, timeout=120, check=False
    )
    assert screenshot.returncode == 0 and out.is_file(), screenshot.stderr[-2000:]
    dom = ""
    if dump_dom:
        dumped = subprocess.run(
            [*args, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=False
        )
        assert dumped.returncode == 0, dumped.stderr[-2000:]
        dom = dumped.stdout
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        shutil.copy(out, Path(SCREENSHOTS) / out.name)
    return dom, screenshot.stderr


def _console_lines(log: str) -> list[str]:
    # Chromium writes every console message of the page to its log as "...:CONSOLE..." lines.
    return [line for line in log.splitlines() if ":CONSOLE" in line]


def _not_blank(path: Path) -> int:
    with Image.open(path) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    return len(colours) if colours is not None else 1 << 20


@pytest.mark.slow
def test_the_report_page_renders_in_a_headless_browser_without_console_errors(swept, chromium, tmp_path):
    page = swept / "mlruns" / "reports" / "tiny" / "index.html"
    shot = tmp_path / "report_page.png"
    dom, log = _browse(chromium, page.as_uri(), shot, dump_dom=True)
    assert _not_blank(shot) > 50  # text and plots: far more than one background colour
    assert _console_lines(log) == []
    assert "Sweep report: tiny" in dom and dom.count("<img") == len(PNGS)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _search_runs(base: str, experiment_id: str) -> list[dict]:
    request = urllib.request.Request(
        f"{base}/api/2.0/mlflow/runs/search",
        data=json.dumps({"experiment_ids": [experiment_id], "max_results": 100}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response).get("runs", [])


@pytest.mark.slow
def test_the_mlflow_ui_of_sweep_ui_lists_the_parent_and_child_runs(swept, chromium, tmp_path):
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    experiment_id = _client(swept).get_experiment_by_name("tiny").experiment_id
    server = subprocess.Popen(
        [sys.executable, "-m", "sweeps.cli", "ui", "--port", str(port)],
        cwd=swept,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        # The server's job runner (seven more processes importing MLflow) runs no part of listing runs;
        # test_faults stops `sweep ui` with it on.
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                runs = _search_runs(base, experiment_id)
                break
            except OSError:
                assert server.poll() is None, "sweep ui exited before serving"
                assert time.monotonic() < deadline, "sweep ui did not answer within 90 s"
                time.sleep(0.5)
        names = {run["info"]["run_name"] for run in runs}
        assert names == {"sweep-tiny", "trial-0", "trial-1", "trial-2", "trial-3"}
        shot = tmp_path / "mlflow_ui.png"
        # The runs table is drawn by JavaScript after its own API calls; the API answer above is the
        # check of what it lists, the shot shows that the page itself loads and draws.
        _, log = _browse(chromium, f"{base}/#/experiments/{experiment_id}/runs", shot, budget_ms=15000)
        assert _not_blank(shot) > 50
        assert not [line for line in _console_lines(log) if "Uncaught" in line]
    finally:
        os.killpg(server.pid, 15)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, 9)
            server.wait()
