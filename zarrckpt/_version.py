"""The zarrckpt version (a module of its own: lower layers need it without
importing the package root, which imports the API)."""

__version__ = "0.1.0"
