"""The package version (the file format has its own version: delta_file.FORMAT)."""
__version__ = "0.1.0"
