"""Quality against size: weight metrics, perplexity, KL and gain recovered (metrics), the
rate-distortion sweep (sweep) and its figure (plots)."""
from .metrics import evaluate, format_table, write_json
from .sweep import format_sweep, sweep

__all__ = ["evaluate", "format_table", "write_json", "sweep", "format_sweep"]
