"""`optserve keys create|list|revoke`: the admin CLI for API keys kept in the store.

It talks to the store the server uses: OPTSERVE_REDIS_URL when set. Without it (the embedded
store) it connects to the embedded Valkey of OPTSERVE_DATA_DIR if a server runs on it (the
server holds the data dir's lock, not the Valkey: any local client may talk to it), or else starts
that Valkey itself for the moment the command takes (holding the lock meanwhile, so a server
started in that moment waits for nothing: it fails fast and is started again).

`create` prints the key once, on stdout (and what it is on stderr): only its SHA-256 is stored,
so it cannot be shown again. `list` never shows keys, only ids, tenants and creation times.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from datetime import UTC, datetime

import redis

from .api_key import check_tenant_name, hash_key, new_key
from .config import Settings
from .store.api_keys import ApiKeyAdmin, KeyRecord
from .store.embedded import (
    EmbeddedValkey,
    EmbeddedValkeyError,
    answering_pid,
    find_survivor,
    recorded_port,
)


@contextlib.contextmanager
def store_client(settings: Settings) -> Iterator[redis.Redis]:
    """A client of the store the server uses (see the module docstring)."""
    if settings.redis_url:
        client = redis.Redis.from_url(settings.redis_url)
        try:
            yield client
        finally:
            client.close()
        return
    data_dir = settings.data_dir.resolve()
    embedded: EmbeddedValkey | None = None
    url = _running_embedded(data_dir)
    if url is None:
        embedded = EmbeddedValkey(data_dir)
        url = embedded.start()
    client = redis.Redis.from_url(url)
    try:
        yield client
    finally:
        client.close()
        if embedded is not None:
            embedded.stop()


def _running_embedded(data_dir) -> str | None:
    """The URL of a Valkey already running on `data_dir` (a server's embedded store), if any."""
    pid = find_survivor(data_dir) if data_dir.is_dir() else None
    port = recorded_port(data_dir / "valkey.conf") if pid is not None else None
    if port is not None and answering_pid(port) == pid:
        return f"redis://127.0.0.1:{port}"
    return None


def create(admin: ApiKeyAdmin, tenant: str) -> int:
    created = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    while True:
        key_id, key = new_key()
        if admin.add(KeyRecord(key_id, tenant, created, hash_key(key))):
            break
    print(f"key {key_id} for tenant {tenant!r} (shown once; keep it secret):", file=sys.stderr)
    print(key)
    return 0


def list_keys(admin: ApiKeyAdmin) -> int:
    records = admin.all()
    print(f"{'ID':<14}{'TENANT':<34}CREATED")
    for record in records:
        print(f"{record.key_id:<14}{record.tenant:<34}{record.created}")
    return 0


def revoke(admin: ApiKeyAdmin, key_id: str) -> int:
    if not admin.revoke(key_id):
        print(f"no key {key_id!r} (see `optserve keys list`)", file=sys.stderr)
        return 1
    print(f"revoked {key_id}; servers refuse it within OPTSERVE_API_KEY_CACHE_S", file=sys.stderr)
    return 0


def run(args: argparse.Namespace) -> None:
    try:
        if args.keys_command == "create":
            check_tenant_name(args.tenant)
        with store_client(Settings()) as client:
            admin = ApiKeyAdmin(client)
            if args.keys_command == "create":
                code = create(admin, args.tenant)
            elif args.keys_command == "list":
                code = list_keys(admin)
            else:
                code = revoke(admin, args.id)
    except (ValueError, redis.RedisError, EmbeddedValkeyError) as error:
        print(f"optserve keys: {error}", file=sys.stderr)
        code = 2
    sys.exit(code)


def add_parser(commands: argparse._SubParsersAction) -> None:
    """`keys` and its subcommands, on the main parser's subcommands."""
    keys_parser = commands.add_parser("keys", help="create, list and revoke API keys")
    keys_commands = keys_parser.add_subparsers(dest="keys_command", required=True)
    create_parser = keys_commands.add_parser("create", help="make a key (printed once)")
    create_parser.add_argument("--tenant", required=True, help="the tenant the key acts for")
    keys_commands.add_parser("list", help="ids, tenants and creation times (never the keys)")
    revoke_parser = keys_commands.add_parser("revoke", help="revoke a key by its id")
    revoke_parser.add_argument("id", help="the key's id, as `keys list` shows it")
    keys_parser.set_defaults(run=run)
