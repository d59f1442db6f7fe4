"""Which GPUs a process running trials may see: exactly those of its slot.

A process that sees several GPUs makes `Trainer` wrap the model in `nn.DataParallel`, which TRL's
SFTTrainer refuses; so every process that runs trials is pinned before CUDA starts in it.
"""

from __future__ import annotations

import os
import shutil
import subprocess


def visible_gpus() -> list[str]:
    """GPU ids this process may use: CUDA_VISIBLE_DEVICES when set, else what nvidia-smi lists.

    Counted without torch: `torch.cuda.device_count()` caches its answer, so asking it before
    pinning would leave this process believing it still sees every GPU.
    """
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [gpu.strip() for gpu in listed.split(",") if gpu.strip() and gpu.strip() != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    found = subprocess.run(
        ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        check=False,
    )
    return (
        [line.strip() for line in found.stdout.splitlines() if line.strip()] if found.returncode == 0 else []
    )


def slot_device(slot: int, gpus: list[str], slots_per_gpu: int) -> str | None:
    """The GPU of worker `slot` when `slots_per_gpu` workers share each GPU; None on a CPU machine."""
    return gpus[(slot // slots_per_gpu) % len(gpus)] if gpus else None


def pin_to(device: str | None) -> None:
    """Make this process see only `device` (as cuda:0); must run before CUDA is initialised here."""
    if device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = device
