"""lowrank: the codec (truncated SVD factors) and its calibrator (output-error refit, then tuning)."""
from .codec import SVD_METHODS, LowRankCodec, refuse_1d, truncated_svd

__all__ = ["LowRankCodec", "SVD_METHODS", "refuse_1d", "truncated_svd"]
