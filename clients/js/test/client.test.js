// The client against a live `optserve serve` (OPTSERVE_URL), in both codecs. Server behaviour is
// never imitated: the oracle for pushes is the server's own JSON API driven with plain fetch.
import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { Client, OptservError, Session } from "../src/index.js";
import { SKIP_LIVE, URL_, assertSameTensors, bitsOf, fromBits, rng, sameBits, tensor } from "./helpers/env.js";

const CODECS = ["safetensors", "json"];

/** The server's JSON API without the client. */
async function raw(method, path, body) {
  const response = await fetch(`${URL_}${path}`, {
    method,
    headers: body === undefined ? {} : { "content-type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  return { status: response.status, headers: response.headers, body: text ? JSON.parse(text) : null };
}

const jsonTensor = (t) => ({ shape: t.shape, data: Array.from(t.data) });

async function errorOf(promise) {
  try {
    await promise;
  } catch (error) {
    assert.ok(error instanceof OptservError, `expected an OptservError, got ${error}`);
    return error;
  }
  assert.fail("expected an OptservError");
}

for (const codec of CODECS) {
  describe(`client (${codec})`, { skip: SKIP_LIVE }, () => {
    const client = URL_ && new Client({ url: URL_, codec, retries: { attempts: 3, backoffMs: 20, maxBackoffMs: 100 } });

    test("create, info, list, session(id), update, delete", async () => {
      const w = tensor([2, 3], [0, 1, 2, 3, 4, 5]);
      const session = await client.createSession({
        optimizer: "adam",
        params: { w },
        tensors: { b: [3], emb: { shape: [4, 2] }, c: 2 },
        name: "demo",
        lr: 0.01,
        eps: 1e-6,
      });
      assert.ok(session instanceof Session);
      assert.equal(session.version, 0);
      const info = await session.info();
      assert.equal(info.id, session.id);
      assert.equal(info.name, "demo");
      assert.equal(info.optimizer.name, "adam");
      assert.equal(info.optimizer.lr, 0.01);
      assert.equal(info.optimizer.eps, 1e-6);
      assert.deepEqual(info.optimizer.betas, [0.9, 0.999]); // defaults filled in by the server
      assert.deepEqual(info.tensors, {
        w: { shape: [2, 3], dtype: "float32" },
        b: { shape: [3], dtype: "float32" },
        emb: { shape: [4, 2], dtype: "float32" },
        c: { shape: [2], dtype: "float32" },
      });
      const pulled = await session.pull();
      assert.ok(sameBits(pulled.params.w, w));
      assert.ok(sameBits(pulled.params.emb, tensor([4, 2], new Float32Array(8))));

      // The whole optimizer object works too; keywords win; wire names are accepted.
      const other = await client.createSession({
        optimizer: { name: "sgd", lr: 0.1, momentum: 0.9 },
        params: { w },
        lr: 0.2,
        lr_schedule: { type: "step", step_size: 2, gamma: 0.5 },
        clipGradNorm: 1.0,
        nonfinite: "skip",
      });
      const otherInfo = await other.info();
      assert.equal(otherInfo.optimizer.lr, 0.2);
      assert.equal(otherInfo.optimizer.momentum, 0.9);
      assert.equal(otherInfo.lr_schedule.type, "step");
      assert.equal(otherInfo.clip_grad_norm, 1.0);
      assert.equal(otherInfo.nonfinite, "skip");

      const ids = new Set((await client.listSessions()).map((s) => s.id));
      assert.ok(ids.has(session.id) && ids.has(other.id));
      assert.equal((await client.listSessions({ limit: 1 })).length, 1);

      const joined = await client.session(session.id);
      assert.equal(joined.id, session.id);
      assert.equal(joined.version, session.version);

      const updated = await session.update({ lr: 0.5, clipGradNorm: 2.0, name: "renamed", nonfinite: "skip" });
      assert.equal(updated.optimizer.lr, 0.5);
      assert.equal(updated.lr, 0.5);
      assert.equal(updated.clip_grad_norm, 2.0);
      assert.equal(updated.name, "renamed");
      const cleared = await session.update({ clipGradNorm: null, optimizer: { betas: [0.8, 0.99] } });
      assert.equal(cleared.clip_grad_norm, null); // null turns clipping off; the rest stays
      assert.equal(cleared.name, "renamed");
      assert.deepEqual(cleared.optimizer.betas, [0.8, 0.99]);
      assert.equal(cleared.optimizer.lr, 0.5);

      await session.delete();
      await other.delete();
      for (const call of [() => session.info(), () => session.pull(), () => session.delete(), () => client.session(other.id)]) {
        const error = await errorOf(call());
        assert.equal(error.status, 404);
        assert.equal(error.code, "session_not_found");
      }
    });

    test("ttlS: set at create, shown in the view, changed, cleared, never touched by other updates", async () => {
      const session = await client.createSession({ optimizer: "sgd", lr: 0.1, params: { w: new Float32Array(2) }, ttlS: 600 });
      try {
        assert.equal((await session.info()).ttl_s, 600);
        assert.equal((await raw("GET", `/v1/sessions/${session.id}`)).body.ttl_s, 600);
        assert.equal((await session.update({ ttlS: 30.5 })).ttl_s, 30.5);
        assert.equal((await session.update({ lr: 0.2 })).ttl_s, 30.5); // left out: stays
        assert.equal((await session.update({ ttl_s: 45 })).ttl_s, 45); // the wire name works too
        const cleared = await session.update({ ttlS: null });
        assert.equal(cleared.ttl_s, null);
        assert.equal((await session.info()).ttl_s, null);
        const error = await errorOf(session.update({ ttlS: 0.01 })); // below the server's minimum
        assert.equal(error.status, 422);
        assert.equal(error.code, "invalid_session");
        assert.equal((await session.info()).ttl_s, null); // an error changes nothing
      } finally {
        await session.delete();
      }
      const never = await client.createSession({ optimizer: "sgd", lr: 0.1, params: { w: new Float32Array(2) } });
      assert.equal((await never.info()).ttl_s, null);
      await never.delete();
    });

    test("pushes match the server's own JSON answers bit for bit", async () => {
      const r = rng(codec.length);
      const p0 = { w: tensor([3, 4], r.normal(12)), b: tensor([4], r.normal(4)) };
      const optimizer = { name: "adam", lr: 0.01, weight_decay: 0.01, amsgrad: true };
      const session = await client.createSession({ optimizer, params: p0 });
      const oracle = await raw("POST", "/v1/sessions", {
        optimizer,
        params: { w: jsonTensor(p0.w), b: jsonTensor(p0.b) },
      });
      assert.equal(oracle.status, 201);
      for (let step = 1; step <= 5; step++) {
        // A subset on some steps: "b" is skipped as torch skips grad=None.
        const grads = step % 2 ? { w: tensor([3, 4], r.normal(12)), b: tensor([4], r.normal(4)) } : { w: tensor([3, 4], r.normal(12)) };
        const result = await session.push(grads, { worker: "js" });
        assert.equal(result.version, step);
        assert.equal(result.applied, true);
        assert.equal(result.replayed, false);
        assert.equal(session.version, step);
        assert.equal(session.lastPush, result);
        const body = { grads: Object.fromEntries(Object.entries(grads).map(([n, t]) => [n, jsonTensor(t)])) };
        const expected = await raw("POST", `/v1/sessions/${oracle.body.id}/gradients`, body);
        assert.equal(expected.status, 200);
        for (const name of ["w", "b"]) {
          const want = tensor(expected.body.params[name].shape, expected.body.params[name].data);
          assert.ok(sameBits(result.params[name], want), `step ${step}: ${name}`);
        }
      }
      // return=pushed / none
      const pushed = await session.push({ w: tensor([3, 4], new Float32Array(12)) }, { returning: "pushed" });
      assert.deepEqual(Object.keys(pushed.params), ["w"]);
      const none = await session.push({ b: new Float32Array(4) }, { returning: "none" });
      assert.deepEqual(Object.keys(none.params), []);
      assert.equal(none.version, 7);
      await session.delete();
      await raw("DELETE", `/v1/sessions/${oracle.body.id}`);
    });

    test("pull by names, and long polls: timed out and woken by a push", async () => {
      const session = await client.createSession({
        optimizer: { name: "sgd", lr: 0.5 },
        params: { w: tensor([2], [1, 2]), b: tensor([1], [3]) },
      });
      const only = await session.pull("w");
      assert.deepEqual(Object.keys(only.params), ["w"]);
      assert.equal(only.version, 0);
      assert.deepEqual(Object.keys((await session.pull(["w", "b"])).params).sort(), ["b", "w"]);

      let started = performance.now();
      const idle = await session.pull(null, { waitS: 0.5 });
      assert.ok(performance.now() - started >= 450, "the server held the long poll");
      assert.equal(idle.timedOut, true);
      assert.equal(idle.version, 0);
      assert.ok(sameBits(idle.params.w, tensor([2], [1, 2])));

      const pusher = await client.session(session.id);
      started = performance.now();
      const waiting = session.pull("w", { waitS: 20 });
      await new Promise((resolve) => setTimeout(resolve, 300));
      await pusher.push({ w: tensor([2], [1, 1]) });
      const woken = await waiting;
      assert.ok(performance.now() - started < 10_000, "woken by the push, not by the deadline");
      assert.equal(woken.timedOut, false);
      assert.equal(woken.version, 1);
      assert.equal(session.version, 1);
      assert.deepEqual(Array.from(woken.params.w.data), [0.5, 1.5]);

      // afterVersion below the current version answers at once.
      const now = await session.pull("w", { afterVersion: 0, waitS: 20 });
      assert.equal(now.version, 1);
      assert.equal(now.timedOut, false);
      await session.delete();
    });

    test("putParams, unconditional and with ifMatch (412 carries the version)", async () => {
      const r = rng(7);
      const w = tensor([2, 3], r.normal(6));
      const session = await client.createSession({ optimizer: "sgd", lr: 0.1, params: { w } });
      const replacement = tensor([2, 3], r.finiteBits(6));
      assert.equal(await session.putParams({ w: replacement }), 1);
      assert.equal(session.version, 1);
      assert.ok(sameBits((await session.pull()).params.w, replacement));
      assert.equal(await session.putParams({ w }, { ifMatch: 1 }), 2);
      const error = await errorOf(session.putParams({ w: replacement }, { ifMatch: 1 }));
      assert.equal(error.status, 412);
      assert.equal(error.code, "precondition_failed");
      assert.equal(error.problem.version, 2);
      assert.ok(sameBits((await session.pull("w")).params.w, w)); // an error changes nothing
      await session.delete();
    });

    test("every finite float32 survives the trip through the server", async () => {
      const values = rng(11).finiteBits(4096);
      values.set(fromBits([0x80000000, 0x00000001, 0x15ae43fd, 0x95ae43fd, 0x7f7fffff]));
      const session = await client.createSession({ optimizer: "sgd", lr: 0.1, params: { w: tensor([4096], values) } });
      const back = await session.pull();
      assert.ok(sameBits(back.params.w, tensor([4096], values)));
      // ... and read in the other codec too.
      const otherCodec = new Client({ url: URL_, codec: codec === "json" ? "safetensors" : "json" });
      assert.ok(sameBits((await (await otherCodec.session(session.id)).pull()).params.w, tensor([4096], values)));
      await session.delete();
    });

    test("a 0-d tensor and a bare Float32Array", async () => {
      const session = await client.createSession({
        optimizer: "sgd",
        lr: 0.5,
        params: { s: { shape: [], data: [2] }, v: new Float32Array([1, 2, 3]) },
      });
      const result = await session.push({ s: { shape: [], data: [1] }, v: new Float32Array([2, 2, 2]) });
      assert.deepEqual(result.params.s.shape, []);
      assert.deepEqual(Array.from(result.params.s.data), [1.5]);
      assert.deepEqual(Array.from(result.params.v.data), [0, 1, 2]);
      await session.delete();
    });

    test("errors carry status, code and the problem document", async () => {
      let error = await errorOf(client.session("no-such-session"));
      assert.equal(error.status, 404);
      assert.equal(error.code, "session_not_found");
      assert.equal(error.problem.status, 404);
      assert.match(error.detail, /no-such-session/);
      assert.match(error.message, /^404 session_not_found/);
      assert.equal(error.attempts, 1); // a 4xx is never retried

      error = await errorOf(client.createSession({ optimizer: "adam", lr: -1, params: { w: new Float32Array(2) } }));
      assert.equal(error.status, 422);
      assert.equal(error.code, "invalid_hyperparameter");
      assert.equal(error.problem.field, "lr");
      error = await errorOf(client.createSession({ optimizer: "adamx", params: { w: new Float32Array(2) } }));
      assert.equal(error.code, "unknown_optimizer");

      const session = await client.createSession({ optimizer: "adam", lr: 0.1, params: { w: new Float32Array(2) } });
      error = await errorOf(session.update({ betas: [0.9, 2.0] }));
      assert.equal(error.status, 422);
      assert.equal(error.code, "invalid_hyperparameter");
      error = await errorOf(session.push({ nope: new Float32Array(2) }));
      assert.equal(error.code, "unknown_tensor");
      assert.equal(error.problem.tensor, "nope");
      error = await errorOf(session.pull(["w", "nope"]));
      assert.equal(error.code, "unknown_tensor");
      error = await errorOf(session.push({ w: new Float32Array(3) }));
      assert.equal(error.code, "shape_mismatch");
      error = await errorOf(session.putParams({ w: new Float32Array(2) }, { ifMatch: 7 }));
      assert.equal(error.status, 412);
      assert.equal(error.code, "precondition_failed");
      assert.equal((await session.info()).version, 0); // none of the above changed anything
      await session.delete();
    });

    test("non-finite gradients: refused by the server (safetensors) or before sending (JSON)", async () => {
      const session = await client.createSession({ optimizer: "sgd", lr: 0.1, params: { w: new Float32Array(2) } });
      const grads = { w: new Float32Array([1, NaN]) };
      if (codec === "json") {
        await assert.rejects(session.push(grads), RangeError);
      } else {
        const error = await errorOf(session.push(grads));
        assert.equal(error.status, 422);
        assert.equal(error.code, "non_finite");
      }
      assert.equal((await session.info()).version, 0);
      await session.delete();
    });

    test("base_version is the last version seen: a stale handle gets 409 stale_gradient", async () => {
      const a = await client.createSession({ optimizer: "sgd", lr: 0.5, params: { w: new Float32Array(2) }, maxStaleness: 0 });
      const b = await client.session(a.id);
      assert.equal((await a.push({ w: new Float32Array([1, 1]) })).staleness, 0);
      const error = await errorOf(b.push({ w: new Float32Array([1, 1]) })); // b still at version 0
      assert.equal(error.status, 409);
      assert.equal(error.code, "stale_gradient");
      assert.equal(error.problem.version, 1);
      await b.pull(); // b sees version 1 ...
      assert.equal((await b.push({ w: new Float32Array([1, 1]) })).version, 2); // ... and is current
      // No base_version at all: no staleness check.
      const unchecked = await a.push({ w: new Float32Array([1, 1]) }, { baseVersion: null });
      assert.equal(unchecked.version, 3);
      assert.equal(unchecked.staleness, undefined);
      await a.delete();
    });

    test("state round trip into another session, in both codecs", async () => {
      const r = rng(5);
      const schedule = { type: "step", step_size: 2, gamma: 0.5 };
      const optimizer = { name: "adam", lr: 0.01, amsgrad: true };
      const shapes = { w: [3, 2], "enc/w": [2], frozen: [4] };
      const size = (s) => s.reduce((x, y) => x * y, 1);
      const params = Object.fromEntries(Object.entries(shapes).map(([n, s]) => [n, tensor(s, r.normal(size(s)))]));
      const source = await client.createSession({ optimizer, params, lrSchedule: schedule });
      for (let i = 0; i < 3; i++) {
        await source.push({ w: tensor([3, 2], r.normal(6)), "enc/w": tensor([2], r.normal(2)) });
      }
      const document = await source.state();
      assert.equal(document.version, 3);
      assert.equal(document.optimizer.amsgrad, true);
      assert.equal(document.lr_schedule_state.last_epoch, 3);
      assert.deepEqual(Object.keys(document.tensors).sort(), ["enc/w", "frozen", "w"]);
      const wState = document.tensors.w;
      assert.deepEqual(Object.keys(wState).sort(), ["exp_avg", "exp_avg_sq", "max_exp_avg_sq", "param", "step"]);
      assert.equal(wState.step, 3);
      assert.ok(wState.exp_avg.data instanceof Float32Array);
      assert.deepEqual(Object.keys(document.tensors.frozen), ["param"]);

      for (const loadCodec of CODECS) {
        const loader = new Client({ url: URL_, codec: loadCodec });
        const target = await loader.createSession({
          optimizer: { ...optimizer, lr: 0.5 },
          tensors: shapes,
          lrSchedule: schedule,
        });
        assert.equal(await target.loadState(document), 1);
        assert.equal(target.version, 1);
        const reloaded = await target.state();
        assert.deepEqual(reloaded.optimizer, document.optimizer);
        assert.deepEqual(reloaded.lr_schedule_state, document.lr_schedule_state);
        for (const [name, entry] of Object.entries(document.tensors)) {
          assert.deepEqual(Object.keys(reloaded.tensors[name]).sort(), Object.keys(entry).sort());
          for (const [key, value] of Object.entries(entry)) {
            if (typeof value === "number") assert.equal(reloaded.tensors[name][key], value);
            else assert.ok(sameBits(reloaded.tensors[name][key], value), `${name}/${key}`);
          }
        }
        const error = await errorOf(target.loadState(document, { ifMatch: 0 }));
        assert.equal(error.status, 412);
        assert.equal(await target.loadState(document, { ifMatch: target.version }), 2);
        await target.delete();
      }

      // After a restore, the copy steps exactly like the original (the schedule included).
      const copy = await client.createSession({ optimizer, tensors: shapes, lrSchedule: schedule });
      await copy.loadState(document);
      for (let i = 0; i < 3; i++) {
        const grads = Object.fromEntries(Object.entries(shapes).map(([n, s]) => [n, tensor(s, r.normal(size(s)))]));
        assertSameTensors(assert, (await copy.push(grads)).params, (await source.push(grads)).params);
      }
      await copy.delete();
      await source.delete();
    });

    test("sync mode: two workers, one round, the same version and params", async () => {
      const session = await client.createSession({
        optimizer: "sgd",
        lr: 1,
        params: { w: tensor([2], [0, 0]) },
        mode: { type: "sync", workers: 2, timeout_s: 30 },
      });
      const other = await client.session(session.id);
      const [a, b] = await Promise.all([
        session.push({ w: tensor([2], [1, 2]) }, { worker: "a" }),
        other.push({ w: tensor([2], [3, 4]) }, { worker: "b" }),
      ]);
      assert.equal(a.version, 1);
      assert.equal(b.version, 1);
      assert.equal(a.roundWorkers, 2);
      assert.deepEqual(Array.from(a.params.w.data), [-2, -3]); // one step on the mean gradient
      assert.ok(sameBits(a.params.w, b.params.w));
      await session.delete();
    });
  });
}

test("bit helpers", () => {
  assert.equal(bitsOf(new Float32Array([-0]))[0], 0x80000000);
});

describe("bin/push.mjs", { skip: SKIP_LIVE }, () => {
  test("pushes a JSON file once in either codec and prints the answer", async () => {
    const { execFile } = await import("node:child_process");
    const { mkdtemp, writeFile, rm } = await import("node:fs/promises");
    const { tmpdir } = await import("node:os");
    const { join } = await import("node:path");
    const { fileURLToPath } = await import("node:url");
    const run = (args) =>
      new Promise((resolve) => {
        execFile(process.execPath, [fileURLToPath(new URL("../bin/push.mjs", import.meta.url)), ...args], (error, stdout, stderr) =>
          resolve({ code: error ? error.code : 0, stdout, stderr }),
        );
      });
    const dir = await mkdtemp(join(tmpdir(), "optserve-push-"));
    try {
      const session = await new Client({ url: URL_ }).createSession({ optimizer: "sgd", lr: 0.5, params: { w: tensor([2], [1, 2]) } });
      const file = join(dir, "grads.json");
      await writeFile(file, JSON.stringify({ w: { shape: [2], data: [1, -1] } }));
      let out = await run([URL_, session.id, file, "json"]);
      assert.equal(out.code, 0, out.stderr);
      let answer = JSON.parse(out.stdout);
      assert.equal(answer.version, 1);
      assert.equal(answer.applied, true);
      assert.deepEqual(answer.params.w, { shape: [2], data: [0.5, 2.5] });
      out = await run([URL_, session.id, file]);
      answer = JSON.parse(out.stdout);
      assert.equal(answer.version, 2);
      assert.equal(answer.staleness, 0); // base_version: the version when it joined
      out = await run([URL_, "no-such-session", file]);
      assert.equal(out.code, 1);
      assert.equal(JSON.parse(out.stderr).code, "session_not_found");
      assert.equal((await run([URL_])).code, 2);
      await session.delete();
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
