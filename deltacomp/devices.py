"""Where compression math runs: ``--device auto|cpu|cuda|cuda:N`` for compress, sweep and calibration.

Tensors stream to the device one at a time (a delta, its base where a codec needs it); each codec says
which device types its encode runs on (``Codec.encode_devices``), and a tensor whose codec cannot run
there is encoded on the CPU. Encoded tensors come back to the CPU before they are written.

``auto`` means the CPU until a GPU run has checked encode on CUDA against the CPU path
(``tests/test_cuda_compress.py``); set ``GPU_COMPRESS_CHECKED`` then, and ``auto`` picks CUDA when a
device is visible.
"""
from __future__ import annotations

import torch

from .errors import SettingsError

GPU_COMPRESS_CHECKED = False
CHOICES = "auto, cpu, cuda or cuda:N"


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The torch device for ``spec``; a one-line SettingsError for a bad or unavailable one."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "auto"):
        use_cuda = GPU_COMPRESS_CHECKED and torch.cuda.is_available()
        return torch.device("cuda" if use_cuda else "cpu")
    try:
        dev = torch.device(spec.strip() if isinstance(spec, str) else spec)
    except (RuntimeError, TypeError):
        raise SettingsError(f"--device {spec!r}: not a device; use {CHOICES}") from None
    if dev.type not in ("cpu", "cuda"):
        raise SettingsError(f"--device {spec!r}: compression runs on {CHOICES}, not {dev.type}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU build of torch" if torch.version.cuda is None else "no CUDA device visible"
            raise SettingsError(f"--device {spec}: CUDA is not available here ({build}, torch {torch.__version__}); "
                                "use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise SettingsError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return dev
