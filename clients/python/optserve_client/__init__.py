"""Python client for optserve: push gradients, pull parameters, checkpoint optimizer state.

>>> from optserve_client import Client
>>> with Client("http://127.0.0.1:8000") as client:  # doctest: +SKIP
...     session = client.create_session("adam", {"w": w0}, lr=1e-3)
...     params = session.push({"w": grad})

`AsyncClient` / `AsyncSession` are the same API with `await`. Both retry transport failures,
503s and 429s under a `RetryPolicy` (`retries=`); a push is applied at most once however often it is
retried, since all its attempts carry one Idempotency-Key.
"""

from __future__ import annotations

from ._base import PushResult, RetryPolicy
from ._version import __version__
from .async_client import AsyncClient, AsyncSession
from .client import Client, Session
from .errors import OptservError

__all__ = [
    "AsyncClient",
    "AsyncSession",
    "Client",
    "OptservError",
    "PushResult",
    "RetryPolicy",
    "Session",
    "__version__",
]
