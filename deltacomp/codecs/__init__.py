"""Codec registry. Each method lives in its own module and registers itself under a CodecName."""
from .base import Codec, CodecName, Encoded, Setting, available, get_codec, register
from . import raw, bitdelta  # noqa: F401  (registration)
from . import ternary, dare  # noqa: F401  (registration)

__all__ = ["Codec", "CodecName", "Encoded", "Setting", "available", "get_codec", "register"]
