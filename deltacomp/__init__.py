"""deltacomp: a fine-tuned model as a small file — base + compressed delta.

Public API (mirrors the CLI)::

    deltacomp.compress(base, finetuned, "ft.delta.safetensors", method="bitdelta", ratio=None, rules=())
    deltacomp.reconstruct(base, "ft.delta.safetensors", "./ft-restored")
    delta = deltacomp.load_delta("ft.delta.safetensors")
    deltacomp.apply_delta_(model, delta)          # model loaded from the base, turned into the fine-tune
    deltacomp.patch_model(model, delta)           # or: serve the delta packed (DeltaLinear), no dense copy
"""
__version__ = "0.1.0"

from .api import apply_delta_, compress, iter_reconstructed, load_delta, reconstruct, summarize  # noqa: E402
from .codecs import available as available_methods  # noqa: E402
from .nn import (DeltaLinear, MultiDeltaLinear, patch_model, patch_model_multi, set_delta_index,  # noqa: E402
                 unpatch_model)
from .serve import generate  # noqa: E402
from .delta_file import FORMAT  # noqa: E402
from .errors import (BaseMismatchError, CheckpointError, ChecksumError, DeltacompError,  # noqa: E402
                     DeltaFormatError, OutputExistsError, SettingsError)

__all__ = [
    "__version__", "FORMAT", "compress", "reconstruct", "load_delta", "apply_delta_", "iter_reconstructed",
    "summarize", "available_methods", "patch_model", "patch_model_multi", "set_delta_index", "unpatch_model",
    "DeltaLinear", "MultiDeltaLinear", "generate", "DeltacompError", "SettingsError", "CheckpointError", "DeltaFormatError",
    "ChecksumError", "BaseMismatchError", "OutputExistsError",
]
