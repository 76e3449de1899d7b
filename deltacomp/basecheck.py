"""Is this the base a delta was made against? Names, shapes and per-tensor fingerprints, checked the same
way by reconstruct, apply, serving, evaluation and calibration."""
from __future__ import annotations

import hashlib
import warnings

from torch import Tensor

from .checkpoint import Checkpoint
from .delta_file import DeltaFile, base_digest, tensor_digest
from .dtypes import DTYPES
from .errors import BaseMismatchError

FORCE_HINT = "; pass --force to apply it anyway"


class BaseChecker:
    """Compares base tensors with the fingerprint recorded in the delta file. ``force``: a mismatch
    warns once instead of raising."""

    def __init__(self, df: DeltaFile, force: bool = False):
        self.df, self.force, self.warned = df, force, False

    def matches(self, name: str, tensor: Tensor) -> bool:
        """True when ``tensor`` hashes to the fingerprint recorded for ``name`` (or none is recorded)."""
        want = self.df.base_tensors.get(name)
        if want is None:
            return True
        dt = self.df.metadata.get("base", {}).get("dtypes", {}).get(name)
        tensor = tensor.detach().cpu()
        if dt in DTYPES and tensor.dtype != DTYPES[dt]:
            tensor = tensor.to(DTYPES[dt])
        return base_digest(tensor) == want

    def check(self, name: str, tensor: Tensor, where: str, hint: str = FORCE_HINT) -> None:
        if not self.matches(name, tensor):
            self._mismatch(name, where, hint)

    def streamed(self, name: str) -> "StreamedCheck":
        """The same check for a tensor read in consecutive blocks of rows: ``update`` with each block,
        then ``check``."""
        return StreamedCheck(self, name)

    def _mismatch(self, name: str, where: str, hint: str) -> None:
        msg = (f"{where}: tensor {name} differs from the base {self.df.path} was made against "
               f"(fingerprint mismatch){hint}")
        if not self.force:
            raise BaseMismatchError(msg)
        if not self.warned:
            warnings.warn(msg.replace(hint, "; applying anyway (--force)"))
            self.warned = True


class StreamedCheck:
    """BaseChecker.check over a tensor's blocks of rows (the digest is over the same bytes)."""

    def __init__(self, checker: BaseChecker, name: str):
        self.checker, self.name = checker, name
        self.want = checker.df.base_tensors.get(name)
        dt = checker.df.metadata.get("base", {}).get("dtypes", {}).get(name)
        self.dtype = DTYPES.get(dt) if isinstance(dt, str) else None
        self._hash = hashlib.sha256()

    def update(self, block: Tensor) -> None:
        if self.want is not None:
            block = block.detach().cpu()
            tensor_digest(block.to(self.dtype) if self.dtype is not None else block, self._hash)

    def check(self, where: str, hint: str = FORCE_HINT) -> None:
        if self.want is not None and self._hash.hexdigest()[:32] != self.want:
            self.checker._mismatch(self.name, where, hint)


def check_base_names(df: DeltaFile, bck: Checkpoint) -> None:
    """Every tensor the delta applies to is in the base checkpoint, with the shape the delta expects."""
    for name, info in df.params.items():
        if info.tied_to is not None or not info.has_base:
            continue
        if name not in bck:
            raise BaseMismatchError(f"{bck.path}: has no tensor {name}, which {df.path} needs — wrong base?")
        want = info.encoded_shape
        if tuple(bck.shape(name)) != tuple(want) and not (want == (1,) and bck.shape(name) == ()):
            raise BaseMismatchError(f"{bck.path}: {name} has shape {list(bck.shape(name))}, "
                                    f"{df.path} expects {list(want)} — wrong base?")


def check_base(bck: Checkpoint, df: DeltaFile) -> None:
    """Names, shapes and every fingerprinted tensor of ``bck`` against ``df`` (raises BaseMismatchError)."""
    check_base_names(df, bck)
    checker = BaseChecker(df, force=False)
    for name in df.base_tensors:
        checker.check(name, bck.get(name), str(bck.path))
