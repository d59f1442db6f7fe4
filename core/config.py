"""Load a search-space YAML into one validated `SweepConfig`.

Every problem is raised as a single `InputError` naming the file, the line, the field and what is
allowed, before anything heavy (torch, a model, a dataset) is touched.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, ClassVar, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from core.dataset_info import DatasetEntry, EntryProblem, RowLayout, resolve_entry
from core.errors import InputError
from core.objectives import OBJECTIVES
from core.trial import PARAM_NAMES, TrialParams

Scalar = bool | int | float | str | None


def _leaf_types(annotation: Any) -> set:
    """The plain types an annotation admits, looking through Optional, unions, Annotated and Literal."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _leaf_types(get_args(annotation)[0])
    if origin in (Union, UnionType):
        return set().union(*(_leaf_types(arg) for arg in get_args(annotation)))
    if origin is Literal:
        return {type(arg) for arg in get_args(annotation)}
    return {annotation}


def _bool_is_a_mistake(annotation: Any) -> bool:
    """True for numeric fields that do not also take a bool.

    Pydantic's lax mode reads `true` as 1 and `false` as 0, so `trials: true` would silently mean one
    trial; a boolean where a number belongs is always a slip.
    """
    leaves = _leaf_types(annotation)
    return bool(leaves & {int, float}) and bool not in leaves and Any not in leaves


def _bool_for_number_reason(value: Any) -> str:
    return f"must be a number, not the boolean {str(value).lower()}"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class QuantizationConfig(_Section):
    """bitsandbytes 4-bit settings used by trials whose method is `qlora`."""

    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"


class ModelConfig(_Section):
    """The base model every trial starts from."""

    name_or_path: str = Field(description="hub id (org/name) or local folder")
    revision: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flash_attention_3"] | None = None
    trust_remote_code: bool = False
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig)


class DataConfig(_Section):
    """Where the SFT examples are and how they become chat messages.

    Either `format` and `train_file`, or `dataset_info` and `dataset` (an entry of a LLaMA-Factory
    dataset registry, which gives the file, the format and the row keys).
    """

    format: Literal["alpaca", "sharegpt", "messages", "gsm8k"] | None = None
    train_file: Path | None = None
    dataset_info: Path | None = Field(None, description="a LLaMA-Factory dataset_info.json")
    dataset: str | None = Field(None, description="the dataset_info entry to train on")
    eval_dataset: str | None = Field(None, description="a dataset_info entry to evaluate on")
    mask_history: bool = Field(
        False, description="multi-turn rows: train the last assistant turn only (default: every turn)"
    )
    eval_file: Path | None = None
    eval_split: float = Field(0.1, gt=0, lt=1, description="share of train held out when eval_file is unset")
    system_prompt: str | None = None
    chat_template: str | None = Field(
        None, description="'chatml', a Jinja template, or unset for the model's"
    )
    max_samples: int | None = Field(None, gt=0)
    seed: int = 0

    # The dataset_info entries, resolved by the loader (train, eval).
    _entries: dict[str, DatasetEntry] = PrivateAttr(default_factory=dict)

    def row_format(self, split: Literal["train", "eval"]) -> tuple[str, RowLayout]:
        """The format and row layout of the train or eval file."""
        entry = self._entries.get(split) or self._entries.get("train")
        if entry is not None:
            return entry.format, entry.layout
        return self.format, RowLayout()

    def entry(self, split: Literal["train", "eval"]) -> DatasetEntry | None:
        """The dataset_info entry the train or eval file comes from, if any."""
        return self._entries.get(split)


class ObjectiveConfig(_Section):
    """How a trained trial is scored.

    Which fields apply depends on the objective (`objectives/registry.py` lists them); setting one
    that the named objective ignores is an error, so a misplaced setting never silently does nothing.
    """

    name: str
    direction: Literal["minimize", "maximize"] | None = None
    minimize_peak_memory: bool = Field(
        False, description="multi-objective: also minimise peak memory; `sweep best` shows the Pareto front"
    )
    batch_size: int = Field(8, ge=1, description="rows per forward pass (eval_loss)")
    max_length: int = Field(
        2048, ge=8, description="eval sequences (prompt + generation) are cut here, the same for every trial"
    )
    metric: str | None = Field(None, description="the reported metric the study optimises")
    eval_file: str | None = Field(
        None, description="eval rows: a .jsonl/.json file, or a datasets id or folder"
    )
    dataset_config: str | None = Field(None, description="datasets config name of eval_file, e.g. 'main'")
    split: str = Field("test", description="split of a datasets eval_file")
    fewshot_file: str | None = Field(None, description="rows to draw n-shot examples from")
    fewshot_split: str = Field("train", description="split of a datasets fewshot_file (or eval_file)")
    num_fewshot: int | None = Field(None, ge=0, description="shots per prompt; unset: the task's own")
    fewshot: Literal["lm_eval", "seeded"] = Field(
        "lm_eval",
        description="gsm8k shots: lm-eval's own draw (its sampler, seed 1234), or drawn with `seed`",
    )
    prompt_format: Literal["nshot", "chat"] | None = Field(
        None, description="plain n-shot text, or zero-shot through the chat template"
    )
    system_prompt: str | None = None
    max_new_tokens: int = Field(256, ge=1)
    generation_batch_size: int | Literal["auto"] = Field(
        "auto", description="prompts per generate call; auto: fitted to free GPU memory"
    )
    max_samples: int | None = Field(None, gt=0, description="score a fixed random subset of this size")
    seed: int = Field(0, description="picks the max_samples subset (and the shots with fewshot: seeded)")
    input_field: str = Field("input_field", min_length=1)
    parser: Literal["kdd2024", "lenient"] = Field(
        "kdd2024", description="ndcg: the KDD Cup 2024 scorer's answer parser, or the tolerant one"
    )
    output_field: str = Field("output_field", min_length=1)
    task: str | None = Field(None, description="lm-evaluation-harness task name")
    task_path: str | None = Field(None, description="folder of task YAMLs for lm-evaluation-harness")
    backend: Literal["hf", "vllm"] = "hf"

    _ROW_FILE_SUFFIXES: ClassVar[tuple[str, ...]] = (".json", ".jsonl")

    @staticmethod
    def _error(field: str, value: Any, message: str) -> ValidationError:
        """A validation error located at `objective.<field>`, so the message names the YAML line."""
        return ValidationError.from_exception_data(
            "ObjectiveConfig",
            [InitErrorDetails(type=PydanticCustomError("objective", message), loc=(field,), input=value)],
        )

    @field_validator("generation_batch_size", mode="before")
    @classmethod
    def _check_generation_batch_size(cls, value: Any) -> Any:
        # Checked before the union is tried, so the message names the field and not a union member.
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        raise ValueError(f"must be auto or a whole number >= 1, got {value!r}")

    @property
    def target_metric(self) -> str:
        """The metric the study optimises: as configured, else the objective's first."""
        return self.metric or OBJECTIVES[self.name].metrics[0]

    @model_validator(mode="after")
    def _check_combinations(self) -> ObjectiveConfig:
        entry = OBJECTIVES.get(self.name)
        if entry is None:
            return self  # parse_config names the unknown objective with the allowed ones
        general = {"name", "direction", "metric", "minimize_peak_memory"}
        for field in sorted(self.model_fields_set - general - entry.options):
            users = [name for name, other in OBJECTIVES.items() if field in other.options]
            raise self._error(
                field,
                getattr(self, field),
                f"does not apply to objective {self.name!r}; it is read by: {', '.join(users) or 'none'}",
            )
        for field in sorted(entry.required):
            if getattr(self, field) is None:
                raise self._error(field, None, f"is required for objective {self.name!r}")
        if self.metric is not None and entry.metrics and self.metric not in entry.metrics:
            raise self._error(
                "metric",
                self.metric,
                f"{self.name} reports no metric {self.metric!r}; allowed: {', '.join(entry.metrics)}",
            )
        if "max_new_tokens" in entry.options and self.max_new_tokens >= self.max_length:
            raise self._error(
                "max_new_tokens",
                self.max_new_tokens,
                f"must be less than max_length ({self.max_length}), which bounds prompt plus generation",
            )
        self._check_row_sources()
        if self.name == "gsm8k":
            self._check_gsm8k_prompts()
        return self

    def _check_row_sources(self) -> None:
        for source, options in (
            ("eval_file", ("dataset_config", "split")),
            ("fewshot_file", ("fewshot_split",)),
        ):
            path = getattr(self, source)
            if path is None or not path.endswith(self._ROW_FILE_SUFFIXES):
                continue
            for option in options:
                if option in self.model_fields_set:
                    raise self._error(
                        option,
                        getattr(self, option),
                        f"applies to a datasets id or folder, not to {source} {path}",
                    )

    def _check_gsm8k_prompts(self) -> None:
        shots = self.num_fewshot
        if self.prompt_format == "chat":
            if "fewshot" in self.model_fields_set:
                raise self._error(
                    "fewshot",
                    self.fewshot,
                    "chat prompts are zero-shot; fewshot applies to prompt_format: nshot",
                )
            if shots:
                raise self._error(
                    "num_fewshot",
                    shots,
                    "chat prompts are zero-shot (as lm-eval's); use prompt_format: nshot",
                )
            return
        shots = 5 if shots is None else shots  # objectives.gsm8k.DEFAULT_NUM_FEWSHOT, as gsm8k.yaml
        own_file = self.eval_file is not None and self.eval_file.endswith(self._ROW_FILE_SUFFIXES)
        if shots and self.fewshot_file is None and own_file:
            raise self._error(
                "num_fewshot",
                shots,
                f"{shots}-shot prompts need fewshot_file (GSM8K train rows to draw shots from), "
                "or num_fewshot: 0",
            )

    def resolve_paths(self, base: Path) -> None:
        """Make eval_file, fewshot_file and task_path absolute against `base` where they are local paths.

        A value that starts with '.', '/' or '~', names a .json/.jsonl file or exists under `base` is
        a path; anything else (e.g. 'openai/gsm8k') is a `datasets` id and stays as written.
        """
        for field in ("eval_file", "fewshot_file", "task_path"):
            value = getattr(self, field)
            if value is None:
                continue
            local = base / Path(value).expanduser()
            if value.startswith((".", "/", "~")) or value.endswith(self._ROW_FILE_SUFFIXES) or local.exists():
                setattr(self, field, str(local.resolve()))


class FloatParam(_Section):
    type: Literal["float"]
    low: float
    high: float
    log: bool = False
    step: float | None = Field(None, gt=0)
    when: dict[str, list[Scalar]] | None = None


class IntParam(_Section):
    type: Literal["int"]
    low: int
    high: int
    step: int = Field(1, ge=1)
    log: bool = False
    when: dict[str, list[Scalar]] | None = None


class CategoricalParam(_Section):
    type: Literal["categorical"]
    choices: list[Scalar]
    when: dict[str, list[Scalar]] | None = None


class BoolParam(_Section):
    type: Literal["bool"]
    when: dict[str, list[Scalar]] | None = None

    @property
    def choices(self) -> list[bool]:
        return [False, True]


ParamSpec = Annotated[FloatParam | IntParam | CategoricalParam | BoolParam, Field(discriminator="type")]
PARAM_TYPES = {"float": FloatParam, "int": IntParam, "categorical": CategoricalParam, "bool": BoolParam}


class BudgetConfig(_Section):
    trials: int = Field(20, ge=1, description="finished (complete or pruned) trials the study should hold")
    timeout: float | None = Field(None, gt=0, description="seconds for this invocation of `sweep run`")
    max_failed_trials: int | None = Field(5, ge=1)
    max_retries: int = Field(1, ge=0, description="re-runs of a trial whose worker process died")
    oom_retry: bool = Field(True, description="retry an out-of-memory trial once at half the micro-batch")


class RayConfig(_Section):
    """Where and how `backend: ray` runs trials."""

    address: str | None = Field(None, description="'auto' or ray://host:10001; unset: start a local Ray")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local Ray (unset: all)")
    num_gpus: int | None = Field(None, ge=0, description="GPUs of a local Ray (unset: all)")
    cpus_per_trial: float = Field(
        1, gt=0, description="CPUs an actor (one trial) reserves; unset with gangs: one a rank"
    )
    gpus_per_trial: float = Field(
        0,
        ge=0,
        description="GPUs an actor reserves (below 1: actors share a GPU); gangs: workers.gpus_per_trial",
    )
    max_concurrent_trials: int | None = Field(None, ge=1)


class WorkersConfig(_Section):
    """Local worker processes: each keeps its base model loaded between trials."""

    count: int | None = Field(
        None, ge=1, description="unset: one per visible GPU (times trials_per_gpu), 1 on CPU"
    )
    trials_per_gpu: int = Field(1, ge=1, description="workers sharing one GPU, for small models")
    pack: Literal["auto"] | Annotated[int, Field(strict=True, ge=1)] = Field(
        "auto",
        description=(
            "LoRA/QLoRA trials stepped together on one shared base in each worker; 1 turns packing off; "
            "auto: sized to free GPU memory (1 on CPU, where packing saves nothing)"
        ),
    )
    gpus_per_trial: Annotated[int, Field(strict=True, ge=1)] = Field(
        1,
        description=(
            "GPUs one trial trains on, as a gang of that many processes (see `distributed:`); the visible "
            "GPUs are split into gangs that each run one trial at a time. 1: one GPU a trial"
        ),
    )


DistributedStrategy = Literal["zero2", "zero3", "fsdp"]


class DistributedConfig(_Section):
    """How a gang trial (`workers.gpus_per_trial` > 1) spreads its model over its processes."""

    strategy: DistributedStrategy = Field(
        "fsdp",
        description=(
            "fsdp: PyTorch FSDP2 through accelerate (parameters, gradients and optimizer state sharded); "
            "zero2 / zero3: DeepSpeed ZeRO stage 2 (gradients and optimizer state) or 3 (also parameters)"
        ),
    )
    offload: bool = Field(False, description="keep sharded parameters and optimizer state in CPU memory")
    config_file: Path | None = Field(
        None,
        description=(
            "a DeepSpeed JSON or an accelerate config YAML (as LLaMA-Factory recipes have them), "
            "relative to this file; it decides the strategy and offload, so set those or this, not both"
        ),
    )
    allow_cpu: bool = Field(
        False,
        description=(
            "with no GPU visible, run a gang as gpus_per_trial CPU processes over gloo (tests, CI); "
            "slower than one process, never a speed-up"
        ),
    )

    # What config_file says, read when the config is loaded: the strategy it picks and its settings.
    _file_strategy: DistributedStrategy | None = PrivateAttr(None)
    _file_settings: dict[str, Any] = PrivateAttr(default_factory=dict)

    @property
    def effective_strategy(self) -> DistributedStrategy:
        """The strategy a gang trains with: config_file's when one is given, else `strategy`."""
        return self._file_strategy or self.strategy

    @property
    def file_settings(self) -> dict[str, Any]:
        """config_file's settings: a DeepSpeed config, or an accelerate YAML's `fsdp_config` section."""
        return dict(self._file_settings)


class SamplerConfig(_Section):
    type: Literal["tpe", "random", "grid", "cmaes", "gp", "nsga2"] = "tpe"
    seed: int | None = 0
    n_startup_trials: int | None = Field(None, ge=0)


class PrunerConfig(_Section):
    type: Literal["none", "median", "successive_halving", "hyperband"] = "none"
    n_startup_trials: int = Field(5, ge=0)
    n_warmup_steps: int = Field(0, ge=0)
    min_resource: int = Field(1, ge=1)
    reduction_factor: int = Field(3, ge=2)
    eval_every_steps: int | None = Field(None, ge=1, description="intermediate evaluations for the pruner")
    eval_samples: int = Field(32, ge=1, description="eval items scored at each intermediate evaluation")


class TrackingConfig(_Section):
    uri: str = "sqlite:///mlruns/mlflow.db"
    experiment: str | None = None
    artifact_location: str = "mlruns/artifacts"
    log_adapter: bool = True
    system_metrics: Literal["auto"] | bool = Field(
        "auto", description="CPU, RAM and GPU time series per trial run; auto: on when a GPU is visible"
    )
    system_metrics_interval: float = Field(5.0, gt=0, description="seconds between system metric samples")


class SweepConfig(_Section):
    """One validated search-space file: what to tune, on what, scored how, recorded where."""

    name: str
    model: ModelConfig
    data: DataConfig
    objective: ObjectiveConfig
    space: dict[str, ParamSpec]
    training: dict[str, Any] = Field(default_factory=dict)
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    pruner: PrunerConfig = Field(default_factory=PrunerConfig)
    storage: str | None = Field(None, description="Optuna storage URL; unset: a journal file under mlruns/")
    backend: Literal["local", "ray"] = "local"
    workers: WorkersConfig = Field(default_factory=WorkersConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    source: Path = Field(Path("<memory>"), exclude=True)
    # Dotted field ('model.name_or_path') -> its line in the YAML, so checks made after loading
    # (preflight: the model folder, the output paths) can still point at the line to fix.
    _lines: dict[str, int] = PrivateAttr(default_factory=dict)

    model_config = ConfigDict(extra="forbid")

    @field_validator("name")
    @classmethod
    def _check_name(cls, name: str) -> str:
        # The name becomes file names (mlruns/optuna/<name>.journal, the trials' folders): no
        # separators, no NUL, nothing a file system refuses, and short enough for 255 bytes.
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise ValueError(
                f"{name!r} names files, so it may hold only letters, digits, '_', '.' and '-', "
                "starting with a letter or digit"
            )
        longest = len(f"{name}.journal".encode())
        if longest > 255:
            raise ValueError(
                f"is {len(name)} characters; its study file <name>.journal would be {longest} bytes, "
                f"over the 255 file systems allow: use at most {255 - len('.journal')} characters"
            )
        return name

    def line_of(self, field: str) -> int | None:
        """The YAML line of a dotted field (or of the nearest enclosing one that was written)."""
        while field:
            if field in self._lines:
                return self._lines[field]
            field = field.rpartition(".")[0]
        return None

    def error(self, field: str, message: str) -> InputError:
        """An `InputError` at `field` of this config's YAML file, with its line when known."""
        return InputError(self.source, message, field, self.line_of(field))

    @property
    def direction(self) -> Literal["minimize", "maximize"]:
        """The objective's direction: as configured, else the objective's natural one."""
        return self.objective.direction or OBJECTIVES[self.objective.name].direction

    @property
    def directions(self) -> list[Literal["minimize", "maximize"]]:
        """The study's directions: the objective's, then peak memory's when that is minimised too."""
        return [self.direction, "minimize"] if self.objective.minimize_peak_memory else [self.direction]

    @property
    def experiment_name(self) -> str:
        return self.tracking.experiment or self.name

    def fixed_params(self) -> dict[str, Any]:
        """The `training:` section: values every trial uses for parameters outside the space."""
        return dict(self.training)


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that reads `1e-5` as a float.

    PyYAML follows YAML 1.1, where a float needs a dot (`1.0e-5`); learning rates written as `1e-5`
    would otherwise arrive as strings and compare wrongly in ranges.
    """


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.VERBOSE,
    ),
    list("-+0123456789."),
)


def _line_map(node: yaml.Node, file: Path, path: tuple = (), lines: dict | None = None) -> dict[tuple, int]:
    """Map each key path (('space', 'lora_rank', 'low')) to its 1-based line; reject duplicate keys."""
    lines = {} if lines is None else lines
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = key_node.value
            if key in seen:
                dotted = ".".join(str(p) for p in (*path, key))
                raise InputError(
                    file, "duplicate key (YAML keeps only the last)", dotted, key_node.start_mark.line + 1
                )
            seen.add(key)
            lines[(*path, key)] = key_node.start_mark.line + 1
            _line_map(value_node, file, (*path, key), lines)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _line_map(item, file, (*path, index), lines)
    return lines


def _line_of(lines: dict[tuple, int], loc: tuple) -> int | None:
    for end in range(len(loc), -1, -1):
        if loc[:end] in lines:
            return lines[loc[:end]]
    return None


def _dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model a field holds, looking through Optional."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) in (Union, UnionType):
        for arg in get_args(annotation):
            found = _section_model(arg)
            if found is not None:
                return found
    return None


def _check_keys(raw: dict, model: type[BaseModel], loc: tuple, err) -> None:
    """Name the first unknown key with the list of allowed ones (pydantic only says 'extra input')."""
    allowed = [name for name, field in model.model_fields.items() if not field.exclude]
    for key, value in raw.items():
        if key not in allowed:
            raise err((*loc, key), f"unknown field {key!r}; allowed: {', '.join(allowed)}")
        if isinstance(value, bool) and _bool_is_a_mistake(model.model_fields[key].annotation):
            raise err((*loc, key), _bool_for_number_reason(value))
        sub = _section_model(model.model_fields[key].annotation)
        if sub is not None and isinstance(value, dict):
            _check_keys(value, sub, (*loc, key), err)


def _check_space_shape(space: Any, err) -> None:
    if not isinstance(space, dict) or not space:
        raise err(("space",), "must map parameter names to specs, e.g. learning_rate: {type: float, ...}")
    for name, spec in space.items():
        if name not in PARAM_NAMES:
            raise err(("space", name), f"unknown parameter {name!r}; allowed: {', '.join(PARAM_NAMES)}")
        if not isinstance(spec, dict):
            raise err(("space", name), "must be a mapping with a 'type' (float, int, categorical, bool)")
        kind = spec.get("type")
        if kind not in PARAM_TYPES:
            raise err(
                ("space", name, "type"), f"unknown parameter type {kind!r}; allowed: {', '.join(PARAM_TYPES)}"
            )
        _check_keys(spec, PARAM_TYPES[kind], ("space", name), err)


def _validate_param_value(name: str, value: Any) -> str | None:
    """None if `value` is acceptable for TrialParams.<name>, else pydantic's reason."""
    field = TrialParams.model_fields[name]
    if isinstance(value, bool) and _bool_is_a_mistake(field.annotation):
        return _bool_for_number_reason(value)
    annotation = Annotated[field.annotation, *field.metadata] if field.metadata else field.annotation
    try:
        TypeAdapter(annotation).validate_python(value)
    except ValidationError as exc:
        return exc.errors()[0]["msg"]
    return None


def _check_space_semantics(cfg: SweepConfig, err) -> None:
    for name, spec in cfg.space.items():
        loc = ("space", name)
        if isinstance(spec, (FloatParam, IntParam)):
            if spec.low > spec.high:
                raise err((*loc, "low"), f"low ({spec.low}) must be <= high ({spec.high})")
            if spec.log and spec.low <= 0:
                raise err((*loc, "low"), f"log scale needs low > 0 (got {spec.low})")
            if spec.log and isinstance(spec, FloatParam) and spec.step is not None:
                raise err((*loc, "step"), "step cannot be combined with log: true")
            if spec.log and isinstance(spec, IntParam) and spec.step != 1:
                raise err((*loc, "step"), "an int parameter on a log scale must have step 1")
            _check_step_divides(spec, loc, err)
            for bound in ("low", "high"):
                reason = _validate_param_value(name, getattr(spec, bound))
                if reason:
                    raise err((*loc, bound), f"{getattr(spec, bound)!r} is not valid for {name}: {reason}")
        else:
            choices = spec.choices
            if not choices:
                raise err((*loc, "choices"), "needs at least one choice")
            if len(set(map(repr, choices))) != len(choices):
                raise err((*loc, "choices"), f"repeats a choice: {choices}")
            for index, choice in enumerate(choices):
                reason = _validate_param_value(name, choice)
                if reason:
                    raise err((*loc, "choices", index), f"{choice!r} is not valid for {name}: {reason}")
        for parent, values in (spec.when or {}).items():
            if parent not in cfg.space:
                known = ", ".join(n for n in cfg.space if n != name)
                raise err(
                    (*loc, "when", parent), f"conditional on unknown parameter {parent!r}; space has: {known}"
                )
            if parent == name:
                raise err((*loc, "when", parent), "a parameter cannot be conditional on itself")
            parent_spec = cfg.space[parent]
            if not isinstance(parent_spec, (CategoricalParam, BoolParam)):
                raise err(
                    (*loc, "when", parent),
                    f"can only depend on a categorical or bool parameter; {parent!r} is not",
                )
            for value in values:
                if value not in parent_spec.choices:
                    raise err(
                        (*loc, "when", parent),
                        f"{value!r} is not a choice of {parent!r}; choices: {parent_spec.choices}",
                    )


def _check_step_divides(spec: FloatParam | IntParam, loc: tuple, err) -> None:
    """A step must divide high - low: Optuna would otherwise quietly move `high` to the last step."""
    if spec.step is None or spec.low > spec.high:
        return
    steps = (spec.high - spec.low) / spec.step
    if abs(steps - round(steps)) <= 1e-6 * max(1.0, steps):
        return
    last = spec.low + math.floor(steps) * spec.step
    last = round(last, 12) if isinstance(spec, FloatParam) else last
    raise err(
        (*loc, "step"),
        f"step {spec.step} does not divide the range {spec.low} to {spec.high} ({steps:.4g} steps), so "
        f"{spec.high} could never be drawn; use high: {last} or a step that divides the range",
    )


def _check_when_cycles(cfg: SweepConfig, err) -> None:
    """Conditionals must form a tree: a cycle has no parameter to sample first."""

    def visit(name: str, path: list[str]) -> None:
        for parent in cfg.space[name].when or {}:
            if parent in path:
                cycle = [*path[path.index(parent) :], parent]
                raise err(
                    ("space", cycle[0], "when"),
                    f"conditionals form a cycle: {' -> '.join(cycle)} (each 'when' names the next); "
                    f"remove the 'when' of {cycle[0]} or of {cycle[-2]}",
                )
            visit(parent, [*path, parent])

    for name in cfg.space:
        visit(name, [name])


def _check_grid(cfg: SweepConfig, err) -> None:
    """The grid sampler enumerates every parameter; find one it cannot before a trial starts."""
    if cfg.sampler.type != "grid":
        return
    for name, spec in cfg.space.items():
        if isinstance(spec, (FloatParam, IntParam)) and spec.log:
            raise err(
                ("space", name, "log"),
                "the grid sampler cannot enumerate a log scale; list the values as a categorical",
            )
        if isinstance(spec, FloatParam) and spec.step is None:
            raise err(
                ("space", name),
                "the grid sampler needs a step for a float parameter (e.g. step: 0.1), "
                "or list the values as a categorical",
            )


def _check_chat_template(cfg: SweepConfig, err) -> None:
    """A template is compiled now, so a Jinja typo is one line here and not a failure of every trial."""
    template = cfg.data.chat_template
    if template is None or template == "chatml":  # runners.data.NAMED_TEMPLATES
        return
    loc = ("data", "chat_template")
    if "{" not in template:
        raise err(loc, f"{template!r} is neither a named template (chatml) nor a Jinja template")
    import jinja2

    try:
        jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(template)
    except jinja2.TemplateSyntaxError as exc:
        raise err(loc, f"not a valid Jinja template: {exc.message} (template line {exc.lineno})") from None


def _check_training(cfg: SweepConfig, err) -> None:
    for name, value in cfg.training.items():
        if name not in PARAM_NAMES:
            raise err(("training", name), f"unknown parameter {name!r}; allowed: {', '.join(PARAM_NAMES)}")
        if name in cfg.space:
            raise err(("training", name), f"{name!r} is both fixed here and searched in space; keep one")
        reason = _validate_param_value(name, value)
        if reason:
            raise err(("training", name), f"{value!r} is not valid: {reason}")


def _resolve_data_source(cfg: SweepConfig, base: Path, err) -> None:
    """Either format + train_file, or a LLaMA-Factory dataset_info.json entry that gives both."""
    data = cfg.data
    if data.dataset_info is None:
        for field in ("dataset", "eval_dataset"):
            if getattr(data, field) is not None:
                raise err(("data", field), "names a dataset_info entry: set data.dataset_info too")
        for field in ("format", "train_file"):
            if getattr(data, field) is None:
                raise err(
                    ("data", field), "is required (or name a dataset_info.json entry: dataset_info, dataset)"
                )
        return
    for field in ("format", "train_file"):
        if getattr(data, field) is not None:
            raise err(("data", field), "comes from the dataset_info entry; remove it or remove dataset_info")
    if data.dataset is None:
        raise err(("data", "dataset"), "is required with dataset_info: the name of an entry in it")
    if data.eval_dataset is not None and data.eval_file is not None:
        raise err(("data", "eval_dataset"), "set eval_dataset or eval_file, not both")
    data.dataset_info = (base / data.dataset_info).expanduser().resolve()
    if not data.dataset_info.is_file():
        raise err(("data", "dataset_info"), f"file not found: {data.dataset_info}")
    for split, field in (("train", "dataset"), ("eval", "eval_dataset")):
        name = getattr(data, field)
        if name is None:
            continue
        try:
            entry = resolve_entry(data.dataset_info, name)
        except EntryProblem as exc:
            raise err(("data", field), str(exc)) from None
        data._entries[split] = entry
    train = data._entries["train"]
    # Paths are absolute already; _resolve_paths leaves them so.
    data.format, data.train_file = train.format, train.file
    if "eval" in data._entries:
        data.eval_file = data._entries["eval"].file


def _resolve_paths(cfg: SweepConfig, base: Path) -> None:
    """Relative data paths resolve against the YAML's folder, so a space file and its data travel together."""
    data = cfg.data
    data.train_file = (base / data.train_file).resolve()
    if data.eval_file is not None:
        data.eval_file = (base / data.eval_file).resolve()
    local = base / cfg.model.name_or_path
    if cfg.model.name_or_path.startswith((".", "/", "~")) or local.exists():
        cfg.model.name_or_path = str(Path(local).expanduser().resolve())
    cfg.objective.resolve_paths(base)


def _check_multi_objective(cfg: SweepConfig, err) -> None:
    if not cfg.objective.minimize_peak_memory:
        return
    if cfg.sampler.type not in ("nsga2", "tpe", "random"):
        raise err(
            ("sampler", "type"),
            f"{cfg.sampler.type!r} is single-objective; with minimize_peak_memory use nsga2",
        )
    if cfg.pruner.type != "none":
        raise err(
            ("pruner", "type"), "Optuna's pruners are single-objective; use none with minimize_peak_memory"
        )
    if cfg.backend == "ray":
        raise err(("backend",), "minimize_peak_memory runs on the local backend only")


_STORAGE_SCHEMES = ("sqlite", "postgresql", "mysql", "oracle", "mssql")


_TRACKING_SCHEMES = ("file", "http", "https", "databricks", *_STORAGE_SCHEMES)


def _scheme(uri: str) -> str:
    return uri.split("://", 1)[0].split("+", 1)[0].lower() if "://" in uri else ""


def _db_url_problem(url: str) -> str | None:
    """Why SQLAlchemy could not open `url` (parsed only, never connected), or None."""
    if _scheme(url) == "sqlite":
        # sqlite://host is accepted by the parser and refused at connect time, mid-sweep.
        rest = url.split("://", 1)[1]
        if not rest.startswith("/") or not rest.strip("/"):
            return (
                f"{url!r} names no database file; write sqlite:///relative/file.db or "
                "sqlite:////absolute/file.db"
            )
        return None
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        make_url(url)
    except (ArgumentError, ValueError) as exc:
        return f"{url!r} is not a valid database URL: {exc}"
    return None


def _check_storage(cfg: SweepConfig, err) -> None:
    """Only an RDB URL SQLAlchemy can open; a typo would otherwise fail after preflight, mid-sweep."""
    if cfg.storage is None:
        return
    if _scheme(cfg.storage) not in _STORAGE_SCHEMES:
        allowed = ", ".join(f"{name}://" for name in _STORAGE_SCHEMES)
        raise err(
            ("storage",),
            f"{cfg.storage!r} is not a database URL; allowed: {allowed} (unset: a journal file in mlruns/)",
        )
    problem = _db_url_problem(cfg.storage)
    if problem:
        raise err(("storage",), problem)


def _check_tracking(cfg: SweepConfig, err) -> None:
    """The tracking URI and artifact folder are checked here: MLflow would only fail on them mid-sweep."""
    uri = cfg.tracking.uri
    scheme = _scheme(uri)
    problem = None
    if scheme in _STORAGE_SCHEMES:
        problem = _db_url_problem(uri)
    elif scheme in ("http", "https") and not uri.split("://", 1)[1].split("/", 1)[0]:
        problem = f"{uri!r} names no host"
    elif scheme not in ("", *_TRACKING_SCHEMES):
        allowed = ", ".join(f"{name}://" for name in _TRACKING_SCHEMES)
        problem = f"{uri!r} has an unknown scheme {scheme!r}; allowed: {allowed} or a folder"
    elif not uri.split("://", 1)[-1].strip():
        problem = "is empty; the default is sqlite:///mlruns/mlflow.db"
    if problem:
        raise err(("tracking", "uri"), problem)
    location = cfg.tracking.artifact_location
    if "://" in location or not location.strip():
        # sweeps.tracking creates the folder and hands MLflow its file:// URI.
        raise err(
            ("tracking", "artifact_location"),
            f"{location!r} must be a local folder path (no URL scheme), e.g. mlruns/artifacts",
        )


def _check_pruner(cfg: SweepConfig, err) -> None:
    if cfg.pruner.type != "none" and cfg.pruner.eval_every_steps is None:
        raise err(
            ("pruner", "eval_every_steps"),
            f"pruner {cfg.pruner.type!r} needs intermediate scores: set eval_every_steps (e.g. 10)",
        )


_ZERO_STRATEGIES: dict[Any, DistributedStrategy] = {2: "zero2", 3: "zero3"}


def _deepspeed_strategy(settings: Any, where: str, field: tuple, err) -> DistributedStrategy:
    """The strategy a DeepSpeed config asks for: ZeRO stage 2 or 3, the stages a gang trains with.

    `where` names the file (and the key of an accelerate YAML) for the message.
    """
    if not isinstance(settings, dict):
        raise err(field, f"{where}: a DeepSpeed config must be a JSON object, not {type(settings).__name__}")
    zero = settings.get("zero_optimization")
    if zero is None:
        raise err(field, f"{where}: no zero_optimization section; gangs train with ZeRO stage 2 or 3")
    if not isinstance(zero, dict):
        raise err(field, f"{where}: zero_optimization must be a JSON object with a stage (2 or 3)")
    stage = zero.get("stage")
    if isinstance(stage, bool) or stage not in _ZERO_STRATEGIES:
        raise err(field, f"{where}: zero_optimization.stage is {stage!r}; gangs train with stage 2 or 3")
    return _ZERO_STRATEGIES[stage]


def _file_problem(path: Path) -> str | None:
    """Why `path` cannot be read as a config file, or None."""
    if path.is_dir():
        return f"{path} is a folder, not a file"
    if not path.is_file():
        return f"file not found: {path}"
    return None


def _read_text(path: Path, field: tuple, err) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise err(field, f"{path} is not UTF-8 text: {exc.reason} at byte {exc.start}") from None
    except OSError as exc:
        raise err(field, f"cannot read {path}: {exc.strerror or exc}") from None


def _accelerate_deepspeed(accelerate: dict, path: Path, field: tuple, err):
    """The strategy and DeepSpeed settings of an accelerate YAML whose distributed_type is DEEPSPEED."""
    section = accelerate.get("deepspeed_config") or {}
    if not isinstance(section, dict):
        raise err(field, f"{path}: deepspeed_config must be a mapping")
    nested = section.get("deepspeed_config_file")
    if nested:
        if not isinstance(nested, str):
            raise err(
                field, f"{path}: deepspeed_config.deepspeed_config_file must be a file path, not {nested!r}"
            )
        target = (path.parent / Path(nested).expanduser()).resolve()
        problem = _file_problem(target)
        if problem:
            raise err(field, f"{path}: deepspeed_config.deepspeed_config_file: {problem}")
        if target.suffix != ".json":  # not another YAML, which could name this one again
            raise err(field, f"{path}: deepspeed_config.deepspeed_config_file must name a DeepSpeed .json")
        return _read_distributed_file(target, field, err)
    stage = section.get("zero_stage")
    if isinstance(stage, bool) or stage not in _ZERO_STRATEGIES:
        raise err(field, f"{path}: deepspeed_config.zero_stage is {stage!r}; gangs train with stage 2 or 3")
    # accelerate's own keys for a DeepSpeed run, as the DeepSpeed config they stand for.
    settings = {
        "zero_optimization": {
            "stage": stage,
            "offload_optimizer": {"device": section.get("offload_optimizer_device", "none")},
            "offload_param": {"device": section.get("offload_param_device", "none")},
        }
    }
    return _ZERO_STRATEGIES[stage], settings


def _read_distributed_file(path: Path, field: tuple, err) -> tuple[DistributedStrategy, dict[str, Any]]:
    """The strategy and settings of a DeepSpeed JSON or an accelerate config YAML."""
    import json

    if path.suffix == ".json":
        text = _read_text(path, field, err)
        if not text.strip():
            raise err(field, f"{path} is empty; a DeepSpeed config is a JSON object with zero_optimization")
        try:
            settings = json.loads(text)
        except json.JSONDecodeError as exc:
            raise err(field, f"{path} is not valid JSON: {exc}") from None
        return _deepspeed_strategy(settings, str(path), field, err), settings
    if path.suffix not in (".yaml", ".yml"):
        raise err(field, f"{path} must be a DeepSpeed .json or an accelerate config .yaml/.yml")
    text = _read_text(path, field, err)
    try:
        accelerate = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        where = f" at line {mark.line + 1}" if mark else ""
        raise err(field, f"{path} is not valid YAML{where}: {problem}") from None
    if accelerate is None:
        raise err(field, f"{path} is empty; an accelerate config needs distributed_type: FSDP or DEEPSPEED")
    if not isinstance(accelerate, dict):
        raise err(
            field, f"{path} must be a YAML mapping (an accelerate config), not a {type(accelerate).__name__}"
        )
    if "distributed_type" not in accelerate:
        raise err(field, f"{path} has no distributed_type; allowed: FSDP, DEEPSPEED")
    kind = accelerate["distributed_type"]
    if kind == "FSDP":
        section = accelerate.get("fsdp_config") or {}
        if not isinstance(section, dict):
            raise err(field, f"{path}: fsdp_config must be a mapping")
        version = section.get("fsdp_version", section.get("version", 2))
        if version not in (2, "2"):
            # transformers would take it over the FSDP2 a gang is built for, and FSDP1 fails every trial on CPU.
            raise err(field, f"{path}: fsdp_config.fsdp_version is {version!r}; gangs train with FSDP2 (2)")
        return "fsdp", section
    if kind == "DEEPSPEED":
        return _accelerate_deepspeed(accelerate, path, field, err)
    raise err(field, f"{path}: distributed_type is {kind!r}; allowed: FSDP, DEEPSPEED")


def _check_gangs(cfg: SweepConfig, base: Path, err) -> None:
    """Gang settings that the file alone decides; the visible GPUs are checked by preflight."""
    dist, workers = cfg.distributed, cfg.workers
    if workers.gpus_per_trial == 1:
        if "distributed" in cfg.model_fields_set:
            raise err(("distributed",), "applies to gang trials only: set workers.gpus_per_trial > 1")
        return
    if cfg.pruner.type != "none" and cfg.objective.name != "eval_loss":
        # Every rank runs each intermediate evaluation's forwards on the sharded model, so all must
        # run the same ones. The other objectives do not promise that: generation sizes batches to
        # each rank's free GPU memory and halves them on that rank's out-of-memory, transformers
        # keeps decode steps in step across ranks (synced_gpus) for ZeRO-3 but not for
        # accelerate's FSDP2, and lm-eval batches by its own rules. The ranks would fall out of
        # step in a collective and hang.
        raise err(
            ("pruner", "type"),
            "gang trials (workers.gpus_per_trial > 1) are pruned on objective eval_loss only, not "
            f"{cfg.objective.name} (it cannot run in step on every rank of a sharded model); use none",
        )
    for name in ("count", "trials_per_gpu"):
        if name in workers.model_fields_set:
            raise err(
                ("workers", name),
                "does not apply to gang trials: the visible GPUs / gpus_per_trial gangs run at once",
            )
    if isinstance(workers.pack, int) and workers.pack > 1:
        raise err(("workers", "pack"), "gang trials are not packed; remove pack or set it to 1")
    if dist.config_file is None:
        return
    field = ("distributed", "config_file")
    for name in ("strategy", "offload"):
        if name in dist.model_fields_set:
            raise err(field, f"decides the strategy and offload itself; remove distributed.{name}")
    dist.config_file = (base / dist.config_file.expanduser()).resolve()
    problem = _file_problem(dist.config_file)
    if problem:
        raise err(field, problem)
    dist._file_strategy, dist._file_settings = _read_distributed_file(dist.config_file, field, err)


def _check_ray_gpus(cfg: SweepConfig, err) -> None:
    """A trial's GPUs are `workers.gpus_per_trial` on Ray too; `ray.gpus_per_trial` may only agree.

    For gang trials an actor reserves the gang's G GPUs, and unless `ray.cpus_per_trial` says
    otherwise a CPU for each of its G ranks. Checked whatever the backend: `--backend ray` may pick
    Ray when the file does not.
    """
    size, ray = cfg.workers.gpus_per_trial, cfg.ray
    field = ("ray", "gpus_per_trial")
    if "gpus_per_trial" in ray.model_fields_set:
        if size > 1 and ray.gpus_per_trial != size:
            raise err(
                field,
                f"is {ray.gpus_per_trial:g}, but a gang trial takes workers.gpus_per_trial = {size} GPUs; "
                f"remove ray.gpus_per_trial or set it to {size}",
            )
        if size == 1 and ray.gpus_per_trial > 1:
            # The actor's one-GPU trial would see them all, and Trainer would wrap it in DataParallel.
            raise err(
                field,
                f"{ray.gpus_per_trial:g} GPUs an actor, but trials train on one GPU; for one trial on "
                "several GPUs set workers.gpus_per_trial (a gang trial) instead",
            )
    if size > 1:
        ray.gpus_per_trial = size
        if "cpus_per_trial" not in ray.model_fields_set:
            ray.cpus_per_trial = size


def parse_config(text: str, file: Path) -> SweepConfig:
    """Validate YAML text as a `SweepConfig`; `file` is used for messages and relative paths."""

    def err(loc: tuple, message: str) -> InputError:
        return InputError(file, message, _dotted(loc) or None, _line_of(lines, loc))

    try:
        node = yaml.compose(text, Loader=_YamlLoader)
        raw = yaml.load(text, Loader=_YamlLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        raise InputError(file, f"invalid YAML: {problem}", None, mark.line + 1 if mark else None) from None
    if not isinstance(raw, dict):
        raise InputError(file, "must be a YAML mapping with at least name, model, data, objective, space")
    lines = _line_map(node, file)

    _check_keys(raw, SweepConfig, (), err)
    _check_space_shape(raw.get("space"), err)
    try:
        cfg = SweepConfig.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = tuple(p for p in first["loc"] if p not in PARAM_TYPES or len(first["loc"]) < 3)
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "missing":
            message = "is required"
        raise err(loc, message) from None
    if cfg.objective.name not in OBJECTIVES:
        raise err(
            ("objective", "name"),
            f"unknown objective {cfg.objective.name!r}; allowed: {', '.join(OBJECTIVES)}",
        )
    _check_space_semantics(cfg, err)
    _check_when_cycles(cfg, err)
    _check_grid(cfg, err)
    _check_training(cfg, err)
    _check_pruner(cfg, err)
    _check_storage(cfg, err)
    _check_tracking(cfg, err)
    _check_chat_template(cfg, err)
    _check_multi_objective(cfg, err)
    _check_gangs(cfg, file.parent, err)
    _check_ray_gpus(cfg, err)
    _resolve_data_source(cfg, file.parent, err)
    _resolve_paths(cfg, file.parent)
    cfg.source = file
    cfg._lines = {_dotted(loc): line for loc, line in lines.items() if loc}
    return cfg


def load_config(path: str | Path) -> SweepConfig:
    """Read and validate a search-space file; raises `InputError` with file, line and field."""
    file = Path(path)
    if not file.is_file():
        raise InputError(file, "search-space file not found")
    return parse_config(decode_utf8(file.read_bytes(), file), file)


def decode_utf8(raw: bytes, file: Path | str) -> str:
    """`raw` as text; a byte that is not UTF-8 is an `InputError` at its line and column."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        message = f"not UTF-8: byte 0x{raw[exc.start]:02x} at column {column}; save the file as UTF-8"
        raise InputError(file, message, line=line) from None
