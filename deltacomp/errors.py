"""Typed errors. Every user mistake raises a DeltacompError subclass whose message is one line that
names the file or tensor, says what is wrong (expected vs actual) and, where there is one, the fix.
The CLI prints ``error: <message>`` and exits non-zero for these; anything else is a bug."""


class DeltacompError(Exception):
    """Base of all errors caused by input rather than by a bug."""


class SettingsError(DeltacompError, ValueError):
    """A method spec, codec setting or rule is malformed or unknown."""


class NoFactorsError(SettingsError):
    """A codec stores no low-rank factors, so its delta cannot be exported as a LoRA adapter."""


class CheckpointError(DeltacompError):
    """A model folder/file cannot be read, is pickled, or base and fine-tune do not pair up."""


class ModelLayoutError(CheckpointError):
    """A delta tensor that the loaded model holds in another layout (transformers merged it on load)."""


class NonFiniteError(CheckpointError):
    """A base or fine-tune tensor holds NaN or Inf values (a delta of them would be all NaN)."""


class DeltaFormatError(DeltacompError):
    """A delta file is truncated, corrupted, of an unknown format version, or out of bounds."""


class ChecksumError(DeltaFormatError):
    """The encoded bytes of a tensor do not match the checksum recorded when it was written."""


class UnknownTensorError(DeltacompError, KeyError):
    """A tensor name asked of a delta file that it does not hold (a KeyError too, for dict-like callers)."""

    def __str__(self) -> str:  # the message as written, not KeyError's repr of it
        return Exception.__str__(self)


class BaseMismatchError(DeltacompError):
    """The base model given is not the one the delta was made against."""


class OutputExistsError(DeltacompError):
    """The output path exists and overwriting was not asked for."""


class OutputIsInputError(OutputExistsError):
    """The output path is (or, for a folder, holds) a file this run reads: writing it would destroy an input."""


class OutputBusyError(OutputExistsError):
    """Another run is writing the same output right now (its lock is held)."""


class WorkerError(DeltacompError):
    """A distributed task kept failing: its worker died (killed, out of memory, node lost) every try."""
