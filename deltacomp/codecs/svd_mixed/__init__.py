"""svd-mixed: the codec, its bit allocation over singular vectors, and its calibrator (GPTQ)."""
from .codec import SvdMixedCodec

__all__ = ["SvdMixedCodec"]
