"""Shared fixtures. Tests run against a real Redis-protocol server, never a fake.

One embedded Valkey (the same binary and code path as `optserve serve` without
OPTSERVE_REDIS_URL) serves the whole test session on a free port; `redis_url` hands each test
that server emptied with FLUSHALL.
"""

from collections.abc import Iterator

import pytest
import redis
from optserve.store.embedded import EmbeddedValkey

# -- Redis ----------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def valkey_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedValkey]:
    """A real valkey-server for the whole session; `.url` is its redis:// URL."""
    server = EmbeddedValkey(tmp_path_factory.mktemp("valkey"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(valkey_server: EmbeddedValkey) -> str:
    """URL of the session's server, emptied so this test starts clean."""
    client = redis.Redis.from_url(valkey_server.url)
    try:
        client.flushall()
    finally:
        client.close()
    return valkey_server.url
