"""A 2**27-element tensor (512 MiB of float32): created, pushed and pulled through safetensors,
stored in chunks so that no Redis value exceeds 64 MiB."""

from __future__ import annotations

import json

import httpx
import numpy as np
import redis

from optserve.store import keys

from .api_helpers import ST

N = 2**27


def test_a_2_pow_27_element_tensor_round_trips(server_factory, valkey_server):
    server = server_factory(
        OPTSERVE_REDIS_URL=valkey_server.url,
        OPTSERVE_MAX_BODY_BYTES=str(600 * 2**20),
        # Moving 512 MB through the store on a busy 2-core machine can take longer than the
        # default 10 s store timeout; this test is about sizes, not about timeouts.
        OPTSERVE_STORE_TIMEOUT_S="120",
    )
    from safetensors.numpy import save

    param = np.arange(N, dtype=np.float32) / np.float32(N)  # distinct values, exact in float32
    with httpx.Client(base_url=server.url, timeout=600) as client:
        body = save({"big": param}, {"optimizer": json.dumps({"name": "sgd", "lr": 0.5})})
        created = client.post("/v1/sessions", content=body, headers={"content-type": ST})
        del body
        assert created.status_code == 201, created.text
        sid = created.json()["id"]
        grad = np.full(N, 0.25, np.float32)
        grad[::3] = -1.0
        pushed = client.post(
            f"/v1/sessions/{sid}/gradients?return=none",
            content=save({"big": grad}),
            headers={"content-type": ST},
        )
        assert pushed.status_code == 200 and pushed.json()["version"] == 1, pushed.text
        pulled = client.get(f"/v1/sessions/{sid}/params", headers={"accept": ST})
        assert pulled.status_code == 200
        header_len = int.from_bytes(pulled.content[:8], "little")
        values = np.frombuffer(pulled.content, dtype="<f4", offset=8 + header_len)
        expected = (param.astype(np.float64) - 0.5 * grad.astype(np.float64)).astype(np.float32)
        np.testing.assert_array_equal(values, expected)
        del pulled, values, expected

    store = redis.Redis.from_url(valkey_server.url)
    try:
        sizes = [store.strlen(key) for key in store.scan_iter(match=f"{keys.session_tag(sid)}:a:*")]
    finally:
        store.close()
    assert sum(sizes) == 4 * N and max(sizes) <= 64 * 2**20
