"""Load the base model and tokenizer once per worker and hand them to trial after trial.

Loading (and, for QLoRA, quantizing) the base is the largest fixed cost of a trial; a worker keeps
one unquantized and one 4-bit base and gives trials a clean model each time: LoRA trials wrap the
shared base and unload their adapter afterwards, full fine-tuning trains a copy.
"""

from __future__ import annotations

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


def check_model_source(model: ModelConfig, source: Path) -> None:
    """Fail fast on a model that cannot be found, reading only its config.json."""
    path = Path(model.name_or_path)
    if path.is_absolute() and not path.exists():
        raise InputError(source, f"model path {model.name_or_path!r} does not exist", "model.name_or_path")
    try:
        AutoConfig.from_pretrained(
            model.name_or_path, revision=model.revision, trust_remote_code=model.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(
            source,
            f"cannot load {model.name_or_path!r} (a local folder or a hub id): {first_line}",
            "model.name_or_path",
        ) from None


def device() -> torch.device:
    """The device this worker trains on: its one visible GPU, else the CPU."""
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


class ModelCache:
    """The worker's base models and tokenizer; `loads` counts real loads from disk or hub."""

    def __init__(self, model: ModelConfig):
        self.config = model
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
            kwargs["device_map"] = {"": 0}
        model = AutoModelForCausalLM.from_pretrained(self.config.name_or_path, **kwargs)
        if not quantized:
            model.to(device())
        model.config.use_cache = False
        self.loads += 1
        return model

    def base(self, quantized: bool = False) -> PreTrainedModel:
        """The shared base model (4-bit when `quantized`), loaded on first use."""
        if quantized not in self._bases:
            self._bases[quantized] = self._load(quantized)
        return self._bases[quantized]
