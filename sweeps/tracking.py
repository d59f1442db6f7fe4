"""MLflow records: one parent run a sweep, one nested child run a trial.

Runs are driven through `MlflowClient` with explicit run ids rather than the fluent
`mlflow.start_run` stack, so every run's status is set exactly once, by us: FINISHED, FAILED or
KILLED, never left RUNNING.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from core.config import SweepConfig
from core.trial import TrialParams, TrialResult

_BATCH = 200

# MLflow 3's experiment kind; the UI opens a "custom_model_development" ("Machine learning")
# experiment on its runs, where an untagged one may be taken for GenAI and open on traces.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def resolve_uri(uri: str) -> str:
    """A tracking URI with a relative SQLite path made absolute, and a patient SQLite lock wait.

    MLflow caches one store per URI string for the life of the process, so a relative
    `sqlite:///mlruns/mlflow.db` would keep pointing at the first project used. Several processes
    (the loop, its workers) write to one SQLite file; sqlite3's default 5 s wait for the write
    lock fails under load with "database is locked", so the wait is raised to 60 s.
    """
    if not uri.startswith("sqlite:///"):
        return uri
    path, _, query = uri.removeprefix("sqlite:///").partition("?")
    if not path.startswith("/"):
        path = str(Path(path).resolve())
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    if "timeout=" not in query:
        query = f"{query}&timeout=60" if query else "timeout=60"
    return f"sqlite:///{path}?{query}"


def _chunks(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class SweepTracker:
    """Writes a sweep and its trials to MLflow; reopens the same parent run when a sweep resumes."""

    def __init__(self, config: SweepConfig):
        self.config = config
        self.tracking_uri = resolve_uri(config.tracking.uri)
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        self._datasets: list[DatasetInput] | None = None
        self.experiment_id = self._experiment()
        self.parent_id: str | None = None
        self._pending: dict[str, list[Metric]] = {}

    def _experiment(self) -> str:
        name = self.config.experiment_name
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            if EXPERIMENT_KIND_TAG not in found.tags:  # made before the kind was set, or by hand
                self.client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
            return found.experiment_id
        location = Path(self.config.tracking.artifact_location).resolve()
        location.mkdir(parents=True, exist_ok=True)
        return self.client.create_experiment(
            name, artifact_location=location.as_uri(), tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
        )

    def dataset_inputs(self) -> list[DatasetInput]:
        """The train and eval data as MLflow dataset inputs, read once per tracker."""
        if self._datasets is None:
            self._datasets = dataset_inputs(self.config)
        return self._datasets

    def monitor_system(self, run_id: str) -> SystemMetrics | None:
        """Start MLflow's system metrics monitor on a trial's run, when `tracking.system_metrics` says so."""
        if not system_metrics_on(self.config):
            return None
        monitor = SystemMetrics(run_id, self.tracking_uri, self.config.tracking.system_metrics_interval)
        monitor.start()
        return monitor

    def find_parent(self) -> str | None:
        """The parent run of this sweep from an earlier invocation, if any."""
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`sweep.study` = '{self.config.name}' and tags.`sweep.role` = 'parent'",
            max_results=1,
        )
        return runs[0].info.run_id if runs else None

    def open_sweep(self) -> str:
        """Start the sweep's parent run, or reopen it when the sweep resumes."""
        existing = self.find_parent()
        if existing is not None:
            self.parent_id = existing
            self.client.update_run(existing, status="RUNNING")
            # Logged again on resume: MLflow keeps one input per dataset digest, and a changed
            # file shows up as a second dataset.
            self.client.log_inputs(existing, datasets=self.dataset_inputs())
            return existing
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"sweep-{self.config.name}",
            tags={"sweep.study": self.config.name, "sweep.role": "parent"},
        )
        self.parent_id = run.info.run_id
        cfg = self.config
        params = {
            "model": cfg.model.name_or_path,
            "objective": cfg.objective.name,
            "direction": cfg.direction,
            "sampler": cfg.sampler.type,
            "pruner": cfg.pruner.type,
            "budget.trials": cfg.budget.trials,
            "space": ",".join(cfg.space),
            **{f"fixed.{key}": value for key, value in cfg.fixed_params().items()},
        }
        self.client.log_batch(self.parent_id, params=[Param(k, str(v)) for k, v in params.items()])
        self.client.log_inputs(self.parent_id, datasets=self.dataset_inputs())
        if cfg.source.is_file():
            self.client.log_artifact(self.parent_id, str(cfg.source), "config")
        return self.parent_id

    def close_stale_children(
        self, keep: set[str], reason: str = "the process running this trial died"
    ) -> int:
        """Close child runs left RUNNING by a dead process, as KILLED; returns how many.

        `keep` holds the runs of trials still running in a live process (another `sweep run` of
        the same sweep), which are left alone.
        """
        stale = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{self.parent_id}' and attributes.status = 'RUNNING'",
        )
        closed = 0
        for run in stale:
            if run.info.run_id in keep:
                continue
            self.kill_trial(run.info.run_id, reason)
            closed += 1
        return closed

    def start_trial(self, number: int, params: TrialParams, sampled: dict[str, Any]) -> str:
        """Open the child run of trial `number` with every parameter it trains with."""
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"trial-{number}",
            tags={
                "mlflow.parentRunId": self.parent_id,
                "sweep.study": self.config.name,
                "sweep.role": "trial",
                "optuna.trial_number": str(number),
                "optuna.state": "RUNNING",
                "sweep.sampled": ",".join(sampled),
            },
        )
        run_id = run.info.run_id
        self.client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.model_dump().items()])
        self.client.log_inputs(run_id, datasets=self.dataset_inputs())
        return run_id

    def run_of_trial(self, number: int) -> str | None:
        """The child run of trial `number` under this sweep's parent, if one was opened."""
        found = self.client.search_runs(
            [self.experiment_id],
            filter_string=(
                f"tags.`mlflow.parentRunId` = '{self.parent_id}' and tags.`optuna.trial_number` = '{number}'"
            ),
            max_results=1,
        )
        return found[0].info.run_id if found else None

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        """Queue step metrics (the loss curve); written in batches, not one request a step."""
        now = int(time.time() * 1000)
        pending = self._pending.setdefault(run_id, [])
        pending.extend(Metric(key, value, now, step) for key, value in metrics.items())
        if len(pending) >= _BATCH:
            self.flush(run_id)

    def flush(self, run_id: str) -> None:
        for chunk in _chunks(self._pending.pop(run_id, []), 1000):
            self.client.log_batch(run_id, metrics=chunk)

    def discard_pending(self, run_id: str) -> None:
        """Drop the step metrics queued for `run_id` and not yet written.

        For a trial that restarts from its first step: written, they would be a second curve over
        the same steps as its rerun's.
        """
        self._pending.pop(run_id, None)

    def end_trial(self, run_id: str, result: TrialResult) -> str | None:
        """Log the result, attach the adapter (or the traceback), close the run; returns the adapter's URI."""
        self.flush(run_id)
        now = int(time.time() * 1000)
        summary: dict[str, float] = {
            **result.metrics,
            "time_load_s": result.timings.load_s,
            "time_train_s": result.timings.train_s,
            "time_eval_s": result.timings.eval_s,
            "time_total_s": result.timings.total_s,
            "train_tokens": float(result.train_tokens),
            "train_tokens_per_s": result.train_tokens_per_s,
        }
        if result.objective is not None:
            summary["objective"] = result.objective
        if result.peak_memory_mb is not None:
            summary["peak_memory_mb"] = result.peak_memory_mb
        tags = [
            RunTag("optuna.state", result.status.optuna_state),
            RunTag("sweep.status", result.status.value),
        ]
        if result.memory_kind:
            tags.append(RunTag("peak_memory_kind", result.memory_kind))
        if result.error:
            tags.append(RunTag("error", result.error[:5000]))
        self.client.log_batch(
            run_id, metrics=[Metric(k, float(v), now, 0) for k, v in summary.items()], tags=tags
        )
        if result.traceback:
            self.client.log_text(run_id, result.traceback, "error.txt")
        adapter_uri = None
        if result.adapter_path and self.config.tracking.log_adapter:
            local = Path(result.adapter_path)
            self.client.log_artifacts(run_id, str(local), local.name)
            adapter_uri = f"{self.client.get_run(run_id).info.artifact_uri}/{local.name}"
            shutil.rmtree(local, ignore_errors=True)
        self.client.set_terminated(run_id, status=result.status.mlflow_status)
        return adapter_uri

    def attach(self, parent_id: str) -> None:
        """Write trials under a parent run opened by another process (the orchestrator)."""
        self.parent_id = parent_id

    def fail_run(self, run_id: str, reason: str) -> None:
        """Close a trial's run as FAILED from outside its process (its worker died)."""
        self.client.set_tag(run_id, "optuna.state", "FAIL")
        self.client.set_tag(run_id, "error", reason)
        self.client.set_terminated(run_id, status="FAILED")

    def kill_trial(self, run_id: str, reason: str) -> None:
        """Close a trial's run as KILLED (interrupted), keeping the curve it logged so far."""
        self.flush(run_id)
        self.client.set_tag(run_id, "optuna.state", "FAIL")
        self.client.set_tag(run_id, "error", reason)
        self.client.set_terminated(run_id, status="KILLED")

    def summarise(
        self, counts: dict[str, int], best: dict[str, Any] | None, extra: dict[str, float] | None = None
    ) -> None:
        """Record the sweep's standing on the parent run: counts, best value and params."""
        now = int(time.time() * 1000)
        metrics = [Metric(f"n_{state.lower()}", float(n), now, 0) for state, n in counts.items()]
        metrics += [Metric(key, float(value), now, 0) for key, value in (extra or {}).items()]
        tags = []
        if best is not None:
            metrics.append(Metric("best_value", float(best["value"]), now, 0))
            tags.append(RunTag("best.trial_number", str(best["number"])))
            tags.append(RunTag("best.params", json.dumps(best["params"], sort_keys=True)))
            tags += [RunTag(f"best.{key}", str(value)) for key, value in best["params"].items()]
        self.client.log_batch(self.parent_id, metrics=metrics, tags=tags)

    def close_sweep(self, status: str) -> None:
        """FINISHED after a normal end, KILLED when interrupted, FAILED when the sweep gave up."""
        self.client.set_terminated(self.parent_id, status=status)


def _digest(examples) -> str:
    """A short fingerprint of the conversations a split holds (what the model sees, not the bytes)."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update(json.dumps(example.messages, sort_keys=True).encode())
        digest.update(b"\0" if not example.last_turn_only else b"\1")
    return digest.hexdigest()[:12]


def dataset_inputs(config: SweepConfig) -> list[DatasetInput]:
    """The train and eval splits as MLflow dataset inputs: name, digest, source (the file), rows.

    The context tag (`training` / `eval`, and `objective` for an objective's own eval file) is
    what the UI's Dataset column shows beside the name. A held-out eval split names the train file
    as its source, with the split in its name.
    """
    from mlflow.data.dataset_source_registry import get_dataset_source_from_json
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    from core.rows import load_splits

    data = config.data
    splits = load_splits(data)
    entries = {split: data.entry(split) for split in ("train", "eval")}
    eval_source = data.eval_file or data.train_file
    named = {
        "train": entries["train"].name if entries["train"] else Path(data.train_file).name,
        "eval": (
            entries["eval"].name
            if entries["eval"]
            else Path(data.eval_file).name
            if data.eval_file
            else f"{Path(data.train_file).name} (held-out {data.eval_split:g}, seed {data.seed})"
        ),
    }
    inputs = []
    for split, examples, source, context in (
        ("train", splits.train, data.train_file, "training"),
        ("eval", splits.eval, eval_source, "eval"),
    ):
        source_json = json.dumps({"uri": str(Path(source).resolve())})
        dataset = MetaDataset(
            get_dataset_source_from_json(source_json, "local"), name=named[split], digest=_digest(examples)
        )
        fields = dataset.to_dict()
        entity = Dataset(
            name=fields["name"],
            digest=fields["digest"],
            source_type=fields["source_type"],
            source=fields["source"],
            profile=json.dumps({"num_rows": len(examples), "format": data.row_format(split)[0]}),
        )
        inputs.append(DatasetInput(entity, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)]))
    scored = config.objective.eval_file
    if scored and scored.endswith((".json", ".jsonl")) and Path(scored).is_file():
        # The rows the objective scores trials on (gsm8k, ndcg): what decides the ranking.
        raw = Path(scored).read_bytes()
        lines = [line for line in raw.splitlines() if line.strip()]
        rows = len(json.loads(raw)) if scored.endswith(".json") else len(lines)
        entity = Dataset(
            name=Path(scored).name,
            digest=hashlib.sha256(raw).hexdigest()[:12],
            source_type="local",
            source=json.dumps({"uri": str(Path(scored).resolve())}),
            profile=json.dumps({"num_rows": rows, "objective": config.objective.name}),
        )
        inputs.append(DatasetInput(entity, tags=[InputTag(MLFLOW_DATASET_CONTEXT, "objective")]))
    return inputs


def system_metrics_on(config: SweepConfig) -> bool:
    """`tracking.system_metrics`: true, false, or auto (on when a CUDA GPU is visible)."""
    setting = config.tracking.system_metrics
    if setting != "auto":
        return bool(setting)
    import torch

    return torch.cuda.is_available()


class SystemMetrics:
    """MLflow's `SystemMetricsMonitor` on one trial run: CPU, RAM, disk, network, and GPU with pynvml.

    MLflow's monitor drops the samples of its last, unfinished interval when stopped, so a trial
    shorter than one interval would have none; `stop` logs them as a last point.
    """

    def __init__(self, run_id: str, tracking_uri: str, interval_s: float):
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        # The monitor says "Started/Stopped monitoring" at INFO for every trial.
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
        self.monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, tracking_uri=tracking_uri)

    def start(self) -> None:
        self.monitor.start()

    def stop(self) -> None:
        monitor = self.monitor
        monitor.finish()
        try:
            monitor.collect_metrics()
            monitor.publish_metrics(monitor.aggregate_metrics())
            monitor.mlflow_logger.flush()
        except Exception as exc:  # noqa: BLE001 - a lost sample never fails a trial
            logging.getLogger(__name__).warning("last system metrics sample not logged: %s", exc)


def save_servable(
    model,
    tokenizer,
    path: Path,
    example_prompt: str,
    base_model_path: str | None = None,
    prompt_template: str | None = None,
    max_new_tokens: int = 256,
    mlflow_model=None,
) -> Path:
    """Save `model` as an MLflow transformers-flavor model folder that `mlflow.pyfunc` and
    `mlflow models serve` load (text generation; `max_new_tokens` etc. as predict params).

    A peft model needs `base_model_path`, the base model's local folder: the folder then holds the
    adapter alone and loads it onto that base. Without it MLflow 3.17 saves the peft-wrapped weights
    as a plain model, and loading leaves the base weights uninitialised. Requirements are given,
    not inferred: inference imports torchvision, which this project does not install.
    `prompt_template` (MLflow's, `{prompt}` for the input text) wraps every input before generation
    and makes predictions the reply alone; `mlflow_model` is the logged model's MLmodel to fill in.
    """
    import mlflow.transformers
    from mlflow.models import infer_signature

    params = {"max_new_tokens": max_new_tokens, "do_sample": False}
    # A template whose text starts with the BOS token already holds it; the pipeline's tokenizer
    # would add a second one, which the model never saw in training or scoring.
    bos = tokenizer.bos_token
    starts_with_bos = bool(prompt_template and bos and prompt_template.startswith(bos))
    # With a local folder as the model's name, MLflow's model card and license look-ups on the Hub
    # fail at once (a path is no repo id) and warn on every save; nothing is fetched either way.
    mlflow_logger = logging.getLogger("mlflow.transformers")
    level = mlflow_logger.level
    mlflow_logger.setLevel(logging.ERROR)
    try:
        mlflow.transformers.save_model(
            transformers_model={"model": model, "tokenizer": tokenizer},
            path=str(path),
            task="text-generation",
            mlflow_model=mlflow_model,
            signature=infer_signature([example_prompt], ["an answer"], params=params),
            pip_requirements=["torch", "transformers", "accelerate", *(["peft"] if base_model_path else [])],
            base_model_path=base_model_path,
            prompt_template=prompt_template,
            model_config={"add_special_tokens": False} if starts_with_bos else None,
        )
    finally:
        mlflow_logger.setLevel(level)
    return path


def chat_prompt_template(tokenizer) -> str:
    """MLflow's `prompt_template` for a chat model: one user turn rendered with the tokenizer's chat
    template, the input text as its content, followed by the assistant's generation prompt.

    So a served model gets plain text, as `predict(["question"])` sends it, in the form it was
    trained on. Braces of the rendered template are doubled: MLflow fills it in with `str.format`.
    """
    marker = "\x00sweep-prompt\x00"
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": marker}], tokenize=False, add_generation_prompt=True
    )
    return rendered.replace("{", "{{").replace("}", "}}").replace(marker, "{prompt}")


def log_servable(
    client: MlflowClient,
    experiment_id: str,
    run_id: str,
    name: str,
    model,
    tokenizer,
    example_prompt: str,
    prompt_template: str | None = None,
    max_new_tokens: int = 256,
    scratch: Path | None = None,
):
    """Log `model` as an MLflow 3 logged model `name`, an output of run `run_id`: the folder
    `save_servable` writes (weights as safetensors), uploaded to the model's artifact location.

    Returns the `LoggedModel`, READY; FAILED in MLflow (and the error raised) when anything on the
    way fails. Driven through `client` like every other record here: `mlflow.transformers.log_model`
    would log through the process-wide tracking URI and active experiment instead. The folder is
    first written under `scratch` (default: the system's temporary folder), then copied.
    """
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model

    logged = client.create_logged_model(
        experiment_id, name=name, source_run_id=run_id, model_type="text-generation"
    )
    try:
        with tempfile.TemporaryDirectory(dir=scratch, prefix=".servable-") as tmp:
            folder = save_servable(
                model,
                tokenizer,
                Path(tmp) / "model",
                example_prompt,
                prompt_template=prompt_template,
                max_new_tokens=max_new_tokens,
                mlflow_model=Model(
                    artifact_path=logged.artifact_location,
                    model_uuid=logged.model_id,
                    run_id=run_id,
                    model_id=logged.model_id,
                ),
            )
            client.log_model_artifacts(logged.model_id, str(folder))
        client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
    except BaseException:
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    return client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
