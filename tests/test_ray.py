"""The Ray backend: the same trials, the same MLflow structure, on a local Ray."""

from __future__ import annotations

import importlib.util
import signal
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from core.config import parse_config
from core.errors import InputError
from sweeps.executors.ray import actor_gpus, check_placement, ray_slots, start_ray
from tests.test_bad_inputs import line_of, no_trial_ran
from tests.test_config import VALID
from tests.test_sweep import runs, sweep, trial_states

pytestmark = [
    # Looked up, not imported: importing Ray takes seconds of every run's collection, fast tier included.
    pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray is not installed"),
    pytest.mark.usefixtures("mlflow_db"),
]


@pytest.mark.slow
def test_a_ray_sweep_records_the_same_structure_as_the_local_backend(write_config):
    config = write_config(extra="backend: ray\nray: {num_cpus: 2, num_gpus: 0, cpus_per_trial: 1}")
    result = sweep("run", config, "--trials", 3)
    assert result.exit_code == 0, result.output
    assert trial_states("tiny") == ["COMPLETE"] * 3
    parent, children = runs("tiny")
    assert parent.info.status == "FINISHED" and parent.data.metrics["n_complete"] == 3
    assert sorted(int(c.data.tags["optuna.trial_number"]) for c in children) == [0, 1, 2]
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert {"objective", "eval_loss", "peak_memory_mb", "time_train_s", "train_tokens_per_s"} <= set(
            child.data.metrics
        )
    best = sweep("best", config)
    assert best.exit_code == 0 and "file://" in best.output


@pytest.mark.slow
def test_the_sweeps_pruner_prunes_ray_trials_and_leaves_no_run_running(write_config):
    config = write_config(
        space="learning_rate: {type: float, low: 1.0e-6, high: 3.0e-2, log: true}",
        training="max_steps: 12\nper_device_batch_size: 8\ncutoff_len: 48\nmethod: full",
        extra=(
            "backend: ray\nray: {num_cpus: 2, num_gpus: 0, cpus_per_trial: 1}\n"
            "pruner: {type: hyperband, min_resource: 1, reduction_factor: 2, eval_every_steps: 2, eval_samples: 8}"
        ),
    )
    result = sweep("run", config, "--trials", 4)
    assert result.exit_code == 0, result.output
    states = trial_states("tiny")
    assert len(states) == 4 and set(states) <= {"COMPLETE", "PRUNED"} and "COMPLETE" in states
    parent, children = runs("tiny")
    assert parent.info.status == "FINISHED"
    assert all(c.info.status == "FINISHED" for c in children)
    pruned = [c for c in children if c.data.tags["optuna.state"] == "PRUNED"]
    assert len(pruned) == states.count("PRUNED")


RAY = "backend: ray\nray: {num_cpus: 2, num_gpus: 0, cpus_per_trial: 1}"


@pytest.mark.slow
def test_on_ray_an_orphaned_trial_is_closed_and_the_failure_budget_stops_the_sweep(
    write_config, project, monkeypatch
):
    import os
    import subprocess
    import sys

    import optuna

    config = write_config(
        space="learning_rate: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}",
        training="max_steps: 2\nper_device_batch_size: 8\ncutoff_len: 48",
        # One trial at a time, so the budget is met exactly (with two, the second slot's trial runs on).
        extra=(
            "backend: ray\nray: {num_cpus: 2, num_gpus: 0, cpus_per_trial: 1, max_concurrent_trials: 1}\n"
            "budget: {max_failed_trials: 2}"
        ),
    )
    # A trial left RUNNING by a sweep process that died (kill -9) before this one started.
    (project / "mlruns" / "optuna").mkdir(parents=True)
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend("mlruns/optuna/tiny.journal")
    )
    orphan = optuna.create_study(study_name="tiny", storage=storage).ask()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan.set_user_attr("host", os.uname().nodename)
    orphan.set_user_attr("pid", dead.pid)

    # Trial 0 is the orphan; every trial after it fails (the orphan's retry first).
    monkeypatch.setenv("SWEEP_FAULTS", ",".join(f"{n}:raise@1" for n in range(1, 6)))
    result = sweep("run", config, "--trials", 5)
    assert result.exit_code == 1, result.output
    assert "2 trials failed in this run (budget.max_failed_trials = 2)" in result.output
    assert trial_states("tiny") == ["FAIL", "FAIL", "FAIL"]  # the orphan closed, then two failures
    parent, children = runs("tiny")
    assert parent.info.status == "FAILED"
    assert [c.info.status for c in children] == ["FAILED", "FAILED"]
    assert all("injected failure at step 1" in c.data.tags["error"] for c in children)


@pytest.mark.slow
def test_on_ray_an_oom_trial_is_retried_at_half_the_batch_and_a_dead_actors_trial_is_retried(
    write_config, monkeypatch
):
    monkeypatch.setenv("SWEEP_FAULTS", "0:oom@1,1:sigkill@1")
    config = write_config(
        space="learning_rate: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}",
        training="max_steps: 3\nper_device_batch_size: 8\ncutoff_len: 48",
        extra=RAY,
    )
    result = sweep("run", config, "--trials", 2)
    assert result.exit_code == 0, result.output
    from tests.test_faults import by_number, trials

    history = trials("tiny")
    assert [t.state.name for t in history[:2]] == ["FAIL", "FAIL"]
    assert sorted(t.state.name for t in history[2:]) == ["COMPLETE", "COMPLETE"]
    retries = {t.user_attrs["retry_of"]: t for t in history[2:]}
    assert set(retries) == {0, 1}
    assert all(retries[n].params == history[n].params for n in (0, 1))
    parent, children = runs("tiny")
    children = by_number(children)
    assert parent.info.status == "FINISHED" and parent.data.metrics["worker_restarts"] == 1
    assert children[0].info.status == "FAILED" and "OutOfMemoryError" in children[0].data.tags["error"]
    assert children[1].info.status == "FAILED" and children[1].data.tags["error"].startswith("Ray actor died")
    halved = children[retries[0].number].data.params
    assert (halved["per_device_batch_size"], halved["gradient_accumulation_steps"]) == ("4", "2")
    assert all(children[t.number].info.status == "FINISHED" for t in history[2:])


# -- gang trials on Ray ---------------------------------------------------------------------------

RAY_GANG = "backend: ray\nworkers:\n  gpus_per_trial: 2\n"


def test_on_ray_a_gang_actor_reserves_the_gangs_gpus_and_a_cpu_for_each_rank():
    config = parse_config(VALID + RAY_GANG, Path("x.yaml"))
    assert (config.ray.gpus_per_trial, config.ray.cpus_per_trial) == (2, 2)
    agreeing = parse_config(
        VALID + RAY_GANG + "ray:\n  gpus_per_trial: 2\n  cpus_per_trial: 6\n", Path("x.yaml")
    )
    assert (agreeing.ray.gpus_per_trial, agreeing.ray.cpus_per_trial) == (2, 6)


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (
            RAY_GANG + "ray:\n  gpus_per_trial: 1\n",
            "is 1, but a gang trial takes workers.gpus_per_trial = 2 GPUs",
        ),
        (
            RAY_GANG + "ray:\n  gpus_per_trial: 0\n",
            "is 0, but a gang trial takes workers.gpus_per_trial = 2 GPUs",
        ),
        ("backend: ray\nray:\n  gpus_per_trial: 2\n", "2 GPUs an actor, but trials train on one GPU"),
    ],
)
def test_a_ray_gpu_count_that_contradicts_the_trials_is_one_error_at_its_line(extra, words):
    text = VALID + extra
    with pytest.raises(InputError) as caught:
        parse_config(text, Path("x.yaml"))
    assert caught.value.field == "ray.gpus_per_trial"
    assert words in caught.value.message
    assert caught.value.line == len(text.splitlines())


def test_ray_slots_count_the_gangs_each_node_holds():
    config = parse_config(VALID + RAY_GANG, Path("x.yaml"))
    assert ray_slots(config, [{"CPU": 32, "GPU": 8}]) == 4
    assert ray_slots(config, [{"CPU": 16, "GPU": 3}, {"CPU": 16, "GPU": 3}]) == 2  # not 6 // 2
    assert ray_slots(config, [{"CPU": 16, "GPU": 8}, {"CPU": 16}]) == 4  # a CPU-only head holds none
    assert actor_gpus(config, [{"CPU": 32, "GPU": 8}]) == 2


def test_on_a_ray_cluster_without_gpus_a_gang_actor_takes_none_and_a_cpu_a_rank():
    config = parse_config(VALID + RAY_GANG, Path("x.yaml"))
    assert actor_gpus(config, [{"CPU": 4}]) == 0
    assert ray_slots(config, [{"CPU": 4}]) == 2


def test_a_gang_actor_no_ray_node_has_the_cpus_for_is_one_error_not_a_wait_for_ever():
    config = parse_config(VALID + RAY_GANG, Path("x.yaml"))
    with pytest.raises(InputError) as caught:
        check_placement(config, [{"CPU": 1.0}])
    assert caught.value.field == "ray.cpus_per_trial"
    assert "takes 2 CPUs, but no Ray node has that many (at most 1)" in caught.value.message


def test_a_trial_actor_no_ray_node_has_the_gpus_for_is_one_error_not_a_wait_for_ever():
    config = parse_config(VALID + "backend: ray\nray: {gpus_per_trial: 1}\n", Path("x.yaml"))
    with pytest.raises(InputError) as caught:
        check_placement(config, [{"CPU": 8.0}])
    assert caught.value.field == "ray.gpus_per_trial"
    assert "takes 1 GPUs and 1 CPUs, but no Ray node has both (GPUs a node: 0)" in caught.value.message


def test_starting_ray_keeps_the_sweeps_sigterm_handler(monkeypatch):
    def handler(signum, frame):
        raise KeyboardInterrupt

    def init(**kwargs):  # as ray.init does: a SIGTERM handler of its own
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))

    monkeypatch.setitem(sys.modules, "ray", SimpleNamespace(init=init))
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        start_ray(parse_config(VALID, Path("x.yaml")), None)
        assert signal.getsignal(signal.SIGTERM) is handler
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_ray_address_with_no_cluster_is_one_error_at_its_line(monkeypatch):
    def init(**kwargs):
        raise ConnectionError("Could not find any running Ray instance.")

    monkeypatch.setitem(sys.modules, "ray", SimpleNamespace(init=init))
    text = VALID + "backend: ray\nray: {address: auto}\n"
    with pytest.raises(InputError) as caught:
        start_ray(parse_config(text, Path("x.yaml")), None)
    assert caught.value.field == "ray.address"
    assert "cannot join Ray at auto: Could not find any running Ray instance." in caught.value.message
    assert caught.value.line == len(text.splitlines())


# Two local Ray CPUs hold one CPU gang of two ranks: trials one after another, as the 2-core machine
# of these tests can train them.
CPU_GANG = "backend: ray\nray: {num_cpus: 2, num_gpus: 0}\nworkers: {gpus_per_trial: 2}\ndistributed: {allow_cpu: true}"
GANG_TRAINING = "max_steps: 2\nper_device_batch_size: 4\ncutoff_len: 48"


def sweep_cpu_gangs(write_config, monkeypatch, trials: int) -> None:
    """`sweep run --trials N` of CPU gang trials on a local Ray, which must end well."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    config = write_config(
        space="learning_rate: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}",
        training=GANG_TRAINING,
        extra=CPU_GANG,
    )
    result = sweep("run", config, "--trials", trials)
    assert result.exit_code == 0, result.output


@pytest.mark.slow
def test_a_ray_sweep_of_cpu_gangs_records_one_child_run_a_trial(write_config, monkeypatch):
    sweep_cpu_gangs(write_config, monkeypatch, trials=2)
    assert trial_states("tiny") == ["COMPLETE", "COMPLETE"]
    parent, children = runs("tiny")
    assert parent.info.status == "FINISHED" and parent.data.metrics["n_complete"] == 2
    assert sorted(int(c.data.tags["optuna.trial_number"]) for c in children) == [0, 1]
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.metrics["gang_size"] == 2
        assert child.data.metrics["train_tokens"] > 0


@pytest.mark.slow
def test_on_ray_a_gang_rank_that_dies_loses_the_trial_and_its_actor_retries_it(write_config, monkeypatch):
    monkeypatch.setenv("SWEEP_FAULTS", "0:sigkill@1")  # every rank of trial 0 kills itself at step 1
    sweep_cpu_gangs(write_config, monkeypatch, trials=1)
    assert trial_states("tiny") == ["FAIL", "COMPLETE"]
    parent, children = runs("tiny")
    from tests.test_faults import by_number

    children = by_number(children)
    assert parent.info.status == "FINISHED" and parent.data.metrics["worker_restarts"] == 1
    # The gang's own report, not Ray's: the actor outlived its ranks.
    assert children[0].info.status == "FAILED"
    assert "of the trial's gang of 2 died (exit code -9)" in children[0].data.tags["error"]
    assert children[1].info.status == "FINISHED" and children[1].data.metrics["gang_size"] == 2


@pytest.mark.slow
def test_a_gang_no_ray_node_can_hold_stops_before_any_trial(write_config, project):
    import ray

    config = write_config(
        training=GANG_TRAINING,
        extra="backend: ray\nray: {num_cpus: 2, num_gpus: 1}\nworkers:\n  gpus_per_trial: 2",
    )
    result = sweep("run", config, "--trials", 1)
    assert result.exit_code == 2, result.output
    # The last line: Ray, started to see the cluster, may have logged its own start before it.
    line = result.output.strip().splitlines()[-1]
    assert line.startswith(f"error: {config}:{line_of(config, 'gpus_per_trial')}: workers.gpus_per_trial: ")
    assert "2 GPUs a trial, but no Ray node has 2 (GPUs a node: 1); a gang trial runs within one node" in line
    assert no_trial_ran(project)
    assert not ray.is_initialized()
