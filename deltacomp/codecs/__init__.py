"""Codec registry. Each method lives in its own module and registers itself under a CodecName."""
from .base import Codec, CodecName, Encoded, Setting, available, get_codec, register
from . import raw, bitdelta, lowrank, svd_mixed, ternary, dare  # noqa: F401  (registration)

__all__ = ["Codec", "CodecName", "Encoded", "Setting", "available", "get_codec", "register"]
