"""The one dtype table: names written into delta files and config (``float32``, ``bfloat16``, ...) and
safetensors' dtype codes, both mapped to torch dtypes."""
from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64, "int64": torch.int64, "int32": torch.int32, "int16": torch.int16,
          "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool}

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str, choices: tuple[str, ...] | None = None) -> torch.dtype:
    """``"bfloat16"`` -> torch.bfloat16 (CLI options); ValueError for a name outside ``choices``."""
    if name not in DTYPES or (choices is not None and name not in choices):
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(choices or DTYPES)}")
    return DTYPES[name]
