"""optserve: an optimizer as a service (parameters and optimizer state in Redis, updates over HTTP)."""

__version__ = "0.1.0"
