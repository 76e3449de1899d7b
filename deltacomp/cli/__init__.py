"""The ``deltacomp`` command: argument parsing and printing only (compress, inspect, reconstruct,
export-lora, generate, demo, eval, sweep, serve); the work is done by the API."""
from .main import build_parser, main, parse_size, parse_size

__all__ = ["build_parser", "main", "parse_size"]
