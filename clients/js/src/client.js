/**
 * The optserve client: `Client` (connection settings, sessions) and `Session` (one training
 * session: push, pull, putParams, state, loadState, update, info, delete).
 *
 * Every API operation is a "call": the request (method, path, query, body, headers) built once,
 * how a success response is read, and when it may be sent again. `Client#run` sends a call until
 * the retry rules say stop. Only global `fetch`, `AbortController`, `TextEncoder`/`TextDecoder`
 * and typed arrays are used, so the module runs unchanged in Node 18+ and in browsers.
 */

import { OptservError } from "./errors.js";
import { setEntry } from "./safetensors.js";
import { decodeState, encodeState } from "./state.js";
import {
  CODECS,
  JSON_TYPE,
  SAFETENSORS_TYPE,
  WireError,
  decodeMessage,
  dumps,
  encodeMessage,
  loads,
} from "./wire.js";

export const VERSION = "0.1.0";
/** Sessions fetched per request when listSessions() walks every page (the server's maximum). */
export const LIST_PAGE = 1000;
export const RETURNING = Object.freeze(["all", "pushed", "none"]);

// -- retries ---------------------------------------------------------------------------------------

/** Node's (undici's) codes for failures after which the request surely never left. */
const UNSENT_CODES = new Set([
  "ECONNREFUSED",
  "ENOTFOUND",
  "EAI_AGAIN",
  "EHOSTUNREACH",
  "ENETUNREACH",
  "EADDRNOTAVAIL",
  "UND_ERR_CONNECT_TIMEOUT",
]);

/**
 * How often and how patiently a client retries a failed call.
 *
 * `attempts` counts every try, the first included (1 = never retry). Before retry n the client
 * waits `backoffMs * 2**(n-1)`, at most `maxBackoffMs`, shortened at random by up to `jitter`
 * of itself so that many workers do not retry in step. A 503 or 429 with `Retry-After` waits at
 * least that long (but never more than `maxBackoffMs`).
 */
export class RetryPolicy {
  constructor({ attempts = 5, backoffMs = 100, maxBackoffMs = 5000, jitter = 0.5 } = {}) {
    if (!Number.isInteger(attempts) || attempts < 1) {
      throw new RangeError(`attempts counts the first try too: an integer >= 1, not ${attempts}`);
    }
    if (!(backoffMs >= 0 && maxBackoffMs >= 0)) throw new RangeError("backoffMs and maxBackoffMs must be >= 0");
    if (!(jitter >= 0 && jitter <= 1)) throw new RangeError(`jitter is a fraction in [0, 1], not ${jitter}`);
    Object.assign(this, { attempts, backoffMs, maxBackoffMs, jitter });
    Object.freeze(this);
  }

  /** What `retries` means: a RetryPolicy, its options, a number of retries, or null/0 for none. */
  static of(retries) {
    if (retries instanceof RetryPolicy) return retries;
    if (retries === undefined) return new RetryPolicy();
    if (retries === null || retries === false) return new RetryPolicy({ attempts: 1 });
    if (typeof retries === "number") {
      if (!Number.isInteger(retries) || retries < 0) throw new RangeError(`retries must be an integer >= 0, not ${retries}`);
      return new RetryPolicy({ attempts: retries + 1 });
    }
    if (typeof retries === "object") return new RetryPolicy(retries);
    throw new TypeError(`retries is a RetryPolicy, its options, a number or null, not ${retries}`);
  }

  /** Milliseconds to wait before retry number `retry` (1 for the first retry). */
  delay(retry, retryAfterMs = null) {
    let wait = Math.min(this.backoffMs * 2 ** (retry - 1), this.maxBackoffMs);
    wait *= 1 - this.jitter * Math.random();
    if (retryAfterMs !== null) wait = Math.max(wait, Math.min(retryAfterMs, this.maxBackoffMs));
    return wait;
  }
}

/** `Retry-After` in milliseconds (delta-seconds or an HTTP date); null if absent or unreadable. */
export function retryAfterMs(headers) {
  const value = headers?.get?.("retry-after")?.trim();
  if (!value) return null;
  if (/^\d+(\.\d+)?$/.test(value)) return Number(value) * 1000;
  const when = Date.parse(value);
  return Number.isNaN(when) ? null : Math.max(0, when - Date.now());
}

function causeCodes(cause) {
  if (cause == null) return [];
  const codes = cause.code ? [cause.code] : [];
  if (Array.isArray(cause.errors)) for (const inner of cause.errors) codes.push(...causeCodes(inner));
  return codes;
}

/** "unsent" (surely never reached the server), "maybe" (may have), or "fatal" (a bug; no retry). */
function classify(error) {
  if (error?.name === "TimeoutError") return "maybe";
  // fetch reports every network failure as a TypeError; Node adds the socket error as `cause`.
  if (error instanceof TypeError) {
    const codes = causeCodes(error.cause);
    return codes.length > 0 && codes.every((code) => UNSENT_CODES.has(code)) ? "unsent" : "maybe";
  }
  return "fatal";
}

class TimeoutError extends Error {
  constructor(ms) {
    super(`no complete response within ${ms} ms`);
    this.name = "TimeoutError";
  }
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** A fresh UUID v4: crypto.randomUUID where there is one (Node 19+, browsers), else by hand. */
export function newIdempotencyKey() {
  const crypto = globalThis.crypto;
  if (typeof crypto?.randomUUID === "function") return crypto.randomUUID();
  const bytes = new Uint8Array(16);
  if (typeof crypto?.getRandomValues === "function") crypto.getRandomValues(bytes);
  else for (let i = 0; i < 16; i++) bytes[i] = Math.floor(Math.random() * 256);
  bytes[6] = (bytes[6] & 0x0f) | 0x40;
  bytes[8] = (bytes[8] & 0x3f) | 0x80;
  const hex = Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

// -- helpers ---------------------------------------------------------------------------------------

function checkVersion(version, what = "a version") {
  if (!Number.isSafeInteger(version) || version < 0) throw new RangeError(`${what} is a non-negative integer, not ${version}`);
  return version;
}

/** If-Match wants the ETag form `"12"`. */
function versionHeader(version) {
  return `"${checkVersion(version, "ifMatch")}"`;
}

/** `"12"`, `W/"12"` -> 12; null when absent or not a version. */
function etagVersion(headers) {
  const value = headers.get("etag");
  if (!value) return null;
  const text = value.trim().replace(/^W\//, "").replace(/^"|"$/g, "");
  return /^\d+$/.test(text) ? Number(text) : null;
}

/** `[3, 4]`, `12` or `{shape: [3, 4]}` -> `{shape: [...]}`. */
function shapeSpec(name, shape) {
  if (typeof shape === "number") return { shape: [shape] };
  if (Array.isArray(shape)) return { shape: [...shape] };
  if (shape !== null && typeof shape === "object") return { ...shape };
  throw new TypeError(`tensor ${JSON.stringify(name)}: a shape is an array of integers, not ${shape}`);
}

/** Session-level fields: JS name -> wire name (the wire names are accepted too). */
const SESSION_FIELDS = {
  lrSchedule: "lr_schedule",
  clipGradNorm: "clip_grad_norm",
  nonfinite: "nonfinite",
  name: "name",
  maxStaleness: "max_staleness",
  staleness: "staleness",
  ttlS: "ttl_s",
  mode: "mode",
};
const WIRE_FIELDS = new Map(Object.entries(SESSION_FIELDS).flatMap(([js, wire]) => [[js, wire], [wire, wire]]));

/** Split options into session fields (wire names) and optimizer hyperparameters. */
function splitOptions(options, skip) {
  const fields = {};
  const hyperparameters = {};
  for (const [key, value] of Object.entries(options)) {
    if (skip.has(key) || value === undefined) continue;
    const wire = WIRE_FIELDS.get(key);
    if (wire !== undefined) fields[wire] = value;
    else setEntry(hyperparameters, key, value);
  }
  return { fields, hyperparameters };
}

const CREATE_OWN = new Set(["optimizer", "params", "tensors"]);
const UPDATE_OWN = new Set(["optimizer"]);
const PUSH_FIELDS = [
  ["skipped", "skipped"],
  ["total_norm", "totalNorm"],
  ["staleness", "staleness"],
  ["params_version", "paramsVersion"],
  ["round", "round"],
  ["round_workers", "roundWorkers"],
];

// -- the client ------------------------------------------------------------------------------------

/**
 * A connection to one optserve server.
 *
 * `codec: "safetensors"` (default) moves tensors as raw float32 bytes both ways, about 5x smaller
 * than JSON and with NaN/inf intact; `"json"` is for debugging or proxies that only pass JSON.
 * Every failure rejects with OptservError.
 *
 * `retries` (a RetryPolicy, its options, a number of retries, or null/0 for none) retries a call
 * after a transport failure (refused, reset or dropped connection, timeout) or a 503 (waiting for
 * `Retry-After`), never after another error status but 429 (rate limited: refused before anything
 * ran, so every call is retried after its `Retry-After`). A push carries one Idempotency-Key over all
 * of its attempts, so a retried push is applied at most once; reads, PUT, PATCH and DELETE are
 * idempotent; createSession is retried only when its connection could not even be made.
 */
export class Client {
  constructor(options = {}) {
    if (typeof options === "string") options = { url: options };
    const { url, apiKey, codec = "safetensors", retries, timeoutMs = 60_000, fetch, headers } = options;
    if (typeof url !== "string") throw new TypeError("Client needs {url: 'http://host:port'}");
    new URL(url, globalThis.location?.href); // a TypeError for a URL fetch could not use (relative: browsers only)
    if (!Object.hasOwn(CODECS, codec)) throw new TypeError(`codec must be "json" or "safetensors", not ${JSON.stringify(codec)}`);
    if (timeoutMs !== null && !(timeoutMs > 0)) throw new RangeError(`timeoutMs must be > 0 or null, not ${timeoutMs}`);
    this.url = url.replace(/\/+$/, "");
    this.codec = codec;
    this.retries = RetryPolicy.of(retries);
    this.timeoutMs = timeoutMs;
    this._fetch = fetch ?? ((input, init) => globalThis.fetch(input, init));
    this._headers = { ...headers };
    if (apiKey) this._headers.Authorization = `Bearer ${apiKey}`;
    // JSON stays acceptable at a lower weight, so a server without safetensors still answers.
    this._accept = codec === "safetensors" ? `${SAFETENSORS_TYPE}, ${JSON_TYPE};q=0.5` : JSON_TYPE;
  }

  // -- sending -------------------------------------------------------------------------------------

  /** One HTTP exchange, body read in full; throws what fetch throws, or a TimeoutError. */
  async _send(call) {
    const controller = typeof AbortController === "function" ? new AbortController() : null;
    const limit = this.timeoutMs === null ? null : this.timeoutMs + (call.waitS ?? 0) * 1000;
    let timer = null;
    let timedOut = false;
    if (controller && limit !== null) {
      timer = setTimeout(() => {
        timedOut = true;
        controller.abort();
      }, limit);
    }
    try {
      const response = await this._fetch(call.url, {
        method: call.method,
        headers: call.headers,
        body: call.body,
        signal: controller?.signal,
      });
      const bytes = new Uint8Array(await response.arrayBuffer());
      return { status: response.status, statusText: response.statusText, headers: response.headers, bytes };
    } catch (error) {
      if (timedOut) throw Object.assign(new TimeoutError(limit), { cause: error });
      throw error;
    } finally {
      if (timer !== null) clearTimeout(timer);
    }
  }

  /** A request description -> a call ready to send (headers validated here, before any attempt). */
  _call(method, path, { query, body, contentType, accept = JSON_TYPE, headers, waitS, parse, retry = "safe", doneStatus = null }) {
    const search = new URLSearchParams();
    for (const [key, value] of Object.entries(query ?? {})) {
      if (value !== undefined && value !== null) search.append(key, String(value));
    }
    const all = { ...this._headers, Accept: accept, ...headers };
    if (contentType !== undefined) all["Content-Type"] = contentType;
    new Headers(all); // a header value fetch would refuse fails here, not as a "network error"
    const qs = search.toString();
    return { method, url: `${this.url}${path}${qs ? `?${qs}` : ""}`, headers: all, body, waitS, parse, retry, doneStatus };
  }

  /** Sends `call` until it succeeds, fails for good, or the retry policy is spent. */
  async run(call) {
    const policy = this.retries;
    let count = 0;
    let maybeApplied = false; // whether an earlier attempt may have reached the server and acted
    const next = (after = null) => (count >= policy.attempts ? null : policy.delay(count, after));
    for (;;) {
      count += 1;
      let response;
      try {
        response = await this._send(call);
      } catch (error) {
        const kind = classify(error);
        let wait = null;
        if (kind === "unsent") {
          wait = next();
        } else if (kind === "maybe" && call.retry === "safe") {
          maybeApplied = true;
          wait = next();
        }
        if (wait === null) {
          const failure = OptservError.fromTransport(error);
          failure.attempts = count;
          throw failure;
        }
        await sleep(wait);
        continue;
      }
      if (response.status === 503 && call.retry === "safe") {
        const wait = next(retryAfterMs(response.headers));
        if (wait !== null) {
          maybeApplied = true; // the store may have failed after the write went through
          await sleep(wait);
          continue;
        }
      }
      if (response.status === 429) {
        // Rate limited: refused before anything ran, so any call may go again after Retry-After.
        const wait = next(retryAfterMs(response.headers));
        if (wait !== null) {
          await sleep(wait);
          continue;
        }
      }
      if (maybeApplied && call.doneStatus !== null && response.status === call.doneStatus) {
        // e.g. DELETE: 404 on a retry means an earlier attempt (whose answer was lost) did it.
        response = { ...response, status: 204, bytes: new Uint8Array() };
      }
      return this._finish(call, response, count);
    }
  }

  _finish(call, response, attempts) {
    if (response.status >= 400) {
      const error = OptservError.fromResponse(response.status, response.statusText, response.bytes);
      error.attempts = attempts;
      throw error;
    }
    try {
      return call.parse(response);
    } catch (cause) {
      if (cause instanceof OptservError) throw cause;
      const error = OptservError.invalidResponse(response.status, cause?.message ?? String(cause));
      error.attempts = attempts;
      throw error;
    }
  }

  static _json(response) {
    return loads(response.bytes);
  }

  static _sessionPath(id, suffix = "") {
    return `/v1/sessions/${encodeURIComponent(id)}${suffix}`;
  }

  // -- client-level operations ---------------------------------------------------------------------

  /**
   * Create a session; resolves to its Session.
   *
   * `optimizer` is torch's name ("adam") or the whole `{name: "adam", lr: 1e-3}` object; any
   * option not listed here is a hyperparameter (`lr`, `betas`, `weight_decay`, ...; keywords win
   * over the optimizer object). `params` are initial values, `tensors` names zero-initialised
   * tensors by shape (`{b: [3]}`), so large ones need not be uploaded. Session options:
   * `lrSchedule`, `clipGradNorm`, `nonfinite` ("reject" | "skip"), `name`, `maxStaleness`,
   * `staleness` ("reject" | "scale"), `ttlS` (seconds unused after which the server deletes the
   * session; any use renews it; omitted or null: never), `mode` ({type: "sync", workers: N, ...});
   * the wire names (`lr_schedule`, `ttl_s`, ...) work too.
   */
  async createSession(options = {}) {
    const { optimizer, params, tensors } = options;
    const { fields, hyperparameters } = splitOptions(options, CREATE_OWN);
    let spec;
    if (typeof optimizer === "string") spec = { name: optimizer, ...hyperparameters };
    else if (optimizer !== null && typeof optimizer === "object") spec = { ...optimizer, ...hyperparameters };
    else throw new TypeError('createSession needs optimizer: "adam" or {name: "adam", ...}');
    const body = { optimizer: spec, ...fields };
    if (tensors) {
      body.tensors = {};
      for (const [name, shape] of Object.entries(tensors)) setEntry(body.tensors, name, shapeSpec(name, shape));
    }
    const encoded = encodeMessage(this.codec, "params", params ?? {}, body);
    // Not idempotent, and the server takes no key for it: a create whose answer was lost may
    // have made a session, so it is only retried when it surely never left.
    const info = await this.run(
      this._call("POST", "/v1/sessions", { ...encoded, parse: Client._json, retry: "unsent" }),
    );
    return new Session(this, info.id, Number(info.version));
  }

  /** Join an existing session (one GET, so a wrong id fails here, not at the first push). */
  async session(id) {
    const info = await this.run(this._call("GET", Client._sessionPath(id), { parse: Client._json }));
    return new Session(this, info.id, Number(info.version));
  }

  /** Session descriptions; without `limit` every page the server has. */
  async listSessions({ offset = 0, limit } = {}) {
    const page = (from, count) =>
      this.run(
        this._call("GET", "/v1/sessions", {
          query: { offset: from, limit: count },
          parse: (response) => [...Client._json(response).sessions],
        }),
      );
    if (limit !== undefined && limit !== null) return page(offset, limit);
    const sessions = [];
    for (;;) {
      const got = await page(offset + sessions.length, LIST_PAGE);
      sessions.push(...got);
      if (got.length < LIST_PAGE) return sessions;
    }
  }
}

// -- one session -----------------------------------------------------------------------------------

/**
 * A handle on one server session: `id`, `version` (the newest version this handle has seen) and
 * `lastPush` (the full answer to the last push).
 */
export class Session {
  constructor(client, id, version = 0) {
    this.client = client;
    this.id = id;
    this.version = version;
    this.lastPush = null;
  }

  /** Record a version this handle saw; answers may arrive out of order, versions only grow. */
  _seen(version) {
    this.version = Math.max(this.version, version);
    return version;
  }

  _path(suffix = "") {
    return Client._sessionPath(this.id, suffix);
  }

  _seenInfo = (response) => {
    const info = Client._json(response);
    this._seen(Number(info.version));
    return info;
  };

  _seenVersion = (response) => this._seen(Number(Client._json(response).version));

  /** The session as the server has it now: version, every hyperparameter, tensors, current lr. */
  async info() {
    return this.client.run(this.client._call("GET", this._path(), { parse: this._seenInfo }));
  }

  /**
   * Change hyperparameters in flight: `update({lr: 1e-4})`; resolves to the session info.
   *
   * Keys `clipGradNorm`, `nonfinite`, `name`, `maxStaleness`, `staleness`, `ttlS` (or their wire
   * names) are session settings, `optimizer` an object of hyperparameters, every other key a
   * hyperparameter. `null` clears a setting (`clipGradNorm: null` turns clipping off, `ttlS: null`
   * makes the session never expire); a key left out (or undefined) stays as it is.
   */
  async update(changes = {}) {
    const { fields, hyperparameters } = splitOptions(changes, UPDATE_OWN);
    const optimizer = { ...changes.optimizer, ...hyperparameters };
    const body = Object.keys(optimizer).length > 0 ? { optimizer, ...fields } : fields;
    return this.client.run(
      this.client._call("PATCH", this._path(), { body: dumps(body), contentType: JSON_TYPE, parse: this._seenInfo }),
    );
  }

  /**
   * Delete the session and all of its state. A retry that finds the session gone after an
   * attempt whose answer was lost counts as done (that attempt deleted it).
   */
  async delete() {
    await this.client.run(this.client._call("DELETE", this._path(), { parse: () => undefined, doneStatus: 404 }));
  }

  /**
   * One optimizer step with these gradients; resolves to `{version, applied, params, replayed,
   * idempotencyKey, fields, ...}` (plus `skipped`, `totalNorm`, `staleness`, `paramsVersion`,
   * `round`, `roundWorkers` when the server sends them; `fields` has them as sent).
   *
   * Tensors left out are skipped, as torch skips grad=None. `returning: "pushed"` sends back
   * only the pushed tensors, `"none"` nothing. `baseVersion`, the version the gradients were
   * computed from, is by default `this.version` (the newest version this handle has seen); pass
   * a number for older params, or null to send none (no staleness check). `idempotencyKey`
   * defaults to a fresh UUID, the same on every retry of this push.
   */
  async push(grads, { baseVersion, worker, returning = "all", idempotencyKey } = {}) {
    if (!RETURNING.includes(returning)) throw new RangeError(`returning must be one of ${RETURNING.join(", ")}, not ${returning}`);
    if (baseVersion === undefined) baseVersion = this.version;
    else if (baseVersion !== null) checkVersion(baseVersion, "baseVersion");
    const fields = {};
    if (baseVersion !== null) fields.base_version = baseVersion;
    if (worker !== undefined && worker !== null) fields.worker = worker;
    // One key per push, made before the first attempt and sent on every retry of it, so the
    // server applies a push at most once however often its answer is lost.
    const key = idempotencyKey ?? newIdempotencyKey();
    const client = this.client;
    const encoded = encodeMessage(client.codec, "grads", grads, fields);
    const parse = (response) => {
      const { tensors, fields: meta } = decodeMessage(response.bytes, response.headers.get("content-type"), "params");
      if (!Number.isSafeInteger(meta.version) || typeof meta.applied !== "boolean") {
        throw new WireError("the push response has no version and applied");
      }
      const result = {
        version: meta.version,
        applied: meta.applied,
        params: tensors,
        replayed: (response.headers.get("idempotency-replayed") ?? "").toLowerCase() === "true",
        idempotencyKey: key,
        fields: meta,
      };
      for (const [wire, js] of PUSH_FIELDS) if (meta[wire] !== undefined && meta[wire] !== null) result[js] = meta[wire];
      this._seen(result.version);
      this.lastPush = result;
      return result;
    };
    return client.run(
      client._call("POST", this._path("/gradients"), {
        ...encoded,
        query: { return: returning },
        accept: client._accept,
        headers: { "Idempotency-Key": key },
        parse,
      }),
    );
  }

  /**
   * Current params (all, or `names`: a name or an array of names); resolves to
   * `{version, params, timedOut}`.
   *
   * With `waitS`, a long poll: the server answers once the version passes `afterVersion`
   * (default: the newest version this handle has seen); if nothing newer came within `waitS`
   * seconds (304), the current params are fetched and `timedOut` is true.
   */
  async pull(names, { afterVersion, waitS } = {}) {
    if (typeof names === "string") names = [names];
    if (waitS !== undefined && waitS !== null && (afterVersion === undefined || afterVersion === null)) {
      afterVersion = this.version; // "wait for anything newer than what I have"
    }
    const pulled = await this._pull(names, afterVersion, waitS);
    if (pulled.params !== null) return { ...pulled, timedOut: false };
    const current = await this._pull(names, null, null);
    return { ...current, timedOut: true };
  }

  _pull(names, afterVersion, waitS) {
    const client = this.client;
    const parse = (response) => {
      if (response.status === 304) {
        // The long poll's deadline: nothing newer arrived (the ETag, if readable, says the version).
        const version = etagVersion(response.headers);
        return { version: version === null ? null : this._seen(version), params: null };
      }
      const { tensors, fields } = decodeMessage(response.bytes, response.headers.get("content-type"), "params");
      if (!Number.isSafeInteger(fields.version)) throw new WireError("the params response has no version");
      return { version: this._seen(fields.version), params: tensors };
    };
    const query = {
      names: names === undefined || names === null ? undefined : [...names].join(","),
      after_version: afterVersion,
      wait_s: waitS,
    };
    return client.run(client._call("GET", this._path("/params"), { query, accept: client._accept, waitS, parse }));
  }

  /**
   * Replace parameter values (optimizer state untouched); resolves to the new version.
   * `ifMatch: version` makes it conditional: OptservError 412 `precondition_failed` if the
   * session moved on (the problem's `version` says where it is).
   */
  async putParams(params, { ifMatch } = {}) {
    const client = this.client;
    const encoded = encodeMessage(client.codec, "params", params, {});
    const headers = ifMatch === undefined || ifMatch === null ? undefined : { "If-Match": versionHeader(ifMatch) };
    return client.run(client._call("PUT", this._path("/params"), { ...encoded, headers, parse: this._seenVersion }));
  }

  /**
   * The full optimizer state (a checkpoint): `{version, optimizer, lr_schedule,
   * lr_schedule_state, tensors: {name: {param, step, exp_avg, ...}}}` with torch's state names,
   * tensors as `{shape, data: Float32Array}` and scalars as numbers.
   */
  async state() {
    const client = this.client;
    const parse = (response) => {
      const document = decodeState(response.bytes, response.headers.get("content-type"));
      if (Number.isSafeInteger(document.version)) this._seen(document.version);
      return document;
    };
    return client.run(client._call("GET", this._path("/state"), { accept: client._accept, parse }));
  }

  /** Restore a `state()` document (from this or another session); resolves to the version. */
  async loadState(document, { ifMatch } = {}) {
    const client = this.client;
    const encoded = encodeState(document, client.codec);
    const headers = ifMatch === undefined || ifMatch === null ? undefined : { "If-Match": versionHeader(ifMatch) };
    return client.run(client._call("PUT", this._path("/state"), { ...encoded, headers, parse: this._seenVersion }));
  }
}
