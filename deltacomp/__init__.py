"""deltacomp: a fine-tuned model as a small file — base + compressed delta.

Public API (mirrors the CLI)::

    deltacomp.compress(base, finetuned, "ft.delta.safetensors", method="bitdelta", ratio=None, rules=())
    deltacomp.compress_many(base, [ft1, ft2], "deltas/")  # several fine-tunes of one base, one base read
    deltacomp.reconstruct(base, "ft.delta.safetensors", "./ft-restored")
    delta = deltacomp.load_delta("ft.delta.safetensors")
    deltacomp.apply_delta_(model, delta)          # model loaded from the base, turned into the fine-tune
    deltacomp.patch_model(model, delta)           # or: serve the delta packed (DeltaLinear), no dense copy
"""
import os as _os
import signal as _signal
import sys as _sys
import threading as _threading


def _interrupted_while_starting(signum, frame):  # pragma: no cover - exercised in a subprocess (tests)
    """Ctrl-C while the ``deltacomp`` command imports torch and the rest (a second or two, before the
    command's own handler exists): one line and exit 130, as an interrupt later in the run gives. The exit
    is immediate (nothing is open yet): a SystemExit raised here could be swallowed by a library's import
    guard, leaving a half-imported module for the command to trip on (a RecursionError reported as a bug)."""
    _sys.stderr.write("deltacomp: interrupted while starting; nothing was written\n")
    _sys.stderr.flush()
    _os._exit(130)


# only for the command (not a library import, which keeps Python's KeyboardInterrupt), main thread only
_COMMAND = (bool(_sys.argv) and _os.path.basename(_sys.argv[0]) in ("deltacomp", "deltacomp.exe")
            and _threading.current_thread() is _threading.main_thread())
_previous = _signal.signal(_signal.SIGINT, _interrupted_while_starting) if _COMMAND else None
try:
    from ._version import __version__
    from .api import apply_delta_, compress, iter_reconstructed, load_delta, reconstruct, summarize
    from .codecs import available as available_methods
    from .many import compress_many
    from .serve import (DeltaLinear, MultiDeltaLinear, generate, patch_model, patch_model_multi, set_delta_index,
                        unpatch_model)
    from .delta_file import FORMAT
    from .errors import (BaseMismatchError, CheckpointError, ChecksumError, DeltacompError,
                         DeltaFormatError, OutputExistsError, SettingsError)
finally:
    if _COMMAND:
        _signal.signal(_signal.SIGINT, _previous)

__all__ = [
    "__version__", "FORMAT", "compress", "compress_many", "reconstruct", "load_delta", "apply_delta_", "iter_reconstructed",
    "summarize", "available_methods", "patch_model", "patch_model_multi", "set_delta_index", "unpatch_model",
    "DeltaLinear", "MultiDeltaLinear", "generate", "DeltacompError", "SettingsError", "CheckpointError", "DeltaFormatError",
    "ChecksumError", "BaseMismatchError", "OutputExistsError",
]
