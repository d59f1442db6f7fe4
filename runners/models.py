"""Load the base model and tokenizer once per worker and hand them to trial after trial.

Loading (and, for QLoRA, quantizing) the base is the largest fixed cost of a trial; a worker keeps
one unquantized and one 4-bit base and gives trials a clean model each time: LoRA trials wrap the
shared base and unload their adapter afterwards, full fine-tuning trains a copy.
"""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from core.config import ModelConfig
from core.errors import InputError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


class QLoRAUnavailable(RuntimeError):
    """QLoRA was asked for on a machine that cannot run bitsandbytes 4-bit kernels."""


def qlora_unavailable_reason() -> str | None:
    """Why QLoRA cannot run here, or None when it can."""
    if not torch.cuda.is_available():
        return "method qlora needs a CUDA GPU (bitsandbytes 4-bit); this machine has none"
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return "method qlora needs bitsandbytes: pip install 'sweep[qlora]'"
    return None


_FIELD = "model.name_or_path"
# Files any of which gives a tokenizer its vocabulary (fast tokenizer, sentencepiece, BPE, WordPiece, tiktoken).
_TOKENIZER_FILES = ("tokenizer.json", "*.model", "vocab.json", "vocab.txt", "merges.txt", "*.tiktoken")
_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or "\\" in name or bool(re.match(r"^[A-Za-z]:", name))


def _is_hub_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _hub_unreachable(model: ModelConfig) -> str | None:
    """Why the hub cannot be asked for `model` now (no network, model not cached), else None.

    Without this, the hub client retries for about 30 s before the same conclusion. Offline mode
    (HF_HUB_OFFLINE) fails at once in the loader, so it is left to it.
    """
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE:
        return None
    if isinstance(try_to_load_from_cache(model.name_or_path, "config.json", revision=model.revision), str):
        return None
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=3).close()
    except OSError as exc:
        return f"{constants.ENDPOINT} is unreachable ({exc.strerror or exc})"
    return None


def safetensors_problem(file: Path) -> str | None:
    """Why `file` is not a complete safetensors file, reading only its header; None when it is.

    The format is an 8-byte little-endian header length, a JSON header giving each tensor's byte
    range, then the tensors; a truncated download or a garbage file fails one of those checks.
    """
    size = file.stat().st_size
    with file.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return f"{file} is {size} bytes, too short for a safetensors file"
        length = int.from_bytes(head, "little")
        if length == 0 or length > _MAX_HEADER or 8 + length > size:
            return f"{file} is truncated or not safetensors: its header length field says {length} bytes, the file has {size}"
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return f"{file} is not a safetensors file: its header is not JSON"
    if not isinstance(header, dict):
        return f"{file} is not a safetensors file: its header is not a JSON object"
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            return f"{file} is not a safetensors file: tensor {name!r} has no data_offsets"
        end = max(end, offsets[1])
    if 8 + length + end != size:
        return (
            f"{file} is truncated or corrupt: its header describes {8 + length + end} bytes, "
            f"the file holds {size}"
        )
    return None


def _weights_problem(folder: Path) -> str | None:
    """Why the safetensors weights of a local model folder cannot load, or None."""
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if single.is_file():
        return safetensors_problem(single)
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
            return f"{index} is not a shard index (a JSON object with a weight_map)"
        for shard in shards:
            if not (folder / shard).is_file():
                return f"{index} names shard {shard}, which is missing"
            problem = safetensors_problem(folder / shard)
            if problem:
                return problem
        return None
    if any(folder.glob("pytorch_model*.bin")):
        return f"{folder} holds only PyTorch .bin weights; sweep loads safetensors (model.safetensors)"
    return f"{folder} holds no model weights (model.safetensors or model.safetensors.index.json)"


def check_model_source(model: ModelConfig, source: Path) -> None:
    """Fail fast on a model that cannot be found or loaded, reading only its config and file headers.

    A name that is not a local folder must be a hub id; anything else (a missing relative folder,
    a Windows path) is reported at once instead of after the hub client's retries.
    """
    name = model.name_or_path
    path = Path(name).expanduser()
    if not path.exists():
        if _looks_like_path(name):
            raise InputError(
                source,
                f"model path {name!r} does not exist (and it is no hub id, which reads org/name)",
                _FIELD,
            )
        if not _is_hub_id(name):
            raise InputError(
                source, f"{name!r} is neither a local folder (no such path) nor a hub id (org/name)", _FIELD
            )
        unreachable = _hub_unreachable(model)
        if unreachable:
            raise InputError(
                source,
                f"cannot load {name!r}: no folder {name} beside {Path(source).name}, and as a hub id: "
                f"{unreachable} and it is not in the local cache",
                _FIELD,
            )
    elif not path.is_dir():
        raise InputError(source, f"{name!r} is a file; give the model's folder", _FIELD)
    else:
        if not any(any(path.glob(pattern)) for pattern in _TOKENIZER_FILES):
            raise InputError(
                source,
                f"model folder {name} has no tokenizer files ({', '.join(_TOKENIZER_FILES)}); "
                "save the tokenizer beside the weights (tokenizer.save_pretrained)",
                _FIELD,
            )
        problem = _weights_problem(path)
        if problem:
            raise InputError(source, problem, _FIELD)
    try:
        AutoConfig.from_pretrained(
            model.name_or_path, revision=model.revision, trust_remote_code=model.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        what = "from the folder"
        if not path.exists():
            what = f"no folder {name} beside {Path(source).name}, and as a hub id"
        raise InputError(source, f"cannot load {name!r}: {what}: {first_line}", _FIELD) from None


def module_names(model: ModelConfig) -> dict[str, str] | None:
    """Every module of the model (dotted name -> class name), built on the meta device: no weights.

    None when the architecture cannot be built from its config here (the trial will say why).
    """
    try:
        config = AutoConfig.from_pretrained(
            model.name_or_path, revision=model.revision, trust_remote_code=model.trust_remote_code
        )
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=model.trust_remote_code)
    except Exception:  # noqa: BLE001  (any failure here only skips a check; loading reports it properly)
        return None
    return {name: type(module).__name__ for name, module in skeleton.named_modules() if name}


def unknown_target_module(names: dict[str, str], targets: list[str]) -> str | None:
    """The first of `targets` matching no module, as peft matches them (the name or its last parts)."""
    for target in targets:
        if not any(name == target or name.endswith("." + target) for name in names):
            return target
    return None


def linear_layer_names(names: dict[str, str]) -> list[str]:
    """Short names of the model's Linear layers: what `target_modules` usually lists."""
    return sorted({name.rsplit(".", 1)[-1] for name, kind in names.items() if kind == "Linear"})


def device() -> torch.device:
    """The device this worker trains on: its current GPU (its one visible GPU, or a gang rank's own), else the CPU."""
    return (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )


class ModelCache:
    """The worker's base models and tokenizer; `loads` counts real loads from disk or hub.

    An unquantized base goes to `place`, by default the worker's `device()`; a gang rank keeps its
    base in CPU memory and trains copies of it (`runners.gang`).
    """

    def __init__(self, model: ModelConfig, place: torch.device | None = None):
        self.config = model
        self.place = place
        self.loads = 0
        self._tokenizer = None
        self._bases: dict[bool, PreTrainedModel] = {}

    def tokenizer(self):
        """The tokenizer, with a pad token (eos when the model defines none)."""
        if self._tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(
                self.config.name_or_path,
                revision=self.config.revision,
                trust_remote_code=self.config.trust_remote_code,
            )
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            self._tokenizer = tokenizer
        return self._tokenizer

    def _load(self, quantized: bool) -> PreTrainedModel:
        kwargs: dict = {
            "revision": self.config.revision,
            "trust_remote_code": self.config.trust_remote_code,
            "dtype": _DTYPES[self.config.dtype],
            "use_safetensors": True,
        }
        if self.config.attn_implementation:
            kwargs["attn_implementation"] = self.config.attn_implementation
        if quantized:
            reason = qlora_unavailable_reason()
            if reason:
                raise QLoRAUnavailable(reason)
            from transformers import BitsAndBytesConfig

            q = self.config.quantization
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=q.quant_type,
                bnb_4bit_use_double_quant=q.double_quant,
                bnb_4bit_compute_dtype=_DTYPES[q.compute_dtype],
            )
            kwargs["device_map"] = {"": device().index}
        model = AutoModelForCausalLM.from_pretrained(self.config.name_or_path, **kwargs)
        if not quantized:
            model.to(self.place or device())
        model.config.use_cache = False
        self.loads += 1
        return model

    def base(self, quantized: bool = False) -> PreTrainedModel:
        """The shared base model (4-bit when `quantized`), loaded on first use."""
        if quantized not in self._bases:
            self._bases[quantized] = self._load(quantized)
        return self._bases[quantized]
