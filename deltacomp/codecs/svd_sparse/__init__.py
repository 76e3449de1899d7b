"""svd-sparse: svd-mixed's quantized singular vectors plus a sparse ternary residual (low-rank + sparse),
its serving term (the two terms summed) and its calibrator (GPTQ of the low-rank part, then the residual's
least-squares scale)."""
from .codec import SvdSparseCodec

__all__ = ["SvdSparseCodec"]
