// Test-only helpers (Node APIs are fine here; the library itself uses none).
import { readFile } from "node:fs/promises";

/** The live server the client tests talk to; the pytest wrapper sets it. */
export const URL_ = process.env.OPTSERVE_URL?.replace(/\/+$/, "") || null;
export const SKIP_LIVE = URL_
  ? false
  : "OPTSERVE_URL is not set: these tests need a live `optserve serve` (run tests/test_js_client.py, or set OPTSERVE_URL=http://127.0.0.1:8000)";

/** Where the pytest wrapper put the Python safetensors fixtures and collects ours. */
export const FIXTURES = process.env.OPTSERVE_ST_FIXTURES || null;
export const SKIP_FIXTURES = FIXTURES
  ? false
  : "OPTSERVE_ST_FIXTURES is not set: the cross-check with the Python safetensors package runs from tests/test_js_client.py";

/** Bytes of a Float32Array (its bit patterns; NaN payloads and -0 included). */
export function bitsOf(data) {
  return new Uint32Array(data.buffer, data.byteOffset, data.length);
}

/** Bitwise equality of two tensors {shape, data}. */
export function sameBits(a, b) {
  if (!(a.data instanceof Float32Array) || !(b.data instanceof Float32Array)) return false;
  if (JSON.stringify(a.shape) !== JSON.stringify(b.shape) || a.data.length !== b.data.length) return false;
  const x = bitsOf(a.data);
  const y = bitsOf(b.data);
  return x.every((v, i) => v === y[i]);
}

export function assertSameTensors(assert, a, b) {
  assert.deepEqual(Object.keys(a).sort(), Object.keys(b).sort());
  for (const name of Object.keys(a)) assert.ok(sameBits(a[name], b[name]), `tensor ${name} differs`);
}

/** Float32Array from raw uint32 bit patterns. */
export function fromBits(bits) {
  return new Float32Array(Uint32Array.from(bits).buffer);
}

/** A deterministic generator (mulberry32), so failures reproduce. */
export function rng(seed) {
  let a = seed >>> 0;
  const next = () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  return {
    uniform: next,
    /** n float32s from all finite bit patterns (subnormals, -0, huge and tiny values). */
    finiteBits(n) {
      const out = new Uint32Array(n);
      for (let i = 0; i < n; i++) {
        let bits;
        do bits = Math.floor(next() * 4294967296) >>> 0;
        while ((bits & 0x7f800000) === 0x7f800000);
        out[i] = bits;
      }
      return new Float32Array(out.buffer);
    },
    /** n roughly normal float32s. */
    normal(n) {
      const out = new Float32Array(n);
      for (let i = 0; i < n; i++) out[i] = Math.sqrt(-2 * Math.log(1 - next())) * Math.cos(2 * Math.PI * next());
      return out;
    },
  };
}

export async function readBytes(path) {
  const buffer = await readFile(path);
  return new Uint8Array(buffer.buffer, buffer.byteOffset, buffer.byteLength);
}

export function tensor(shape, values) {
  return { shape, data: values instanceof Float32Array ? values : Float32Array.from(values) };
}
