"""Promote a trial to a deployable model: merge, check, optionally export GPTQ, register.

The best (or a named) complete trial's adapter is merged into the *unquantized* base: bf16 (fp16
when the config says so) on a GPU, the config's dtype or float32 on CPU. QLoRA trials too: their
4-bit base was only a training device, and merging into 4-bit weights would bake the quantization
error into the deltas. The merge is checked against base+adapter logits, then saved as a plain
Hugging Face folder (safetensors, tokenizer, chat template, generation config). A full fine-tuning
trial already holds full weights; it is re-saved the same way, with no merge.

`export="gptq"` adds a 4-bit, group-size-128 GPTQ copy calibrated on the sweep's own training
data, re-scored with the sweep's objective. The merged model is also logged to MLflow as a logged
model of the trial's run (transformers flavor, text generation through the chat template the trials
trained with), which `mlflow.pyfunc.load_model` and `mlflow models serve` load. Every promotion is a
new version of the registered model named after the sweep, made from that logged model, and the
alias `champion` moves to it. Folders are never overwritten.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import random
import shutil
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlflow
import optuna
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS
from optuna.trial import FrozenTrial, TrialState
from peft import PeftModel
from transformers import AutoModelForCausalLM

from core.config import ModelConfig, SweepConfig
from core.errors import InputError
from core.eval import EvalData, pad_right
from core.rows import Example, load_splits
from core.store import Store
from core.trial import TrialParams
from objectives.registry import load_objective
from runners.data import TokenizedCache, resolve_chat_template, tokenize_example
from runners.models import ModelCache, device
from sweeps.preflight import unwritable_reason
from sweeps.study import best_trial, load_study
from sweeps.tracking import chat_prompt_template, log_servable, resolve_uri

CHAMPION = "champion"
EXPORTS = ("gptq",)
# The logged model's name: `runs:/<trial run id>/merged` loads the latest promotion of that trial.
SERVABLE_NAME = "merged"

# Relative max-abs logit error allowed between the merged model and base+adapter. bf16 rounds the
# merged weight W + BA once more than the unmerged path does: across the 24 layers of a random-weight
# 0.5B-shaped model that came to 1.5-3.5% of the largest logit, so 5% passes honest merges and still
# catches a wrong scale or a missing adapter of any real size. fp32 has no such rounding: tight bound.
MERGE_TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}
_CHECK_ROWS = 4
_CHECK_TOKENS = 128


class MergeMismatch(RuntimeError):
    """The merged model's logits differ from base+adapter beyond the dtype's tolerance."""


@dataclass(frozen=True)
class GptqSettings:
    """What the GPTQ export quantizes to and calibrates on."""

    bits: int = 4
    group_size: int = 128
    symmetric: bool = True
    dampening_frac: float = 0.01
    ignore: tuple[str, ...] = ("lm_head",)
    num_samples: int = 256
    max_seq_len: int = 1024
    seed: int = 0


Sample = dict[str, list[int]]
# (merged model folder, calibration samples, settings, output folder): writes a quantized model
# folder. The seam between promotion and the GPTQ library, so everything around it runs on CPU.
Quantizer = Callable[[Path, list[Sample], GptqSettings, Path], None]


@dataclass
class Promotion:
    """What a promotion produced and where it was recorded."""

    sweep: str
    trial: int
    trial_value: float
    run_id: str
    method: str
    dtype: str
    merged_dir: Path
    merged_objective: float
    merged_bytes: int
    merge_error: float | None = None
    gptq_dir: Path | None = None
    gptq_objective: float | None = None
    gptq_bytes: int | None = None
    model_name: str = ""
    version: str = ""
    logged_model_id: str = ""

    @property
    def gptq_delta(self) -> float | None:
        """GPTQ objective minus the unquantized merge's (for eval_loss, positive is worse)."""
        if self.gptq_objective is None:
            return None
        return self.gptq_objective - self.merged_objective


def gptq_unavailable_reason() -> str | None:
    """Why a GPTQ export cannot run here, or None when it can; checked before anything loads."""
    if not torch.cuda.is_available():
        return (
            "export gptq needs a CUDA GPU (GPTQ calibrates layer by layer on it) and this machine has none; "
            "promote without --export here, or run it on a GPU"
        )
    if importlib.util.find_spec("llmcompressor") is None:
        return "export gptq needs llmcompressor, which is not installed (README, section Promote, has the install line)"
    return None


def promotion_dtype(model: ModelConfig, on_gpu: bool) -> str:
    """The dtype the base is loaded and merged in: never 4-bit, whatever the trial trained on."""
    if on_gpu:
        return "float16" if model.dtype == "float16" else "bfloat16"
    return "float32" if model.dtype == "auto" else model.dtype


def select_trial(study: optuna.Study, number: int | None, source: Path | str) -> FrozenTrial:
    """The trial to promote: `number`, which must be COMPLETE, else the study's best."""
    if number is None:
        best = best_trial(study)
        if best is None:
            raise InputError(source, f"study '{study.study_name}' has no complete trial yet to promote")
        return best
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    if number not in trials:
        known = f"0-{max(trials)}" if trials else "none"
        raise InputError(source, f"trial {number} does not exist (trials: {known})", "--trial")
    trial = trials[number]
    if trial.state != TrialState.COMPLETE:
        raise InputError(
            source, f"trial {number} is {trial.state.name}; only COMPLETE trials can be promoted", "--trial"
        )
    return trial


def default_output(config: SweepConfig, store: Store, trial_number: int) -> Path:
    """Where a promotion writes unless told otherwise: mlruns/promoted/<sweep>/trial-<N>."""
    return store.promoted / config.name / f"trial-{trial_number}"


def gptq_output(merged_dir: Path) -> Path:
    """The GPTQ export's folder: the merged folder's name plus `-gptq`, beside it."""
    return merged_dir.with_name(merged_dir.name + "-gptq")


def _ensure_free(folder: Path) -> None:
    if folder.exists():
        raise InputError(
            folder, "already exists; a promotion never overwrites a folder: pass --output NEW_FOLDER"
        )


def eval_data(
    config: SweepConfig, store: Store, tokenizer, examples: list[Example], template: str
) -> EvalData:
    """The objective's input outside a trial, tokenized exactly as trials were scored (shared cache)."""
    cache = TokenizedCache(store.tokenized)
    return EvalData(examples, cache.get(tokenizer, template, examples, config.objective.max_length), template)


def calibration_samples(
    train: list[Example], tokenizer, template: str, settings: GptqSettings
) -> list[Sample]:
    """GPTQ calibration inputs: a seeded sample of the train split, rendered with the sweep's template.

    Whole conversations (prompt and reply), tokenized the way training saw them, so the Hessians
    GPTQ builds reflect the activations the promoted model will actually get.
    """
    chosen = train
    if len(train) > settings.num_samples:
        chosen = random.Random(settings.seed).sample(train, settings.num_samples)
    samples = []
    for example in chosen:
        ids = tokenize_example(tokenizer, template, example)["input_ids"][: settings.max_seq_len]
        samples.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
    return samples


def gptq_recipe(settings: GptqSettings) -> dict[str, Any]:
    """Keyword arguments of llmcompressor's `GPTQModifier` for `settings` (plain data, no import)."""
    weights = {
        "num_bits": settings.bits,
        "type": "int",
        "symmetric": settings.symmetric,
        "strategy": "group",
        "group_size": settings.group_size,
    }
    return {
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}},
        "ignore": list(settings.ignore),
        "dampening_frac": settings.dampening_frac,
    }


def quantize_with_llmcompressor(
    model_dir: Path, samples: list[Sample], settings: GptqSettings, out_dir: Path
) -> None:
    """GPTQ with llmcompressor (CUDA): int4 weights, symmetric groups, written as compressed-tensors.

    llmcompressor rather than gptqmodel: its wheels are pure Python (no CUDA extension to build on
    the GPU host), it runs on the torch 2.10-2.14 this project uses (gptqmodel 7 needs >= 2.14.1),
    it is maintained with vLLM, which serves its output with Marlin kernels, and transformers loads
    that output through compressed-tensors. Imported here, lazily: the project runs without it.
    """
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier

    # Loaded on CPU on purpose: llmcompressor's sequential pipeline moves one layer at a time to
    # the GPU, so models larger than the card still quantize.
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    oneshot(
        model=model,
        processor=str(model_dir),
        dataset=Dataset.from_list(samples),
        recipe=GPTQModifier(**gptq_recipe(settings)),
        num_calibration_samples=len(samples),
        max_seq_length=settings.max_seq_len,
        shuffle_calibration_samples=False,
    )
    model.save_pretrained(out_dir, save_compressed=True)


def folder_bytes(folder: Path) -> int:
    """Size on disk of every file under `folder`."""
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def relative_logit_error(reference: torch.Tensor, other: torch.Tensor) -> float:
    """max |other - reference| / max |reference|: the merge check's measure."""
    scale = reference.abs().max().clamp_min(torch.finfo(torch.float32).tiny)
    return float((other - reference).abs().max() / scale)


def check_merge(reference: torch.Tensor, merged: torch.Tensor, dtype: str) -> float:
    """The measured relative logit error; raises `MergeMismatch` above the dtype's tolerance."""
    error = relative_logit_error(reference, merged)
    tolerance = MERGE_TOLERANCE[dtype]
    if not error <= tolerance:  # written so that a NaN error fails too
        raise MergeMismatch(
            f"merged model's logits differ from base+adapter by {error:.3g} "
            f"(max abs error / max abs logit; tolerance {tolerance:g} for {dtype}); nothing was saved"
        )
    return error


def _check_batch(data: EvalData, pad_id: int) -> dict[str, torch.Tensor]:
    rows = data.tokenized.dataset.select(range(min(_CHECK_ROWS, len(data.tokenized.dataset))))
    batch = pad_right([{"input_ids": row["input_ids"][:_CHECK_TOKENS]} for row in rows], pad_id)
    return {key: tensor.to(device()) for key, tensor in batch.items()}


@torch.no_grad()
def _logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    logits = model(**batch).logits.float()
    return logits[batch["attention_mask"].bool()]


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class _Context:
    """Everything a promotion needs that is read before any weight is loaded."""

    config: SweepConfig
    params: TrialParams
    artifact_dir: Path
    dtype: str
    model: ModelConfig
    tokenizer: Any
    template: str
    train: list[Example]
    evaluation: EvalData


def _full_objective(config: SweepConfig):
    """The sweep's objective over its whole eval set: trials may score a `max_samples` subset to
    save time, the model that ships is scored on everything."""
    return load_objective(config.objective.name)(config.objective.model_copy(update={"max_samples": None}))


def _merge_and_save(ctx: _Context, folder: Path) -> tuple[float | None, float]:
    """Build the promoted model, check it, score it, save it to `folder`: (merge error, objective).

    The model lives only inside this call, so its memory is free for GPTQ once it returns.
    """
    merge_error = None
    if ctx.params.is_adapter:
        peft_model = PeftModel.from_pretrained(ModelCache(ctx.model).base(quantized=False), ctx.artifact_dir)
        batch = _check_batch(ctx.evaluation, ctx.tokenizer.pad_token_id)
        reference = _logits(peft_model, batch)
        model = peft_model.merge_and_unload()
        merge_error = check_merge(reference, _logits(model, batch), ctx.dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            ctx.artifact_dir, dtype=getattr(torch, ctx.dtype), trust_remote_code=ctx.model.trust_remote_code
        ).to(device())
    value = _full_objective(ctx.config).score(model, ctx.tokenizer, ctx.evaluation).value
    # Trials train with the KV cache off; a model that ships must generate with it.
    model.config.use_cache = True
    model.generation_config.use_cache = True
    model.save_pretrained(folder, safe_serialization=True)
    ctx.tokenizer.save_pretrained(folder)
    return merge_error, value


def _score_folder(ctx: _Context, folder: Path) -> float:
    """Load a saved folder the way a user would and score it with the sweep's objective."""
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        dtype=getattr(torch, ctx.dtype),
        device_map={"": str(device())},
        trust_remote_code=ctx.model.trust_remote_code,
    )
    value = _full_objective(ctx.config).score(model, ctx.tokenizer, ctx.evaluation).value
    del model
    _free_memory()
    return value


def _publish(partial: Path, final: Path) -> None:
    """Rename a finished folder into place, refusing (not replacing) one that appeared meanwhile."""
    _ensure_free(final)
    os.rename(partial, final)


def _registry_tags(
    config: SweepConfig, trial: FrozenTrial, run, params: TrialParams, promotion: Promotion
) -> dict[str, str]:
    tags = {
        "sweep.name": config.name,
        "sweep.config": str(Path(config.source).resolve()),
        "sweep.objective": config.objective.name,
        "sweep.direction": config.direction,
        "sweep.parent_run_id": run.data.tags.get("mlflow.parentRunId", ""),
        "trial.number": str(trial.number),
        "trial.value": repr(trial.values[0]),
        "trial.run_id": run.info.run_id,
        "trial.method": params.method,
        "trial.params": json.dumps(params.model_dump(), sort_keys=True),
        **{f"param.{key}": str(value) for key, value in params.model_dump().items()},
        "merge.dtype": promotion.dtype,
        "merged.source": promotion.merged_dir.resolve().as_uri(),
        "objective.merged": repr(promotion.merged_objective),
        "size.merged_bytes": str(promotion.merged_bytes),
    }
    if promotion.merge_error is not None:
        tags["merge.max_rel_logit_error"] = f"{promotion.merge_error:.3g}"
    if promotion.gptq_dir is not None:
        tags |= {
            "export.gptq.source": promotion.gptq_dir.resolve().as_uri(),
            "objective.gptq": repr(promotion.gptq_objective),
            "objective.gptq_delta": repr(promotion.gptq_delta),
            "size.gptq_bytes": str(promotion.gptq_bytes),
        }
    return tags


def _register(
    client: MlflowClient, name: str, folder: Path, servable, run_id: str, tags: dict[str, str]
) -> str:
    """A new version of the registered model `name` (created on first use), aliased champion: made
    from the logged model `servable`, which then lists the version among its tags, or from the
    promoted `folder` itself when there is none."""
    try:
        client.create_registered_model(name, description=f"promoted trials of sweep '{name}'")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    if servable is None:
        version = client.create_model_version(name, folder.resolve().as_uri(), run_id=run_id, tags=tags)
    else:
        # The artifact location rather than models:/<model id>: given that, MLflow's SQL registry
        # looks the logged model up through the process-wide tracking URI, not this client's, and it
        # keeps no model id of its own, hence the tag.
        version = client.create_model_version(
            name,
            servable.artifact_location,
            run_id=run_id,
            tags={**tags, "logged_model.id": servable.model_id},
            model_id=servable.model_id,
        )
        tagged = client.get_logged_model(servable.model_id).tags.get(MLFLOW_MODEL_VERSIONS, "[]")
        listed = [*json.loads(tagged), {"name": name, "version": str(version.version)}]
        client.set_logged_model_tags(servable.model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(listed)})
    client.set_registered_model_alias(name, CHAMPION, str(version.version))
    return str(version.version)


def _log_servable(ctx: _Context, client: MlflowClient, run, folder: Path, final: Path):
    """Log the merged model in `folder` (about to be published as `final`) as the trial run's logged
    model, loaded back from the folder as a user would; returns the `LoggedModel`.

    Plain transformers, no remote code: what `mlflow models serve` can load anywhere. The folder's
    path is the model's recorded name, so MLflow looks nothing up on the Hub for it.
    """
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, ctx.dtype))
    model.name_or_path = str(final)
    user_turn = next(
        m["content"] for m in reversed(ctx.evaluation.examples[0].messages) if m["role"] == "user"
    )
    logged = log_servable(
        client,
        run.info.experiment_id,
        run.info.run_id,
        SERVABLE_NAME,
        model,
        ctx.tokenizer,
        user_turn,
        prompt_template=chat_prompt_template(ctx.tokenizer),
        max_new_tokens=ctx.config.objective.max_new_tokens,
        scratch=final.parent,
    )
    del model
    _free_memory()
    return logged


def _prepare(config: SweepConfig, store: Store, params: TrialParams, artifact_uri: str, uri: str) -> _Context:
    """Read data, tokenizer and template (raising `InputError` on bad input); load no weights."""
    dtype = promotion_dtype(config.model, torch.cuda.is_available())
    model = config.model.model_copy(update={"dtype": dtype})
    splits = load_splits(config.data)
    tokenizer = ModelCache(model).tokenizer()
    template = resolve_chat_template(tokenizer, config.data.chat_template)
    # The promoted folder carries the template the trials trained with, not the tokenizer's own.
    tokenizer.chat_template = template
    artifact_dir = Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, tracking_uri=uri))
    evaluation = eval_data(config, store, tokenizer, splits.eval, template)
    return _Context(config, params, artifact_dir, dtype, model, tokenizer, template, splits.train, evaluation)


def _new_partial(final: Path) -> Path:
    """A scratch folder of its own beside `final`, renamed onto it once complete.

    Unique per call so two promotions never write into one another's; made with mkdir rather than
    mkdtemp so the published folder gets the usual permissions, not mkdtemp's owner-only ones.
    """
    partial = final.with_name(f".{final.name}.partial-{uuid.uuid4().hex[:12]}")
    partial.mkdir(parents=True)
    return partial


def _record(promotion: Promotion, gptq: GptqSettings) -> dict[str, Any]:
    """promotion.json: provenance that travels with the folder when it is copied elsewhere."""
    record = {
        key: str(value) if isinstance(value, Path) else value
        for key, value in asdict(promotion).items()
        if key not in {"model_name", "version", "logged_model_id"}
    }
    record["gptq_delta"] = promotion.gptq_delta
    if promotion.gptq_dir is not None:
        record["gptq_settings"] = asdict(gptq)
    return record


def _trial_run(config: SweepConfig, trial: FrozenTrial, uri: str):
    """The MLflow run a trial recorded; `InputError` in one line when the tracking store lost it.

    The study (the journal) and MLflow are separate files: with `mlflow.db` deleted the study
    still lists the trial, but its parameters and adapter are gone. The database is not created
    anew just to find that out.
    """
    run_id = trial.user_attrs.get("mlflow_run_id")
    restore = "restore it, or start the sweep afresh (move mlruns/optuna away too)"
    if uri.startswith("sqlite:///"):
        database = Path(uri.removeprefix("sqlite:///").partition("?")[0])
        if not database.is_file():
            raise InputError(
                config.source,
                f"trial {trial.number} cannot be promoted: the MLflow database {database} holding its run "
                f"{run_id} is missing, though the study still lists the trial; {restore}",
                "tracking.uri",
            )
    try:
        return MlflowClient(tracking_uri=uri).get_run(run_id)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise InputError(
            config.source,
            f"trial {trial.number} cannot be promoted: its MLflow run {run_id} is not in {uri}; {restore}",
            "tracking.uri",
        ) from None


def promote(
    config: SweepConfig,
    store: Store,
    trial_number: int | None = None,
    export: str | None = None,
    output: Path | None = None,
    quantize: Quantizer = quantize_with_llmcompressor,
    gptq: GptqSettings = GptqSettings(),
) -> Promotion:
    """Promote trial `trial_number` (default: the best) of `config`'s sweep; see the module docstring.

    Bad input (unknown export, GPTQ without CUDA, no study, no such or unfinished trial, an
    output folder already there) raises `InputError` before any weight is loaded. A merge that does
    not reproduce base+adapter raises `MergeMismatch` and leaves nothing behind.
    """
    if export is not None and export not in EXPORTS:
        raise InputError("--export", f"unknown export {export!r}; allowed: {', '.join(EXPORTS)}")
    if export == "gptq" and (reason := gptq_unavailable_reason()):
        raise InputError(config.source, reason)
    try:
        study = load_study(config, store)
    except KeyError:
        raise InputError(
            config.source, f"no study named '{config.name}' yet; start it with: sweep run {config.source}"
        ) from None
    trial = select_trial(study, trial_number, config.source)
    artifact_uri = trial.user_attrs.get("adapter_uri")
    if not artifact_uri:
        raise InputError(
            config.source, f"trial {trial.number} kept no adapter or weights (tracking.log_adapter is off)"
        )
    merged_dir = (
        Path(output) if output is not None else default_output(config, store, trial.number)
    ).resolve()
    gptq_dir = gptq_output(merged_dir) if export == "gptq" else None
    for folder in (merged_dir, gptq_dir):
        if folder is not None:
            _ensure_free(folder)
            # Checked now: the merge takes minutes, and only its final rename would find out.
            reason = unwritable_reason(folder, folder=True)
            if reason:
                raise InputError("--output" if output is not None else folder, reason)

    uri = resolve_uri(config.tracking.uri)
    run = _trial_run(config, trial, uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    params = TrialParams.model_validate(run.data.params)
    ctx = _prepare(config, store, params, artifact_uri, uri)

    # (scratch folder, final folder): written in full first, renamed into place together at the end.
    staged: list[tuple[Path, Path]] = []
    servable = None
    try:
        merged_tmp = _new_partial(merged_dir)
        staged.append((merged_tmp, merged_dir))
        merge_error, merged_objective = _merge_and_save(ctx, merged_tmp)
        _free_memory()
        promotion = Promotion(
            sweep=config.name,
            trial=trial.number,
            trial_value=trial.values[0],
            run_id=run.info.run_id,
            method=params.method,
            dtype=ctx.dtype,
            merged_dir=merged_dir,
            merged_objective=merged_objective,
            merged_bytes=folder_bytes(merged_tmp),
            merge_error=merge_error,
        )
        if gptq_dir is not None:
            gptq_tmp = _new_partial(gptq_dir)
            staged.append((gptq_tmp, gptq_dir))
            samples = calibration_samples(ctx.train, ctx.tokenizer, ctx.template, gptq)
            quantize(merged_tmp, samples, gptq, gptq_tmp)
            ctx.tokenizer.save_pretrained(gptq_tmp)
            promotion.gptq_dir = gptq_dir
            promotion.gptq_objective = _score_folder(ctx, gptq_tmp)
            promotion.gptq_bytes = folder_bytes(gptq_tmp)
        (merged_tmp / "promotion.json").write_text(json.dumps(_record(promotion, gptq), indent=2) + "\n")
        # MLflow's transformers flavor would have to run a remote-code model's own code to serve
        # it; such a model is registered as its folder alone.
        if not ctx.model.trust_remote_code:
            servable = _log_servable(ctx, client, run, merged_tmp, merged_dir)
        while staged:
            _publish(*staged[0])
            staged.pop(0)
    except BaseException:
        if servable is not None:  # logged, but its promotion never published: nothing left behind
            client.delete_logged_model(servable.model_id)
        raise
    finally:
        for partial, _ in staged:
            shutil.rmtree(partial, ignore_errors=True)

    tags = _registry_tags(config, trial, run, params, promotion)
    promotion.model_name = config.name
    promotion.version = _register(client, config.name, merged_dir, servable, run.info.run_id, tags)
    promotion.logged_model_id = servable.model_id if servable is not None else ""
    return promotion
