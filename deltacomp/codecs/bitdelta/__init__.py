"""bitdelta: the codec, its serving terms (fused and multi-tenant) and its calibrator (scale distillation)."""
from .codec import BitDeltaCodec

__all__ = ["BitDeltaCodec"]
