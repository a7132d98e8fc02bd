/**
 * A small safetensors reader and writer for F32 tensors and a `__metadata__` of strings.
 *
 * Layout: an 8-byte little-endian header length N, N bytes of UTF-8 JSON header, then the
 * tensors' bytes back to back. The writer does what the Python `safetensors` package does, so
 * for the same tensors and at most one metadata entry the bytes are identical: tensors sorted
 * by name (code point order, as Rust sorts UTF-8 strings), `__metadata__` first, compact JSON,
 * the header padded with spaces to a multiple of 8 so the data section is aligned.
 *
 * The reader applies the package's checks before copying anything (header size cap, each byte
 * range matches its shape, the ranges tile the data section exactly). Tensor bytes are copied,
 * never reinterpreted as numbers, so NaN payloads and -0 survive bit for bit on any host.
 *
 * A tensor is `{shape: number[], data: Float32Array}` (row-major, `data.length` = product of
 * the shape; shape `[]` is a scalar holding one value).
 */

export const METADATA_KEY = "__metadata__";
/** The safetensors crate refuses larger headers too. */
export const MAX_HEADER_BYTES = 100_000_000;
const LENGTH_BYTES = 8;
const ALIGN = 8;
const F32 = "F32";
const F32_BYTES = 4;
const LITTLE_ENDIAN = new Uint8Array(new Uint32Array([1]).buffer)[0] === 1;
const LONE_SURROGATE = /[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/;

/** Bytes that are not a safetensors file this reader accepts, or input it cannot write. */
export class SafetensorsError extends Error {
  constructor(message) {
    super(message);
    this.name = "SafetensorsError";
  }
}

/** Own entries of a plain object or a Map. */
export function entriesOf(mapping) {
  if (mapping == null) return [];
  if (mapping instanceof Map) return [...mapping.entries()];
  if (typeof mapping !== "object") throw new TypeError(`expected an object of named entries, not ${typeof mapping}`);
  return Object.entries(mapping);
}

/** `obj[key] = value`, also for a key such as "__proto__" that plain assignment would not store. */
export function setEntry(obj, key, value) {
  if (key === "__proto__") {
    Object.defineProperty(obj, key, { value, writable: true, enumerable: true, configurable: true });
  } else {
    obj[key] = value;
  }
  return obj;
}

/** Orders strings by Unicode code point, which is UTF-8 byte order (Rust's `String` order). */
export function compareCodePoints(a, b) {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) {
    const x = a.charCodeAt(i);
    const y = b.charCodeAt(i);
    if (x === y) continue;
    // UTF-16 order differs from code point order only between a surrogate (an astral code
    // point) and a BMP unit at or above U+E000: astral code points are the larger ones.
    const xs = x >= 0xd800 && x <= 0xdfff;
    const ys = y >= 0xd800 && y <= 0xdfff;
    if (xs !== ys && (xs ? y : x) >= 0xe000) return xs ? 1 : -1;
    return x < y ? -1 : 1;
  }
  return a.length - b.length;
}

function checkText(what, text) {
  if (typeof text !== "string") throw new SafetensorsError(`${what} must be a string, not ${typeof text}`);
  if (LONE_SURROGATE.test(text)) throw new SafetensorsError(`${what} ${JSON.stringify(text)} holds a lone surrogate, which UTF-8 cannot carry`);
}

function checkShape(where, shape) {
  if (!Array.isArray(shape) || shape.some((d) => !Number.isSafeInteger(d) || d < 0)) {
    throw new SafetensorsError(`${where}: shape must be an array of non-negative integers`);
  }
  return shape.reduce((a, b) => a * b, 1);
}

/** The bytes of a Float32Array in little-endian order, copied into `out` at `offset`. */
function writeFloat32LE(out, offset, data) {
  if (LITTLE_ENDIAN) {
    out.set(new Uint8Array(data.buffer, data.byteOffset, data.byteLength), offset);
    return;
  }
  const bits = new Uint32Array(data.buffer, data.byteOffset, data.length);
  const view = new DataView(out.buffer, out.byteOffset, out.byteLength);
  for (let i = 0; i < bits.length; i++) view.setUint32(offset + 4 * i, bits[i], true);
}

/** `count` little-endian float32s at `offset` of `bytes` -> a new, aligned Float32Array. */
function readFloat32LE(bytes, offset, count) {
  const begin = bytes.byteOffset + offset;
  if (LITTLE_ENDIAN) return new Float32Array(bytes.buffer.slice(begin, begin + count * F32_BYTES));
  const bits = new Uint32Array(count);
  const view = new DataView(bytes.buffer, begin, count * F32_BYTES);
  for (let i = 0; i < count; i++) bits[i] = view.getUint32(4 * i, true);
  return new Float32Array(bits.buffer);
}

/**
 * Named F32 tensors (a plain object or a Map of `{shape, data: Float32Array}`) and string
 * metadata -> safetensors bytes (a Uint8Array).
 */
export function encode(tensors, metadata) {
  const entries = entriesOf(tensors);
  const layout = [];
  for (const [name, tensor] of entries) {
    checkText("a tensor name", name);
    if (name === METADATA_KEY) throw new SafetensorsError(`the tensor name ${METADATA_KEY} is reserved`);
    const where = `tensor ${JSON.stringify(name)}`;
    if (tensor == null || !(tensor.data instanceof Float32Array)) {
      throw new SafetensorsError(`${where}: expected {shape, data: Float32Array}`);
    }
    const count = checkShape(where, tensor.shape);
    if (count !== tensor.data.length) {
      throw new SafetensorsError(`${where}: shape [${tensor.shape}] needs ${count} values, data has ${tensor.data.length}`);
    }
    layout.push({ name, shape: tensor.shape, data: tensor.data });
  }
  layout.sort((a, b) => compareCodePoints(a.name, b.name));

  const parts = [];
  const meta = entriesOf(metadata);
  if (meta.length > 0) {
    const obj = {};
    for (const [key, value] of meta) {
      checkText("a metadata key", key);
      checkText(`metadata ${JSON.stringify(key)}`, value);
      setEntry(obj, key, value);
    }
    parts.push(`${JSON.stringify(METADATA_KEY)}:${JSON.stringify(obj)}`);
  }
  let offset = 0;
  for (const entry of layout) {
    entry.offset = offset;
    const end = offset + entry.data.byteLength;
    const info = `{"dtype":"${F32}","shape":${JSON.stringify(entry.shape)},"data_offsets":[${offset},${end}]}`;
    parts.push(`${JSON.stringify(entry.name)}:${info}`);
    offset = end;
  }
  const text = new TextEncoder().encode(`{${parts.join(",")}}`);
  const headerLen = text.length + ((ALIGN - (text.length % ALIGN)) % ALIGN);

  const out = new Uint8Array(LENGTH_BYTES + headerLen + offset);
  const view = new DataView(out.buffer);
  view.setUint32(0, headerLen % 2 ** 32, true);
  view.setUint32(4, Math.floor(headerLen / 2 ** 32), true);
  out.set(text, LENGTH_BYTES);
  out.fill(0x20, LENGTH_BYTES + text.length, LENGTH_BYTES + headerLen);
  const start = LENGTH_BYTES + headerLen;
  for (const entry of layout) writeFloat32LE(out, start + entry.offset, entry.data);
  return out;
}

function asBytes(data) {
  if (data instanceof Uint8Array) return data;
  if (data instanceof ArrayBuffer) return new Uint8Array(data);
  if (ArrayBuffer.isView(data)) return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  throw new TypeError("safetensors data must be a Uint8Array, an ArrayBuffer or another ArrayBuffer view");
}

function readLayout(name, info) {
  const where = `safetensors tensor ${JSON.stringify(name)}`;
  if (info === null || typeof info !== "object" || Array.isArray(info)) {
    throw new SafetensorsError(`${where}: header entry must be an object`);
  }
  if (info.dtype !== F32) throw new SafetensorsError(`${where} has dtype ${JSON.stringify(info.dtype)}; only F32 is supported`);
  const count = checkShape(where, info.shape);
  const offsets = info.data_offsets;
  if (
    !Array.isArray(offsets) ||
    offsets.length !== 2 ||
    offsets.some((o) => !Number.isSafeInteger(o) || o < 0) ||
    offsets[0] > offsets[1]
  ) {
    throw new SafetensorsError(`${where}: data_offsets must be [begin, end], 0 <= begin <= end`);
  }
  const [begin, end] = offsets;
  if (end - begin !== count * F32_BYTES) {
    throw new SafetensorsError(`${where}: shape [${info.shape}] needs ${count * F32_BYTES} bytes, its offsets give ${end - begin}`);
  }
  return { name, begin, end, count, shape: [...info.shape] };
}

/**
 * safetensors bytes -> `{tensors: {name: {shape, data: Float32Array}}, metadata: {key: string}}`.
 * Each tensor's data is a fresh copy owning its memory.
 */
export function decode(input) {
  const bytes = asBytes(input);
  if (bytes.length < LENGTH_BYTES) {
    throw new SafetensorsError(`safetensors data of ${bytes.length} bytes is shorter than its 8-byte header length`);
  }
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const headerLen = view.getUint32(0, true) + view.getUint32(4, true) * 2 ** 32;
  if (headerLen > MAX_HEADER_BYTES) throw new SafetensorsError(`safetensors header of ${headerLen} bytes exceeds the limit`);
  if (headerLen > bytes.length - LENGTH_BYTES) {
    throw new SafetensorsError(`safetensors header length ${headerLen} exceeds the ${bytes.length - LENGTH_BYTES} bytes that follow it`);
  }
  let header;
  try {
    const text = new TextDecoder("utf-8", { fatal: true }).decode(bytes.subarray(LENGTH_BYTES, LENGTH_BYTES + headerLen));
    header = JSON.parse(text);
  } catch (error) {
    throw new SafetensorsError(`safetensors header is not UTF-8 JSON: ${error.message}`);
  }
  if (header === null || typeof header !== "object" || Array.isArray(header)) {
    throw new SafetensorsError("safetensors header must be a JSON object");
  }
  const metadata = {};
  const layout = [];
  for (const [name, info] of Object.entries(header)) {
    if (name === METADATA_KEY) {
      if (info === null) continue;
      if (typeof info !== "object" || Array.isArray(info) || !Object.values(info).every((v) => typeof v === "string")) {
        throw new SafetensorsError("safetensors __metadata__ must map strings to strings");
      }
      for (const [key, value] of Object.entries(info)) setEntry(metadata, key, value);
    } else {
      layout.push(readLayout(name, info));
    }
  }

  // The byte ranges must tile the data section: no gap, no overlap, nothing left over.
  const start = LENGTH_BYTES + headerLen;
  const dataLen = bytes.length - start;
  let cursor = 0;
  for (const entry of [...layout].sort((a, b) => a.begin - b.begin || a.end - b.end)) {
    if (entry.begin !== cursor) {
      throw new SafetensorsError(
        `safetensors tensor ${JSON.stringify(entry.name)}: data_offsets [${entry.begin}, ${entry.end}] leave a gap or overlap (the previous tensor ends at ${cursor})`,
      );
    }
    cursor = entry.end;
  }
  if (cursor !== dataLen) {
    throw new SafetensorsError(`safetensors data section is ${dataLen} bytes but its tensors cover ${cursor}`);
  }

  const tensors = {};
  for (const entry of layout) {
    setEntry(tensors, entry.name, { shape: entry.shape, data: readFloat32LE(bytes, start + entry.begin, entry.count) });
  }
  return { tensors, metadata };
}
