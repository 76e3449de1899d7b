"""deltacomp: compress a fine-tuned model as a small delta over its base."""
__version__ = "0.1.0"
