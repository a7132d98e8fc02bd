/**
 * Message bodies in both media types: named float32 tensors plus JSON-able fields.
 *
 * JSON: `{"<tensorField>": {name: {"shape": [...], "data": [flat, row-major]}}, ...fields}`.
 * safetensors: the tensors at top level, each field as its JSON text in `__metadata__`.
 *
 * Exactness: a float32 read from a Float32Array is a double holding exactly that value, and
 * `String(x)` prints the shortest decimal that reads back as that same double, so every JSON
 * reader gets the same double and so the same float32 back (-0 is written "-0.0", which
 * `JSON.stringify` would turn into "0"). Decoding reads each number as a double and rounds it
 * to float32 once (`Float32Array.from`), which is exact for everything the server prints.
 */

import * as safetensors from "./safetensors.js";
import { entriesOf, setEntry } from "./safetensors.js";

export const JSON_TYPE = "application/json";
export const PROBLEM_JSON = "application/problem+json";
export const SAFETENSORS_TYPE = "application/x-safetensors";
export const CODECS = Object.freeze({ json: JSON_TYPE, safetensors: SAFETENSORS_TYPE });

/** A body the client cannot encode, or a response it cannot decode. */
export class WireError extends Error {
  constructor(message) {
    super(message);
    this.name = "WireError";
  }
}

/** `Application/JSON; charset=utf-8` -> `application/json` (missing means JSON). */
export function mediaType(contentType) {
  if (!contentType) return JSON_TYPE;
  return contentType.split(";", 1)[0].trim().toLowerCase();
}

function product(shape) {
  return shape.reduce((a, b) => a * b, 1);
}

function isShape(shape) {
  return Array.isArray(shape) && shape.every((d) => Number.isSafeInteger(d) && d >= 0);
}

function toFloat32Array(where, data) {
  if (data instanceof Float32Array) return data;
  if (Array.isArray(data)) {
    for (let i = 0; i < data.length; i++) {
      if (typeof data[i] !== "number") {
        throw new TypeError(`${where}: data[${i}] is ${data[i] === null ? "null" : typeof data[i]}, not a number`);
      }
    }
    return Float32Array.from(data);
  }
  if (ArrayBuffer.isView(data) && !(data instanceof DataView) && typeof data[0] !== "bigint") {
    return Float32Array.from(data);
  }
  throw new TypeError(`${where}: data must be a Float32Array (or an array of numbers)`);
}

/**
 * User input -> `{shape, data: Float32Array}`. Takes `{shape, data}` (data a Float32Array, kept
 * without a copy, or any array of numbers / typed array, cast to float32), or a bare Float32Array
 * (typed array, array of numbers) as a 1-D tensor.
 */
export function toTensor(name, value) {
  const where = `tensor ${JSON.stringify(name)}`;
  if (Array.isArray(value) || (ArrayBuffer.isView(value) && !(value instanceof DataView))) {
    const data = toFloat32Array(where, value);
    return { shape: [data.length], data };
  }
  if (value === null || typeof value !== "object" || !("data" in value)) {
    throw new TypeError(`${where}: expected {shape, data} or a Float32Array`);
  }
  const data = toFloat32Array(where, value.data);
  const shape = value.shape === undefined ? [data.length] : value.shape;
  if (!isShape(shape)) throw new TypeError(`${where}: shape must be an array of non-negative integers`);
  if (product(shape) !== data.length) {
    throw new RangeError(`${where}: shape [${shape}] needs ${product(shape)} values, data has ${data.length}`);
  }
  return { shape: [...shape], data };
}

/** Named user tensors (object or Map) -> an object of `{shape, data: Float32Array}`. */
export function toTensors(tensors) {
  const out = {};
  for (const [name, value] of entriesOf(tensors)) setEntry(out, name, toTensor(name, value));
  return out;
}

/** One float32 (as read from a Float32Array) -> JSON number text that reads back to it exactly. */
export function formatFloat32(value) {
  return Object.is(value, -0) ? "-0.0" : String(value);
}

/** A tensor -> JSON text `{"shape":[...],"data":[...]}`; NaN and infinity are refused. */
export function encodeJsonTensor(name, value) {
  const { shape, data } = toTensor(name, value);
  const text = new Array(data.length);
  for (let i = 0; i < data.length; i++) {
    const x = data[i];
    if (!Number.isFinite(x)) {
      throw new RangeError(
        `tensor ${JSON.stringify(name)} holds NaN or infinity, which JSON cannot carry; use codec "safetensors"`,
      );
    }
    text[i] = formatFloat32(x);
  }
  return `{"shape":${JSON.stringify(shape)},"data":[${text.join(",")}]}`;
}

/** `{"shape", "data"}` as parsed from JSON -> `{shape, data: Float32Array}`. */
export function decodeJsonTensor(where, spec) {
  if (spec === null || typeof spec !== "object" || !("shape" in spec) || !("data" in spec)) {
    throw new WireError(`${where} is not a tensor object with shape and data`);
  }
  const { shape, data } = spec;
  if (!isShape(shape)) throw new WireError(`${where}: shape must be a list of non-negative integers`);
  if (!Array.isArray(data) || data.length !== product(shape)) {
    throw new WireError(`${where}: data must be a flat list of ${product(shape)} numbers`);
  }
  for (let i = 0; i < data.length; i++) {
    if (typeof data[i] !== "number") throw new WireError(`${where}: data[${i}] is not a number`);
  }
  return { shape: [...shape], data: Float32Array.from(data) };
}

/** Compact JSON for a value without tensors; undefined members are left out, as JSON does. */
export function dumps(value) {
  const text = JSON.stringify(value, (key, v) => {
    if (typeof v === "number" && !Number.isFinite(v)) {
      throw new RangeError(`cannot encode ${v} as JSON${key ? ` (in ${JSON.stringify(key)})` : ""}`);
    }
    return v;
  });
  return text;
}

export function loads(bytes) {
  try {
    return JSON.parse(typeof bytes === "string" ? bytes : new TextDecoder("utf-8", { fatal: true }).decode(bytes));
  } catch (error) {
    throw new WireError(`the response is not valid JSON: ${error.message}`);
  }
}

/** Each field as its JSON text, as the server reads safetensors metadata. */
export function encodeMetadata(fields) {
  const metadata = {};
  for (const [key, value] of entriesOf(fields)) {
    if (value !== undefined) setEntry(metadata, key, dumps(value));
  }
  return metadata;
}

/** JSON texts back to values; a text that is not JSON is a bare string. */
export function decodeMetadata(metadata) {
  const fields = {};
  for (const [key, text] of Object.entries(metadata)) {
    let value;
    try {
      value = JSON.parse(text);
    } catch {
      value = text;
    }
    setEntry(fields, key, value);
  }
  return fields;
}

/**
 * Tensors and fields -> `{body, contentType}` in `codec` ("json" or "safetensors"); `body` is a
 * string (JSON) or a Uint8Array (safetensors). Fields whose value is undefined are left out.
 */
export function encodeMessage(codec, tensorField, tensors, fields = {}) {
  const named = entriesOf(tensors);
  if (codec === "json") {
    const parts = [];
    for (const [key, value] of entriesOf(fields)) {
      if (key !== tensorField && value !== undefined) parts.push(`${JSON.stringify(key)}:${dumps(value)}`);
    }
    const encoded = named.map(([name, value]) => `${JSON.stringify(name)}:${encodeJsonTensor(name, value)}`);
    parts.push(`${JSON.stringify(tensorField)}:{${encoded.join(",")}}`);
    return { body: `{${parts.join(",")}}`, contentType: JSON_TYPE };
  }
  if (codec !== "safetensors") throw new TypeError(`codec must be "json" or "safetensors", not ${JSON.stringify(codec)}`);
  try {
    return { body: safetensors.encode(toTensors(tensors), encodeMetadata(fields)), contentType: SAFETENSORS_TYPE };
  } catch (error) {
    if (error instanceof safetensors.SafetensorsError) throw new WireError(error.message);
    throw error;
  }
}

/**
 * A response body (Uint8Array) -> `{tensors, fields}`, whichever media type the server chose.
 */
export function decodeMessage(bytes, contentType, tensorField) {
  if (mediaType(contentType) === SAFETENSORS_TYPE) {
    let decoded;
    try {
      decoded = safetensors.decode(bytes);
    } catch (error) {
      if (error instanceof safetensors.SafetensorsError) throw new WireError(error.message);
      throw error;
    }
    return { tensors: decoded.tensors, fields: decodeMetadata(decoded.metadata) };
  }
  const fields = loads(bytes);
  if (fields === null || typeof fields !== "object" || Array.isArray(fields)) {
    throw new WireError("the response is not a JSON object");
  }
  const raw = fields[tensorField] ?? {};
  delete fields[tensorField];
  if (typeof raw !== "object" || Array.isArray(raw)) throw new WireError(`"${tensorField}" in the response is not an object`);
  const tensors = {};
  for (const [name, spec] of Object.entries(raw)) {
    setEntry(tensors, name, decodeJsonTensor(`${tensorField}[${JSON.stringify(name)}]`, spec));
  }
  return { tensors, fields };
}
