"""Gang trials (issue 13): a trial trained by `workers.gpus_per_trial` processes together.

The fast tests cover the config fields, the preflight checks against the visible GPUs, and how the
executor ends a gang whose ranks fail or die and keeps one whose trials end well (fake ranks). The
slow ones train on CPU, a gang of two gloo processes with FSDP2: the acceptance test, where the
gang's processes train trial after trial, each on the loss curve of the one-process trial with the
same global batch, with one MLflow child run per trial; a rank that dies mid-trial, after which a
fresh gang trains on as the first did; and pruning.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from core.config import parse_config
from core.errors import InputError
from core.store import Store
from core.trial import TrialParams, TrialResult, TrialStatus
from runners.gang import distributed_arguments
from sweeps.executors.base import ExecutorCrashed, Finished, Lost, TrialJob
from sweeps.executors.gang import GangExecutor, gang_devices
from tests.test_bad_inputs import error_line, line_of, no_trial_ran, sweep
from tests.test_config import VALID

FILE = Path("spaces/x.yaml")
GANG = "workers:\n  gpus_per_trial: 2\n"
PRUNER = "pruner:\n  type: median\n  eval_every_steps: 2\n"


def error_for(text: str, file: Path = FILE) -> InputError:
    with pytest.raises(InputError) as caught:
        parse_config(text, file)
    return caught.value


# -- config ---------------------------------------------------------------------------------------


def test_a_trial_runs_on_one_gpu_unless_the_config_asks_for_a_gang():
    config = parse_config(VALID, FILE)
    assert config.workers.gpus_per_trial == 1
    assert config.distributed.effective_strategy == "fsdp"
    assert config.distributed.offload is False and config.distributed.allow_cpu is False


@pytest.mark.parametrize(
    ("extra", "field", "words"),
    [
        ("workers:\n  gpus_per_trial: 0\n", "workers.gpus_per_trial", "greater than or equal to 1"),
        ("workers:\n  gpus_per_trial: true\n", "workers.gpus_per_trial", "not the boolean true"),
        ("workers:\n  gpus_per_trial: 1.5\n", "workers.gpus_per_trial", "valid integer"),
        (GANG + "distributed:\n  strategy: zero1\n", "distributed.strategy", "'zero2', 'zero3' or 'fsdp'"),
        (GANG + "distributed:\n  offload: maybe\n", "distributed.offload", "valid boolean"),
        (GANG + "distributed:\n  shard: yes\n", "distributed.shard", "allowed: strategy, offload"),
        ("distributed:\n  strategy: zero3\n", "distributed", "gang trials only"),
        ("workers:\n  gpus_per_trial: 2\n  count: 2\n", "workers.count", "does not apply to gang"),
        ("workers:\n  gpus_per_trial: 2\n  pack: 4\n", "workers.pack", "not packed"),
        (GANG + "distributed:\n  config_file: ds.json\n", "distributed.config_file", "file not found"),
    ],
)
def test_a_bad_gang_setting_is_one_error_at_its_line(extra, field, words):
    text = VALID + extra
    error = error_for(text)
    assert error.field == field
    assert words in error.message
    key = field.rsplit(".", 1)[-1]
    assert error.line == max(n for n, line in enumerate(text.splitlines(), 1) if line.strip().startswith(key))


@pytest.mark.parametrize(
    "objective",
    [
        "name: gsm8k\n  eval_file: g.jsonl\n  num_fewshot: 0",
        "name: ndcg\n  eval_file: r.jsonl",
        "name: rouge_l",
        "name: lm_eval\n  task: arc_easy\n  metric: acc",
    ],
)
def test_a_gang_with_a_pruner_refuses_every_objective_but_eval_loss(objective):
    text = VALID.replace("name: eval_loss", objective) + GANG + PRUNER
    error = error_for(text)
    assert error.field == "pruner.type"
    assert f"pruned on objective eval_loss only, not {objective.split()[1]}" in error.message
    assert error.line == text.splitlines().index("  type: median") + 1


def test_a_gang_with_a_pruner_on_eval_loss_is_accepted():
    config = parse_config(VALID + GANG + PRUNER, FILE)
    assert config.workers.gpus_per_trial == 2
    assert (config.pruner.type, config.pruner.eval_every_steps) == ("median", 2)


def test_a_deepspeed_json_decides_the_strategy(tmp_path):
    (tmp_path / "ds_z3.json").write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    config = parse_config(VALID + GANG + "distributed:\n  config_file: ds_z3.json\n", tmp_path / "x.yaml")
    assert config.distributed.config_file == (tmp_path / "ds_z3.json").resolve()
    assert config.distributed.effective_strategy == "zero3"
    assert config.distributed.file_settings == {"zero_optimization": {"stage": 3}}


def test_an_accelerate_yaml_gives_its_fsdp_settings_to_the_trainer(tmp_path):
    (tmp_path / "fsdp.yaml").write_text(
        "distributed_type: FSDP\nfsdp_config:\n  fsdp_reshard_after_forward: false\n  fsdp_offload_params: true\n"
    )
    config = parse_config(VALID + GANG + "distributed:\n  config_file: fsdp.yaml\n", tmp_path / "x.yaml")
    assert config.distributed.effective_strategy == "fsdp"
    arguments = distributed_arguments(config, on_gpu=False)
    # transformers drops the fsdp_ prefix of accelerate's key names itself, but reads offload from cpu_offload.
    assert arguments["fsdp_config"] == {
        "version": 2,
        "fsdp_reshard_after_forward": False,
        "fsdp_offload_params": True,
        "cpu_offload": True,
    }


def test_an_accelerate_yamls_offload_reaches_the_trainers_fsdp_plugin(tmp_path):
    from transformers import TrainingArguments

    (tmp_path / "fsdp.yaml").write_text("distributed_type: FSDP\nfsdp_config:\n  fsdp_offload_params: true\n")
    config = parse_config(VALID + GANG + "distributed:\n  config_file: fsdp.yaml\n", tmp_path / "x.yaml")
    arguments = distributed_arguments(config, on_gpu=False)
    # Without ddp_backend: the plugin's settings, not a process group, are under test.
    trainer_args = TrainingArguments(
        output_dir=str(tmp_path / "out"), use_cpu=True, fsdp=True, fsdp_config=arguments["fsdp_config"]
    )
    assert trainer_args._process_fsdp_args()["cpu_offload"] is True


@pytest.mark.parametrize(
    ("name", "content", "words"),
    [
        ("ds.json", json.dumps({"zero_optimization": {"stage": 1}}), "stage 2 or 3"),
        ("ds.json", "{not json", "not valid JSON"),
        ("acc.yaml", "distributed_type: MULTI_GPU\n", "allowed: FSDP, DEEPSPEED"),
        ("ds.toml", "", "must be a DeepSpeed .json or an accelerate config .yaml"),
    ],
)
def test_a_config_file_the_gang_cannot_use_is_named(tmp_path, name, content, words):
    (tmp_path / name).write_text(content)
    text = VALID + GANG + f"distributed:\n  config_file: {name}\n"
    error = error_for(text, tmp_path / "x.yaml")
    assert error.field == "distributed.config_file" and words in error.message
    assert error.line == len(text.splitlines())


@pytest.mark.parametrize(
    ("files", "name", "words"),
    [
        ({"d.json": None}, "d.json", "d.json is a folder, not a file"),
        ({}, "''", "is a folder, not a file"),
        ({"e.json": ""}, "e.json", "e.json is empty"),
        (
            {"z.json": json.dumps({"zero_optimization": [3]})},
            "z.json",
            "zero_optimization must be a JSON object",
        ),
        ({"n.json": json.dumps({"train_batch_size": 8})}, "n.json", "n.json: no zero_optimization section"),
        ({"a.yaml": ""}, "a.yaml", "a.yaml is empty"),
        (
            {"a.yaml": "- distributed_type: FSDP\n"},
            "a.yaml",
            "must be a YAML mapping (an accelerate config), not a list",
        ),
        ({"a.yaml": "num_processes: 2\n"}, "a.yaml", "a.yaml has no distributed_type"),
        ({"a.yaml": "a: [\n"}, "a.yaml", "a.yaml is not valid YAML at line 2: expected the node content"),
        ({"a.yaml": "distributed_type: DEEPSPEED\n"}, "a.yaml", "deepspeed_config.zero_stage is None"),
        (
            {"a.yaml": "distributed_type: FSDP\nfsdp_config:\n  fsdp_version: 1\n"},
            "a.yaml",
            "gangs train with FSDP2",
        ),
    ],
)
def test_a_config_file_that_is_a_folder_empty_or_of_the_wrong_shape_says_which(tmp_path, files, name, words):
    for file, content in files.items():
        (tmp_path / file).mkdir() if content is None else (tmp_path / file).write_text(content)
    text = VALID + GANG + f"distributed:\n  config_file: {name}\n"
    error = error_for(text, tmp_path / "x.yaml")
    assert error.field == "distributed.config_file" and words in error.message
    assert error.line == len(text.splitlines()) and "\n" not in error.message


@pytest.mark.parametrize(
    ("nested", "words"),
    [
        ("ds.json", "deepspeed_config_file: file not found"),
        ("sub.json", "sub.json is a folder, not a file"),
        ("5", "deepspeed_config_file must be a file path, not 5"),
        ("[x]", "deepspeed_config_file must be a file path, not ['x']"),
        ("acc.yaml", "deepspeed_config_file must name a DeepSpeed .json"),  # itself: no endless recursion
    ],
)
def test_a_bad_deepspeed_config_file_named_by_an_accelerate_yaml_is_one_error_not_a_traceback(
    tmp_path, nested, words
):
    (tmp_path / "sub.json").mkdir()
    (tmp_path / "acc.yaml").write_text(
        f"distributed_type: DEEPSPEED\ndeepspeed_config:\n  deepspeed_config_file: {nested}\n"
    )
    error = error_for(VALID + GANG + "distributed:\n  config_file: acc.yaml\n", tmp_path / "x.yaml")
    assert error.field == "distributed.config_file" and words in error.message


def test_a_config_file_under_the_home_folder_is_looked_for_there(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    text = VALID + GANG + "distributed:\n  config_file: ~/ds.json\n"
    config = parse_config(text, tmp_path / "spaces" / "x.yaml")
    assert config.distributed.config_file == (tmp_path / "home" / "ds.json").resolve()


def test_a_config_file_and_a_strategy_are_not_both_allowed(tmp_path):
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    text = VALID + GANG + "distributed:\n  strategy: zero3\n  config_file: ds.json\n"
    error = error_for(text, tmp_path / "x.yaml")
    assert error.field == "distributed.config_file" and "remove distributed.strategy" in error.message


def test_a_cpu_gang_trains_with_fsdp2_over_gloo_and_zero_gets_a_deepspeed_config():
    fsdp = parse_config(VALID + GANG + "distributed:\n  allow_cpu: true\n", FILE)
    assert distributed_arguments(fsdp, on_gpu=False) == {
        "use_cpu": True,
        "ddp_backend": "gloo",
        "fsdp": True,
        "fsdp_config": {"version": 2, "cpu_offload": False},
    }
    zero3 = parse_config(VALID + GANG + "distributed:\n  strategy: zero3\n  offload: true\n", FILE)
    arguments = distributed_arguments(zero3, on_gpu=True)
    assert set(arguments) == {"deepspeed"}
    assert arguments["deepspeed"]["zero_optimization"]["stage"] == 3
    assert arguments["deepspeed"]["zero_optimization"]["offload_param"] == {"device": "cpu"}


def test_the_visible_gpus_are_split_into_consecutive_gangs():
    assert gang_devices(["0", "1", "2", "3"], 2) == [["0", "1"], ["2", "3"]]
    assert gang_devices(["4", "5", "6", "7"], 4) == [["4", "5", "6", "7"]]
    assert gang_devices([], 2) == [[]]  # a CPU gang (distributed.allow_cpu)


# -- preflight, through `sweep run` ---------------------------------------------------------------


def gang_yaml(write_config, extra: str = "", training: str = "") -> Path:
    return write_config(
        space="learning_rate: {type: categorical, choices: [0.01]}",
        training=f"method: full\nmax_steps: 4\nper_device_batch_size: 4\ncutoff_len: 48\n{training}",
        extra=extra,
    )


@pytest.mark.parametrize(
    ("visible", "extra", "field", "words"),
    [
        ("0,1", "workers:\n  gpus_per_trial: 4", "workers.gpus_per_trial", "only 2 are visible"),
        ("0,1,2", GANG, "workers.gpus_per_trial", "does not divide the 3 visible GPUs"),
        ("", GANG, "workers.gpus_per_trial", "no GPU is visible; set distributed.allow_cpu"),
    ],
)
def test_a_gang_that_does_not_fit_the_visible_gpus_stops_before_any_trial(
    write_config, project, monkeypatch, visible, extra, field, words
):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    config = gang_yaml(write_config, extra)
    line = error_line(sweep("run", config, "--trials", 1))
    assert f"{config}:{line_of(config, 'gpus_per_trial')}: {field}: " in line
    assert words in line
    assert no_trial_ran(project)


def test_a_cpu_gang_of_more_processes_than_cores_stops_before_any_trial(write_config, monkeypatch):
    import os

    from sweeps.preflight import check_gangs

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    extra = "workers:\n  gpus_per_trial: 99999999999999999999999\ndistributed:\n  allow_cpu: true"
    config = parse_config(gang_yaml(write_config, extra).read_text(), FILE)
    with pytest.raises(InputError) as caught:
        check_gangs(config, [])
    assert caught.value.field == "workers.gpus_per_trial"
    assert (
        "this machine has 4 CPU cores; a CPU gang (distributed.allow_cpu) takes at most 4"
        in caught.value.message
    )
    check_gangs(
        parse_config(gang_yaml(write_config, GANG + "distributed:\n  allow_cpu: true").read_text(), FILE), []
    )


def test_offload_in_a_cpu_gang_stops_before_any_trial(write_config, project, tmp_path):
    from sweeps.preflight import check_gangs

    config = gang_yaml(write_config, GANG + "distributed:\n  allow_cpu: true\n  offload: true")
    with pytest.raises(InputError) as caught:
        check_gangs(parse_config(config.read_text(), config), [])
    assert caught.value.field == "distributed.offload" and "no GPU is visible" in caught.value.message
    (project / "fsdp.yaml").write_text("distributed_type: FSDP\nfsdp_config:\n  fsdp_offload_params: true\n")
    config = gang_yaml(write_config, GANG + "distributed:\n  allow_cpu: true\n  config_file: fsdp.yaml")
    with pytest.raises(InputError) as caught:
        check_gangs(parse_config(config.read_text(), config), [])
    assert caught.value.field == "distributed.config_file"
    check_gangs(parse_config(config.read_text(), config), ["0", "1"])  # on GPUs it is what offload is for


def test_zero3_with_qlora_stops_before_any_trial(write_config, project, monkeypatch):
    # Checked before QLoRA's own need for CUDA, so a CPU machine reports it too.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    config = gang_yaml(write_config, GANG + "distributed:\n  strategy: zero3")
    config.write_text(config.read_text().replace("method: full", "method: qlora"))
    line = error_line(sweep("run", config, "--trials", 1))
    assert f"{config}:{line_of(config, 'strategy: zero3')}: distributed.strategy: zero3 shards" in line
    assert "training.method" in line
    assert no_trial_ran(project)


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is not None, reason="DeepSpeed is installed")
def test_zero2_without_deepspeed_installed_stops_before_any_trial(write_config, project, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    config = gang_yaml(write_config, GANG + "distributed:\n  strategy: zero2")
    line = error_line(sweep("run", config, "--trials", 1))
    assert "distributed.strategy: zero2 needs DeepSpeed: pip install deepspeed" in line
    assert no_trial_ran(project)


def test_the_workers_option_does_not_apply_to_gangs(write_config, project):
    config = gang_yaml(write_config, GANG + "distributed:\n  allow_cpu: true")
    line = error_line(sweep("run", config, "--trials", 1, "--workers", 2))
    assert "workers.gpus_per_trial: gang trials run on their own; --workers does not apply" in line
    assert no_trial_ran(project)


# -- how the executor ends a gang, and keeps it ------------------------------------------------------

# What every fake rank starts with: `next_job()` is the folder of the trial whose job file path the
# executor sends on the rank's stdin (None once the executor closed the pipe); `write` writes a file
# atomically, as a rank does, so the executor never reads half a result.
FAKE_RANK = """\
import json, os, pathlib, signal, sys, time

def next_job():
    line = sys.stdin.readline().strip()
    return pathlib.Path(line).parent if line else None

def write(path, text):
    path.with_name(path.name + ".partial").write_text(text)
    path.with_name(path.name + ".partial").rename(path)
"""


def fake_ranks(monkeypatch, scripts: list[str]) -> None:
    """Start rank r as `python -c FAKE_RANK + scripts[r]` instead of a trainer."""
    import os

    def command(self, rank, devices, port):
        return [sys.executable, "-c", FAKE_RANK + textwrap.dedent(scripts[rank])], dict(os.environ)

    monkeypatch.setattr(GangExecutor, "_rank_command", command)


def gang_executor(tmp_path: Path, write_config, extra: str = "") -> GangExecutor:
    config = parse_config(
        gang_yaml(write_config, GANG + "distributed:\n  allow_cpu: true\n" + extra).read_text(),
        tmp_path / "g.yaml",
    )
    return GangExecutor(config, Store(tmp_path / "mlruns"), [[]], lambda *step: None)


def run_job(executor: GangExecutor, tmp_path: Path, number: int) -> list:
    """Submit trial `number` and wait (at most 30 s) for how it ended."""
    job = TrialJob(
        number=number,
        trial_id=number,
        params=TrialParams(),
        run_id="r",
        work_dir=str(tmp_path / f"t{number}"),
    )
    executor.submit(job)
    started = time.monotonic()
    events = []
    while not events and time.monotonic() - started < 30:
        events = executor.wait(timeout=1)
    return events


def run_one_job(tmp_path: Path, write_config) -> list:
    executor = gang_executor(tmp_path, write_config)
    events = run_job(executor, tmp_path, 3)
    executor.close()
    return events


FAILED_ON_RANK_1 = TrialResult(
    status=TrialStatus.FAILED, error="OutOfMemoryError: boom", peak_memory_mb=123.0, failure_kind="oom"
)
WAITS_FOR_EVER = "time.sleep(600)"


def answers(rank: int, dies_on: int | None = None) -> str:
    """A fake rank that completes every trial sent to it (rank 0 with objective 0.5), its pid in the
    result's metrics, until its pipe closes; on trial `dies_on` it kills itself instead.
    """
    return f"""
        while (folder := next_job()) is not None:
            if json.loads((folder / "job.json").read_text())["number"] == {dies_on!r}:
                os.kill(os.getpid(), signal.SIGKILL)
            result = {{"status": "COMPLETE", "objective": 0.5, "metrics": {{"pid": float(os.getpid())}}}}
            write(folder / "result-rank{rank}.json", json.dumps(result))
    """


def test_a_rank_that_fails_its_trial_fails_it_with_its_own_error_and_memory(
    tmp_path, write_config, monkeypatch
):
    fails = f"""
        write(next_job() / "result-rank1.json", {FAILED_ON_RANK_1.model_dump_json()!r})
        sys.exit(1)
    """
    fake_ranks(monkeypatch, [WAITS_FOR_EVER, fails])
    started = time.monotonic()
    [event] = run_one_job(tmp_path, write_config)
    assert time.monotonic() - started < 20  # rank 0, blocked in its collective, was stopped
    assert isinstance(event, Finished) and event.number == 3
    assert event.result.status == TrialStatus.FAILED and event.result.failure_kind == "oom"
    assert event.result.error == "rank 1 of 2: OutOfMemoryError: boom"
    assert event.result.peak_memory_mb == 123.0


def test_a_rank_that_dies_loses_the_trial_so_the_loop_retries_it(tmp_path, write_config, monkeypatch):
    fake_ranks(monkeypatch, [WAITS_FOR_EVER, "os.kill(os.getpid(), signal.SIGKILL)"])
    [event] = run_one_job(tmp_path, write_config)
    assert isinstance(event, Lost) and event.number == 3
    assert "rank 1 of the trial's gang of 2 died (exit code -9)" in event.reason
    assert str(tmp_path / "t3" / "gang" / "rank1.log") in event.reason


def test_a_bug_on_one_rank_crashes_the_sweep_and_stops_the_gang(tmp_path, write_config, monkeypatch):
    bug = """
        write(next_job() / "crash-rank1.txt", "Traceback ...\\nAttributeError: no such thing")
        sys.exit(1)
    """
    fake_ranks(monkeypatch, [WAITS_FOR_EVER, bug])
    executor = gang_executor(tmp_path, write_config)
    with pytest.raises(ExecutorCrashed, match="rank 1 of trial 3:\nTraceback ...\nAttributeError"):
        run_job(executor, tmp_path, 3)
    assert executor.gangs[0].ranks is None  # rank 0 was stopped before the crash was raised
    executor.close()


def test_a_gang_whose_ranks_all_end_well_reports_rank_0s_result(tmp_path, write_config, monkeypatch):
    fake_ranks(monkeypatch, [answers(0), answers(1)])
    [event] = run_one_job(tmp_path, write_config)
    assert isinstance(event, Finished) and event.result.objective == 0.5


def test_a_gang_that_ends_its_trials_well_trains_the_next_in_the_same_processes(
    tmp_path, write_config, monkeypatch
):
    fake_ranks(monkeypatch, [answers(0), answers(1)])
    executor = gang_executor(tmp_path, write_config)
    events = [event for number in range(3) for event in run_job(executor, tmp_path, number)]
    processes = executor.gangs[0].ranks
    assert [e.number for e in events] == [0, 1, 2] and all(isinstance(e, Finished) for e in events)
    assert {e.result.metrics["pid"] for e in events} == {float(processes[0].pid)}
    executor.close()
    # Closed between trials: each rank saw its pipe end and left on its own, not by a signal.
    assert [process.returncode for process in processes] == [0, 0]


def test_after_a_rank_dies_the_next_trial_runs_on_a_fresh_gang(tmp_path, write_config, monkeypatch):
    fake_ranks(monkeypatch, [answers(0), answers(1, dies_on=1)])
    executor = gang_executor(tmp_path, write_config)
    [first] = run_job(executor, tmp_path, 0)
    old = executor.gangs[0].ranks
    [lost] = run_job(executor, tmp_path, 1)
    assert isinstance(lost, Lost) and "rank 1 of the trial's gang of 2 died (exit code -9)" in lost.reason
    assert executor.gangs[0].ranks is None
    assert old[0].returncode is not None  # rank 0, left waiting for rank 1, was stopped with it
    [after] = run_job(executor, tmp_path, 2)
    assert isinstance(after, Finished) and after.result.metrics["pid"] != first.result.metrics["pid"]
    assert executor.gangs[0].ranks[0].pid == after.result.metrics["pid"]
    executor.close()


def test_a_rank_that_died_between_trials_is_replaced_with_its_whole_gang(tmp_path, write_config, monkeypatch):
    fake_ranks(monkeypatch, [answers(0), answers(1)])
    executor = gang_executor(tmp_path, write_config)
    [first] = run_job(executor, tmp_path, 0)
    old = executor.gangs[0].ranks
    old[1].kill()
    old[1].wait()
    [after] = run_job(executor, tmp_path, 1)
    assert isinstance(after, Finished) and after.result.metrics["pid"] != first.result.metrics["pid"]
    assert old[0].returncode is not None
    executor.close()


def test_a_deepspeed_gang_is_started_afresh_for_every_trial(tmp_path, write_config, monkeypatch):
    fake_ranks(monkeypatch, [answers(0), answers(1)])
    executor = gang_executor(tmp_path, write_config, "  strategy: zero2\n")
    [first] = run_job(executor, tmp_path, 0)
    assert executor.gangs[0].ranks is None  # closed once its trial ended
    [second] = run_job(executor, tmp_path, 1)
    assert first.result.metrics["pid"] != second.result.metrics["pid"]
    executor.close()


def test_closing_on_an_interrupt_ends_a_training_gang_at_once(tmp_path, write_config, monkeypatch):
    fake_ranks(monkeypatch, [WAITS_FOR_EVER, WAITS_FOR_EVER])
    executor = gang_executor(tmp_path, write_config)
    executor.submit(
        TrialJob(number=0, trial_id=0, params=TrialParams(), run_id="r", work_dir=str(tmp_path / "t0"))
    )
    assert executor.wait(timeout=0.5) == []
    processes = executor.gangs[0].ranks
    started = time.monotonic()
    executor.close(interrupted=True)
    assert time.monotonic() - started < 5
    assert [process.returncode for process in processes] == [-15, -15]  # SIGTERM, no grace waited for


# -- pruning: rank 0 decides, every rank stops ---------------------------------------------------


class Broadcast:
    """`torch.distributed.broadcast_object_list` for ranks called one after another in this process.

    The rank named by `rank` calls next: rank 0's objects are sent, any other rank receives them.
    """

    def __init__(self):
        self.rank = 0
        self.sent: list = []

    def __call__(self, objects: list, src: int = 0) -> None:
        assert src == 0
        if self.rank == 0:
            self.sent.append(list(objects))
        else:
            objects[:] = self.sent[-1]


def deciding_gang(monkeypatch, rank_0_says: bool):
    """Rank 0's and rank 1's `report`, as `rank_0_decides` makes them, and the reports rank 0 was given."""
    from runners.gang import Rank, rank_0_decides

    broadcast = Broadcast()
    monkeypatch.setattr("torch.distributed.broadcast_object_list", broadcast)
    reported: list[tuple[float, int]] = []

    def rank_0_report(value: float, step: int) -> bool:
        reported.append((value, step))
        return rank_0_says

    def rank_1_report(value: float, step: int) -> bool:
        raise AssertionError("a rank other than 0 has no Optuna trial to report to")

    decide_0 = rank_0_decides(rank_0_report, Rank(0, 2, 0))
    decide_1 = rank_0_decides(rank_1_report, Rank(1, 2, 1))

    def on_rank(rank: int, value: float, step: int) -> bool:
        broadcast.rank = rank
        return (decide_0 if rank == 0 else decide_1)(value, step)

    return on_rank, reported


@pytest.mark.parametrize("rank_0_says", [False, True])
def test_every_rank_of_a_gang_gets_rank_0s_pruning_decision(monkeypatch, rank_0_says):
    on_rank, _ = deciding_gang(monkeypatch, rank_0_says)
    assert on_rank(0, 1.5, 2) is rank_0_says
    assert on_rank(1, 1.5, 2) is rank_0_says


def test_only_rank_0_reports_the_intermediate_value_to_the_pruner(monkeypatch):
    on_rank, reported = deciding_gang(monkeypatch, rank_0_says=True)
    for step in (2, 4):
        on_rank(0, 3.0 - step / 4, step)
        on_rank(1, 3.0 - step / 4, step)
    assert reported == [(2.5, 2), (2.0, 4)]


# -- acceptance: a 2-process gloo gang against the 1-process trial ------------------------------------


# Why 1e-4: both runs see the same rows in every optimizer step (the gang's two ranks take halves
# of the global batch of 8), the loss is normalised by the global count of reply tokens in either
# case (transformers' average_tokens_across_devices), and FSDP2 reduce-scatters float32 gradients.
# What differs is the order of the float32 sums, which moved the losses by at most 9e-8 relative
# here (full fine-tuning and LoRA alike); 1e-4 leaves room for that rounding to grow over more steps
# or other hardware, while ranks that each train alone on their half batch (what transformers does
# on CPU without use_cpu) moved the curve by 1e-2, and a batch mixed up or averaged wrongly would too.
RTOL = 1e-4


@dataclass(frozen=True)
class RankLog:
    """What a rank's log in a trial's folder says of the process that trained it (`_RankTrainer.run`)."""

    pid: int
    trials: int
    """The trial's place among this process's trials: 1 for a fresh gang."""
    base_loads: int
    """Times the process had read the base from disk before the trial."""
    holds_last_model: bool


def rank_logs(trial: int) -> list[RankLog]:
    """Rank 0's and rank 1's lines of trial `trial` of the sweep "tiny"."""
    pattern = (
        r"pid (\d+): trial \d+, this process's trial (\d+); base loads (\d+); "
        r"last trial's model in memory: (True|False)"
    )
    logs = []
    for rank in (0, 1):
        text = Path(f"mlruns/trials/tiny/trial-{trial}/gang/rank{rank}.log").read_text()
        pid, trials, loads, holds = re.search(pattern, text).groups()
        logs.append(RankLog(int(pid), int(trials), int(loads), holds == "True"))
    return logs


def train_losses(client, run) -> list[float]:
    return [
        m.value
        for m in sorted(client.get_metric_history(run.info.run_id, "train_loss"), key=lambda m: m.step)
    ]


def trained_alone(runner, params: TrialParams, folder: Path) -> tuple[TrialResult, list[float]]:
    """The trial in this one process, and its train_loss by step."""
    from runners.sft import TrialCallbacks

    losses: dict[int, float] = {}

    def on_log(metrics: dict[str, float], step: int) -> None:
        if "train_loss" in metrics:
            losses[step] = metrics["train_loss"]

    result = runner.run(params, folder, TrialCallbacks(on_log=on_log))
    return result, [losses[step] for step in sorted(losses)]


@pytest.mark.slow
@pytest.mark.usefixtures("mlflow_db")
def test_a_two_process_gang_trains_trial_after_trial_on_the_loss_curve_of_one_process_with_the_same_batch(
    write_config, monkeypatch
):
    from runners.sft import TrialRunner

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    config = write_config(
        space="method: {type: categorical, choices: [full, lora]}",
        training="learning_rate: 0.01\nmax_steps: 4\nper_device_batch_size: 4\ncutoff_len: 48",
        extra="sampler: {type: grid}\n" + GANG + "distributed:\n  allow_cpu: true",
    )
    config.write_text(config.read_text().replace("sampler:\n  type: random\n  seed: 0\n", ""))
    result = sweep("run", config, "--trials", 2)
    assert result.exit_code == 0, result.output

    client = MlflowClient(f"sqlite:///{Path('mlruns/mlflow.db').resolve()}")
    experiment = client.get_experiment_by_name("tiny").experiment_id
    children = [r for r in client.search_runs([experiment]) if r.data.tags.get("sweep.role") == "trial"]
    assert sorted(int(c.data.tags["optuna.trial_number"]) for c in children) == [0, 1]  # one run a trial

    baseline = TrialRunner(parse_config(config.read_text(), config))
    for child in children:
        method = child.data.params["method"]
        assert child.info.status == "FINISHED" and child.data.tags["optuna.state"] == "COMPLETE"
        gang_curve = [m.value for m in client.get_metric_history(child.info.run_id, "train_loss")]
        params = TrialParams(
            method=method, learning_rate=0.01, max_steps=4, per_device_batch_size=8, cutoff_len=48
        )
        alone, curve = trained_alone(baseline, params, Path(f"alone-{method}"))
        assert len(gang_curve) == len(curve) == 4
        assert gang_curve == pytest.approx(curve, rel=RTOL), (method, gang_curve, curve)
        metrics = child.data.metrics
        assert metrics["objective"] == pytest.approx(alone.objective, rel=RTOL)
        assert metrics["train_tokens"] == alone.train_tokens  # the gang's tokens, counted over both ranks
        assert metrics["gang_size"] == 2
        # FSDP2 really sharded: rank 0 held about half of the weights while training.
        assert 0.4 < metrics["gang_shard_fraction"] < 0.6
        # The gang's figure is its largest: rank 0's after scoring, or any rank's in training.
        assert metrics["peak_memory_mb"] >= max(
            metrics["peak_memory_mb_rank0"], metrics["peak_memory_mb_rank1"]
        )
        artifact = "model" if method == "full" else "adapter"
        names = {Path(a.path).name for a in client.list_artifacts(child.info.run_id, artifact)}
        assert names & {"adapter_model.safetensors", "model.safetensors"}

    # One gang trained both trials: the same two processes, the base read from disk once in each,
    # and the first trial's (sharded) model gone before the second began. The grid deals LoRA first,
    # so the full fine-tuning trial's curve above shows it began from the base as loaded, not from
    # a model the LoRA trial wrapped and FSDP2 sharded in the same process.
    from tests.test_faults import by_number

    assert by_number(children)[0].data.params["method"] == "lora"
    first, second = rank_logs(0), rank_logs(1)
    assert [log.pid for log in first] == [log.pid for log in second]
    assert [(log.trials, log.base_loads) for log in second] == [(2, 1), (2, 1)]
    assert not any(log.holds_last_model for log in second)


# Why 1e-6 between the trials of one gang: each is the same computation, on the same rows in the
# same order, from the same weights and seed; a process's earlier trial changes nothing of it (the
# base is a fresh copy, accelerate's state is reset by each Trainer, the process group is the same
# two processes). Measured here: equal to the last bit. 1e-6 lets through a kernel that sums in
# another order on other hardware; what reuse could break (weights left from the trial before,
# random state drawn differently) moves the curve far more: each of its three steps moves it 4-6%.
SAME_GANG_RTOL = 1e-6


@pytest.mark.slow
@pytest.mark.usefixtures("mlflow_db")
def test_after_a_gang_rank_dies_mid_trial_the_next_trial_trains_on_a_fresh_gang(write_config, monkeypatch):
    from tests.test_faults import by_number
    from tests.test_sweep import runs, trial_states

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    start_rank = GangExecutor._rank_command

    def rank_1_dies_in_trial_1(self, rank, devices, port):
        command, env = start_rank(self, rank, devices, port)
        if rank == 1:  # only rank 1: rank 0 is left waiting for it in a collective
            env["SWEEP_FAULTS"] = "1:sigkill@1"
        return command, env

    monkeypatch.setattr(GangExecutor, "_rank_command", rank_1_dies_in_trial_1)
    config = write_config(
        space="learning_rate: {type: categorical, choices: [0.01]}",  # every trial the same
        training="method: full\nmax_steps: 3\nper_device_batch_size: 4\ncutoff_len: 48",
        extra=GANG + "distributed:\n  allow_cpu: true",
    )
    result = sweep("run", config, "--trials", 3)
    assert result.exit_code == 0, result.output

    # Trial 1 died on the gang's second trial; trial 2 (its retry) and 3 ran on a fresh gang.
    assert trial_states("tiny") == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    parent, children = runs("tiny")
    children = by_number(children)
    assert parent.info.status == "FINISHED" and parent.data.metrics["worker_restarts"] == 1
    assert [children[n].info.status for n in range(4)] == ["FINISHED", "FAILED", "FINISHED", "FINISHED"]
    assert "rank 1 of the trial's gang of 2 died (exit code -9)" in children[1].data.tags["error"]
    logs = {n: rank_logs(n) for n in range(4)}
    pids = {n: [log.pid for log in logs[n]] for n in logs}
    assert pids[0] == pids[1] and pids[2] == pids[3]
    assert not set(pids[1]) & set(pids[2])
    assert [log.trials for log in logs[2] + logs[3]] == [1, 1, 2, 2]

    # The same trial thrice, on a fresh gang's first trial (0, 2) and on its second (3): one curve.
    client = MlflowClient(f"sqlite:///{Path('mlruns/mlflow.db').resolve()}")
    curves = {n: train_losses(client, children[n]) for n in (0, 2, 3)}
    assert len(curves[0]) == 3
    assert curves[2] == pytest.approx(curves[0], rel=SAME_GANG_RTOL), curves
    assert curves[3] == pytest.approx(curves[2], rel=SAME_GANG_RTOL), curves
    objectives = [children[n].data.metrics["objective"] for n in (0, 2, 3)]
    assert objectives == pytest.approx([objectives[0]] * 3, rel=SAME_GANG_RTOL)


@pytest.mark.slow
@pytest.mark.usefixtures("mlflow_db")
def test_a_gang_trial_the_pruner_stops_ends_pruned_on_every_rank_at_rank_0s_step(write_config, monkeypatch):
    import optuna

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    # A median pruner from the first complete trial on. The grid (sampler seed 0) deals 1e-2 first,
    # and at step 2 the learning rate 1e-6 has barely moved the random model's eval loss: pruned.
    config = write_config(
        space="learning_rate: {type: categorical, choices: [1.0e-6, 1.0e-2]}",
        training="method: full\nmax_steps: 4\nper_device_batch_size: 4\ncutoff_len: 48",
        extra="sampler: {type: grid}\n"
        + GANG
        + "distributed:\n  allow_cpu: true\n"
        + "pruner: {type: median, n_startup_trials: 1, eval_every_steps: 2, eval_samples: 8}",
    )
    config.write_text(config.read_text().replace("sampler:\n  type: random\n  seed: 0\n", ""))
    result = sweep("run", config, "--trials", 2)
    assert result.exit_code == 0, result.output

    journal = optuna.storages.journal.JournalFileBackend("mlruns/optuna/tiny.journal")
    study = optuna.load_study(study_name="tiny", storage=optuna.storages.JournalStorage(journal))
    complete, pruned = study.trials  # --trials 2: a pruned trial counts as finished
    assert (complete.state.name, complete.params["learning_rate"]) == ("COMPLETE", 1e-2)
    assert (pruned.state.name, pruned.params["learning_rate"]) == ("PRUNED", 1e-6)
    [(step, value)] = pruned.intermediate_values.items()
    assert step == 2 and value > complete.intermediate_values[2]

    client = MlflowClient(f"sqlite:///{Path('mlruns/mlflow.db').resolve()}")
    found = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert sorted(r.info.status for r in found) == ["FINISHED"] * 3  # the parent and both trials
    [run] = [r for r in found if r.data.tags.get("optuna.trial_number") == "1"]
    assert (run.data.tags["optuna.state"], run.data.tags["sweep.status"]) == ("PRUNED", "PRUNED")
    assert run.data.metrics["pruned_at_step"] == 2 and run.data.metrics["objective"] == value
    curve = client.get_metric_history(run.info.run_id, "intermediate_objective")
    assert [(m.step, m.value) for m in curve] == [(2, value)]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2]
    assert run.data.metrics["gang_size"] == 2 and "peak_memory_mb_rank1" in run.data.metrics
    assert not client.list_artifacts(run.info.run_id, "model")  # a pruned trial is not saved

    # Rank 1 stopped at rank 0's step too, having scored the same forwards, and exited cleanly.
    rank_1 = Path("mlruns/trials/tiny/trial-1/gang/result-rank1.json")
    other = TrialResult.model_validate_json(rank_1.read_text())
    assert other.status == TrialStatus.PRUNED and other.metrics["pruned_at_step"] == 2
    assert other.objective == pytest.approx(value, rel=RTOL)
