"""What a benchmark result was measured on: device, driver, library versions and the git commit."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def nvidia_driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
        )
    except OSError:
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def environment() -> dict:
    """Device name, driver and versions of the libraries a training step runs through."""
    import deepspeed
    import peft
    import torch
    import transformers

    cuda = torch.cuda.is_available()
    return {
        "device": "cuda" if cuda else "cpu",
        "device_name": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
        "driver": nvidia_driver() if cuda else None,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "deepspeed": deepspeed.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
        "git_commit": git_commit(),
    }
