"""Python client for optserve (the HTTP surface arrives with the service)."""

__version__ = "0.1.0"
