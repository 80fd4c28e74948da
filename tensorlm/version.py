"""The package version, in a module of its own so that any module may import it at top level."""

__version__ = "0.1.0"
