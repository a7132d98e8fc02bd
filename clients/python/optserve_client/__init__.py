"""Python client for optserve: push gradients, pull parameters, checkpoint optimizer state.

>>> from optserve_client import Client
>>> with Client("http://127.0.0.1:8000") as client:  # doctest: +SKIP
...     session = client.create_session("adam", {"w": w0}, lr=1e-3)
...     params = session.push({"w": grad})
"""

from __future__ import annotations

from ._base import PushResult
from ._version import __version__
from .client import Client, Session
from .errors import OptservError

__all__ = ["Client", "OptservError", "PushResult", "Session", "__version__"]
