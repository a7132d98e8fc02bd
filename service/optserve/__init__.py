"""optserve: an optimizer as a service (params and optimizer state in Redis, updates over HTTP)."""

__version__ = "0.1.0"
