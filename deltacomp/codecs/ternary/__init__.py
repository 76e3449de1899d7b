"""ternary (ComPEFT): the codec, its serving term (TERNARY_CSR) and its calibrator (least-squares scale)."""
from .calibrate import ternary_ls_scale
from .codec import TernaryCodec, parse_scale, threshold_positions, topk_positions

__all__ = ["TernaryCodec", "parse_scale", "threshold_positions", "topk_positions", "ternary_ls_scale"]
