// Retries, idempotency keys and base_version, through a real proxy in front of a live server:
// answers are really lost (the server acted, the connection is reset before the client hears),
// ports really refuse connections. Only the 503 is the proxy's own answer.
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import { Client, OptservError, RetryPolicy, newIdempotencyKey, retryAfterMs, safetensors } from "../src/index.js";
import { SKIP_LIVE, URL_ } from "./helpers/env.js";
import { Proxy, freePort } from "./helpers/proxy.js";

const FAST = { attempts: 4, backoffMs: 20, maxBackoffMs: 100 };
const isPush = (r) => r.method === "POST" && r.path.endsWith("/gradients");

/** The fields of a recorded push body, whichever codec sent it. */
function pushFields(request) {
  if ((request.headers["content-type"] ?? "").startsWith("application/x-safetensors")) {
    const { metadata } = safetensors.decode(new Uint8Array(request.body));
    return Object.fromEntries(Object.entries(metadata).map(([k, v]) => [k, JSON.parse(v)]));
  }
  const { grads, ...fields } = JSON.parse(request.body.toString("utf8"));
  return fields;
}

async function direct(sid) {
  const session = await new Client({ url: URL_, retries: 0 }).session(sid);
  const { params } = await session.pull();
  return { version: session.version, w: Array.from(params.w.data) };
}

describe("retries through a proxy", { skip: SKIP_LIVE }, () => {
  let proxy;
  before(async () => {
    proxy = await new Proxy(URL_).start();
  });
  after(async () => {
    await proxy?.close();
  });

  for (const codec of ["safetensors", "json"]) {
    test(`a lost push answer is retried with the same key and applied once (${codec})`, async () => {
      const client = new Client({ url: proxy.url, codec, retries: FAST });
      const session = await client.createSession({ optimizer: "sgd", lr: 0.5, params: { w: [1, 2, -3, 0.5] } });
      const before = proxy.seen("POST", "/gradients").length;
      proxy.dropResponse(isPush);
      const result = await session.push({ w: [0.5, -1, 2, 0.25] });
      const pushes = proxy.seen("POST", "/gradients").slice(before);
      assert.equal(pushes.length, 2);
      assert.equal(pushes[0].headers["idempotency-key"], pushes[1].headers["idempotency-key"]);
      assert.equal(pushes[0].headers["idempotency-key"], result.idempotencyKey);
      assert.deepEqual(pushes[0].body, pushes[1].body); // the very same bytes, base_version too
      assert.equal(result.version, 1);
      assert.equal(result.applied, true);
      assert.equal(result.replayed, true); // the server answered from its record of attempt 1
      assert.deepEqual(Array.from(result.params.w.data), [0.75, 2.5, -4, 0.375]);
      assert.deepEqual(await direct(session.id), { version: 1, w: [0.75, 2.5, -4, 0.375] }); // once
      await session.delete();
    });
  }

  test("every push has its own key; a key of your own is sent as given", async () => {
    const client = new Client({ url: proxy.url, retries: FAST });
    const session = await client.createSession({ optimizer: "sgd", lr: 0.5, params: { w: [0, 0] } });
    const before = proxy.seen("POST", "/gradients").length;
    const a = await session.push({ w: [1, 1] });
    const b = await session.push({ w: [1, 1] });
    await session.push({ w: [1, 1] }, { idempotencyKey: "my-key-1" });
    const keys = proxy.seen("POST", "/gradients").slice(before).map((r) => r.headers["idempotency-key"]);
    assert.equal(new Set(keys).size, 3);
    assert.deepEqual(keys, [a.idempotencyKey, b.idempotencyKey, "my-key-1"]);
    assert.match(a.idempotencyKey, /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
    await session.delete();
  });

  test("a 4xx is never retried", async () => {
    const client = new Client({ url: proxy.url, retries: FAST });
    const session = await client.createSession({ optimizer: "sgd", lr: 0.5, params: { w: [0, 0] } });
    for (const [call, suffix, method, code] of [
      [() => session.push({ nope: [1] }), "/gradients", "POST", "unknown_tensor"],
      [() => session.putParams({ w: [1, 1] }, { ifMatch: 9 }), "/params", "PUT", "precondition_failed"],
      [() => client.session("no-such-session"), "/no-such-session", "GET", "session_not_found"],
    ]) {
      const before = proxy.seen(method, suffix).length;
      const error = await call().then(() => assert.fail("expected an error"), (e) => e);
      assert.ok(error instanceof OptservError);
      assert.equal(error.code, code);
      assert.equal(error.attempts, 1);
      assert.equal(proxy.seen(method, suffix).length - before, 1, code);
    }
    await session.delete();
  });

  test("a 503 is retried after Retry-After, with the same key", async () => {
    const client = new Client({ url: proxy.url, retries: { attempts: 3, backoffMs: 10, maxBackoffMs: 2000 } });
    const session = await client.createSession({ optimizer: "sgd", lr: 1, params: { w: [0] } });
    const before = proxy.seen("POST", "/gradients").length;
    const problem = JSON.stringify({ status: 503, code: "store_unavailable", detail: "store down" });
    proxy.respond(isPush, 503, { "content-type": "application/problem+json", "retry-after": "1" }, problem);
    const started = performance.now();
    const result = await session.push({ w: [1] });
    assert.ok(performance.now() - started >= 900, "waited for Retry-After");
    assert.equal(result.version, 1);
    assert.equal(result.replayed, false); // the 503 never reached the server
    const pushes = proxy.seen("POST", "/gradients").slice(before);
    assert.equal(pushes.length, 2);
    assert.equal(pushes[0].headers["idempotency-key"], pushes[1].headers["idempotency-key"]);

    // Out of attempts: the 503 is the error.
    const noRetry = await new Client({ url: proxy.url, retries: 0 }).session(session.id);
    proxy.respond(isPush, 503, { "content-type": "application/problem+json", "retry-after": "0" }, problem);
    const error = await noRetry.push({ w: [1] }).then(() => assert.fail("expected an error"), (e) => e);
    assert.equal(error.status, 503);
    assert.equal(error.code, "store_unavailable");
    assert.equal(error.attempts, 1);
    await session.delete();
  });

  test("a lost DELETE answer counts as deleted", async () => {
    const client = new Client({ url: proxy.url, retries: FAST });
    const session = await client.createSession({ optimizer: "sgd", lr: 1, params: { w: [0] } });
    proxy.dropResponse((r) => r.method === "DELETE");
    await session.delete(); // the retry's 404 means the first attempt did it
    assert.equal(proxy.seen("DELETE", session.id).length, 2);
    const error = await client.session(session.id).then(() => assert.fail("expected an error"), (e) => e);
    assert.equal(error.code, "session_not_found");
  });

  test("a create is not resent once it may have arrived", async () => {
    const client = new Client({ url: proxy.url, retries: FAST });
    const before = proxy.seen("POST", "/v1/sessions").length;
    proxy.dropResponse((r) => r.method === "POST" && r.path === "/v1/sessions");
    const error = await client
      .createSession({ optimizer: "sgd", lr: 1, params: { w: [0] }, name: "lost-create" })
      .then(() => assert.fail("expected an error"), (e) => e);
    assert.equal(error.code, "transport_error");
    assert.equal(error.status, null);
    assert.equal(error.attempts, 1);
    assert.ok(error.cause instanceof Error);
    assert.equal(proxy.seen("POST", "/v1/sessions").length - before, 1);
    // It did arrive: one session of that name exists; clean it up.
    const made = (await new Client({ url: URL_ }).listSessions()).filter((s) => s.name === "lost-create");
    assert.equal(made.length, 1);
    await (await new Client({ url: URL_ }).session(made[0].id)).delete();
  });

  test("retries can be turned off", async () => {
    for (const retries of [0, null]) {
      const client = new Client({ url: proxy.url, retries });
      const session = await client.createSession({ optimizer: "sgd", lr: 1, params: { w: [0] } });
      proxy.dropResponse(isPush);
      const error = await session.push({ w: [1] }).then(() => assert.fail("expected an error"), (e) => e);
      assert.equal(error.code, "transport_error");
      assert.equal(error.attempts, 1);
      assert.equal((await direct(session.id)).version, 1); // it was applied; only the answer was lost
      await (await new Client({ url: URL_ }).session(session.id)).delete();
    }
  });

  test("base_version is sent from the newest version seen", async () => {
    const client = new Client({ url: proxy.url, codec: "safetensors", retries: FAST });
    const session = await client.createSession({ optimizer: "sgd", lr: 1, params: { w: [0] } });
    const other = await new Client({ url: URL_ }).session(session.id);
    const before = proxy.seen("POST", "/gradients").length;
    await session.push({ w: [1] }, { worker: "w1" }); // base 0 -> version 1
    await session.push({ w: [1] }); // base 1 -> 2
    await other.push({ w: [1] }); // 3, behind this handle's back
    await session.push({ w: [1] }); // base 2: this handle has not seen 3; -> 4
    await other.push({ w: [1] }); // 5
    assert.equal((await session.pull()).version, 5); // now this handle has seen 5
    await session.push({ w: [1] }); // base 5
    await session.push({ w: [1] }, { baseVersion: 1 });
    await session.push({ w: [1] }, { baseVersion: null });
    const sent = proxy.seen("POST", "/gradients").slice(before).map(pushFields);
    assert.deepEqual(sent, [
      { base_version: 0, worker: "w1" },
      { base_version: 1 },
      { base_version: 2 },
      { base_version: 5 },
      { base_version: 1 },
      {},
    ]);
    await session.delete();
  });
});

describe("retries without a server", () => {
  test("connection refused is retried until the server listens", { skip: SKIP_LIVE }, async () => {
    const port = await freePort();
    const client = new Client({ url: `http://127.0.0.1:${port}`, retries: { attempts: 30, backoffMs: 50, maxBackoffMs: 100 } });
    const late = new Proxy(URL_);
    const timer = setTimeout(() => late.start(port), 300);
    try {
      const sessions = await client.listSessions({ limit: 1 });
      assert.ok(Array.isArray(sessions));
      assert.ok(late.requests.length >= 1);
      // A create is retried too while its connection is refused: it surely never left.
      const before = late.seen("POST", "/v1/sessions").length;
      const session = await client.createSession({ optimizer: "sgd", lr: 1, params: { w: [0] } });
      assert.equal(late.seen("POST", "/v1/sessions").length - before, 1);
      await session.delete();
    } finally {
      clearTimeout(timer);
      await late.close().catch(() => {});
    }
  });

  test("retries give up after the policy's attempts", async () => {
    const port = await freePort();
    const client = new Client({ url: `http://127.0.0.1:${port}`, retries: { attempts: 3, backoffMs: 1, maxBackoffMs: 5 } });
    const error = await client.listSessions().then(() => assert.fail("expected an error"), (e) => e);
    assert.ok(error instanceof OptservError);
    assert.equal(error.code, "transport_error");
    assert.equal(error.attempts, 3);
    assert.match(error.detail, /ECONNREFUSED/);
  });

  test("a timeout is a transport error", async () => {
    const { createServer } = await import("node:http");
    const silent = createServer(() => {}); // accepts, never answers
    await new Promise((resolve) => silent.listen(0, "127.0.0.1", resolve));
    try {
      const client = new Client({ url: `http://127.0.0.1:${silent.address().port}`, timeoutMs: 200, retries: 1 });
      const started = performance.now();
      const error = await client.listSessions({ limit: 1 }).then(() => assert.fail("expected an error"), (e) => e);
      assert.equal(error.code, "transport_error");
      assert.equal(error.attempts, 2); // a GET is safe to retry after a timeout
      assert.ok(performance.now() - started >= 380);
      assert.match(error.detail, /TimeoutError/);
    } finally {
      silent.closeAllConnections?.();
      await new Promise((resolve) => silent.close(resolve));
    }
  });

  test("RetryPolicy delays and Retry-After", () => {
    const policy = new RetryPolicy({ attempts: 5, backoffMs: 100, maxBackoffMs: 1000, jitter: 0 });
    assert.deepEqual([1, 2, 3, 4, 5].map((n) => policy.delay(n)), [100, 200, 400, 800, 1000]);
    assert.equal(policy.delay(1, 700), 700);
    assert.equal(policy.delay(1, 5000), 1000); // never beyond maxBackoffMs
    const jittery = new RetryPolicy({ backoffMs: 100, jitter: 0.5 });
    for (let i = 0; i < 50; i++) {
      const d = jittery.delay(1);
      assert.ok(d > 50 && d <= 100);
    }
    assert.equal(RetryPolicy.of(0).attempts, 1);
    assert.equal(RetryPolicy.of(null).attempts, 1);
    assert.equal(RetryPolicy.of(3).attempts, 4);
    assert.equal(RetryPolicy.of(undefined).attempts, 5);
    assert.throws(() => RetryPolicy.of(-1), RangeError);
    assert.throws(() => new RetryPolicy({ attempts: 0 }), RangeError);
    assert.equal(retryAfterMs(new Headers({ "retry-after": "2" })), 2000);
    const date = new Date(Date.now() + 3000).toUTCString();
    const ms = retryAfterMs(new Headers({ "retry-after": date }));
    assert.ok(ms > 1000 && ms <= 3000);
    assert.equal(retryAfterMs(new Headers({ "retry-after": "soon" })), null);
    assert.equal(retryAfterMs(new Headers()), null);
    assert.notEqual(newIdempotencyKey(), newIdempotencyKey());
  });

  test("bad arguments fail before anything is sent", async () => {
    assert.throws(() => new Client({ url: "not a url" }), TypeError);
    assert.throws(() => new Client({ url: "http://x", codec: "msgpack" }), TypeError);
    const client = new Client({ url: "http://127.0.0.1:9", retries: 0, fetch: () => assert.fail("sent") });
    const { Session } = await import("../src/index.js");
    const session = new Session(client, "s", 0);
    await assert.rejects(session.push({ w: [1] }, { returning: "some" }), RangeError);
    await assert.rejects(session.push({ w: [1] }, { baseVersion: -1 }), RangeError);
    await assert.rejects(session.push({ w: { shape: [2], data: [1] } }), RangeError);
    await assert.rejects(session.putParams({ w: [1] }, { ifMatch: 1.5 }), RangeError);
    await assert.rejects(session.push({ w: [1] }, { idempotencyKey: "bad\nkey" }), TypeError);
  });
});
