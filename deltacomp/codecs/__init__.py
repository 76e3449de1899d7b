"""Codec registry. Each method lives in its own module or package and registers itself; everything the
rest of deltacomp needs to know about a method it asks the codec (base.Codec, term.DeltaTerm,
calibrator.Calibrator)."""
from .base import Codec, CodecName, Encoded, Setting, auto_defaults, available, get_codec, register, unregister
from . import raw, bitdelta, lowrank, svd_mixed, ternary, dare, svd_sparse  # noqa: F401  (registration)

__all__ = ["Codec", "CodecName", "Encoded", "Setting", "auto_defaults", "available", "get_codec", "register",
           "unregister"]
