"""The distribution version, in one place (the User-Agent carries it)."""

__version__ = "0.1.0"
