"""The base layers deltas are served over, one ``dispatch_*`` per backend (peft's style), tried in order.

A backend says how a base linear layer takes a delta: a float ``nn.Linear`` can take deltas in place
(those their codec prefers applied in place) and has a fingerprintable weight; a quantized layer (a
bitsandbytes ``Linear8bitLt`` / ``Linear4bit``, recognised by class name so bitsandbytes is never
imported here) computes its own output, so every delta is served as a term over it and its weight cannot
be fingerprinted against the float base. A new backend (another quantization library) is one more
``dispatch_*`` function in ``DISPATCHERS``.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

from torch import Tensor, nn


@dataclass(frozen=True)
class Backend:
    name: str
    quantized: bool  # True: the weight cannot take a delta in place, nor be fingerprinted


FLOAT = Backend("float", quantized=False)
BITSANDBYTES = Backend("bitsandbytes", quantized=True)


def is_quantized(tensor: Tensor) -> bool:
    """A weight stored quantized: integer storage (bitsandbytes Int8Params, 4-bit packed uint8), or a
    bitsandbytes Params4bit whose packed storage is a float dtype (``bnb_4bit_quant_storage``)."""
    return not tensor.is_floating_point() or type(tensor).__name__ == "Params4bit"


def dispatch_bitsandbytes(module: nn.Module) -> Backend | None:
    weight = getattr(module, "weight", None)
    return BITSANDBYTES if isinstance(module, nn.Linear) and weight is not None and is_quantized(weight) else None


def dispatch_float(module: nn.Module) -> Backend | None:
    return FLOAT if isinstance(module, nn.Linear) else None


DISPATCHERS: tuple[Callable[[nn.Module], Backend | None], ...] = (dispatch_bitsandbytes, dispatch_float)


def backend_of(module: nn.Module) -> Backend | None:
    """The first backend that claims ``module`` (None: not a linear layer a delta can be served over)."""
    return next((b for b in (d(module) for d in DISPATCHERS) if b is not None), None)


def check_base(checker, name: str, tensor: Tensor, where: str, warned: list) -> None:
    """Fingerprint check of one base tensor; a quantized base (int8/4-bit storage) cannot be hashed
    against the float base the delta was made from, so it is skipped with one warning."""
    if not is_quantized(tensor):
        checker.check(name, tensor.detach().cpu(), where)
    elif not warned:
        warned.append(name)
        warnings.warn(f"{where}: {name} is stored quantized ({tensor.dtype}); the base fingerprint cannot be "
                      "checked for quantized layers")
