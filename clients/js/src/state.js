/**
 * The optimizer-state document (a checkpoint) in both media types, as one JS shape.
 *
 * Callers always see `{version, optimizer, lr_schedule, lr_schedule_state,
 * tensors: {name: {param: tensor, step: number, exp_avg: tensor, ...}}}` (the server's names,
 * tensors as `{shape, data: Float32Array}`), whatever the codec. JSON nests it that way on the
 * wire; safetensors is flat, so each array travels as `<tensor>/<state name>` (split at the last
 * "/": state names never hold one, tensor names may) and the scalars as metadata
 * `"scalars": {name: {"step": 13}}` beside the other fields.
 */

import * as safetensors from "./safetensors.js";
import { entriesOf, setEntry } from "./safetensors.js";
import {
  JSON_TYPE,
  SAFETENSORS_TYPE,
  WireError,
  decodeJsonTensor,
  decodeMetadata,
  dumps,
  encodeJsonTensor,
  encodeMetadata,
  loads,
  mediaType,
  toTensor,
} from "./wire.js";

const isScalar = (value) => typeof value === "number";

/** A state document -> `{body, contentType}`; every field but `tensors` is passed through. */
export function encodeState(document, codec) {
  const entries = document?.tensors;
  if (entries === null || typeof entries !== "object") {
    throw new TypeError('a state document needs "tensors": {name: {param: tensor, ...}}');
  }
  const fields = entriesOf(document).filter(([key, value]) => key !== "tensors" && value !== undefined);
  if (codec === "json") {
    const tensorParts = entriesOf(entries).map(([name, entry]) => {
      const members = entriesOf(entry).map(([key, value]) => {
        const text = isScalar(value) ? dumps(value) : encodeJsonTensor(`${name}/${key}`, value);
        return `${JSON.stringify(key)}:${text}`;
      });
      return `${JSON.stringify(name)}:{${members.join(",")}}`;
    });
    const parts = fields.map(([key, value]) => `${JSON.stringify(key)}:${dumps(value)}`);
    parts.push(`"tensors":{${tensorParts.join(",")}}`);
    return { body: `{${parts.join(",")}}`, contentType: JSON_TYPE };
  }
  const flat = {};
  const scalars = {};
  for (const [name, entry] of entriesOf(entries)) {
    for (const [key, value] of entriesOf(entry)) {
      if (isScalar(value)) {
        if (!Object.hasOwn(scalars, name)) setEntry(scalars, name, {});
        setEntry(scalars[name], key, value);
      } else {
        setEntry(flat, `${name}/${key}`, toTensor(`${name}/${key}`, value));
      }
    }
  }
  const metadata = encodeMetadata(Object.fromEntries([...fields, ["scalars", scalars]]));
  try {
    return { body: safetensors.encode(flat, metadata), contentType: SAFETENSORS_TYPE };
  } catch (error) {
    if (error instanceof safetensors.SafetensorsError) throw new WireError(error.message);
    throw error;
  }
}

/** A GET /state response -> the document with `{shape, data: Float32Array}` tensors. */
export function decodeState(bytes, contentType) {
  if (mediaType(contentType) === SAFETENSORS_TYPE) {
    let decoded;
    try {
      decoded = safetensors.decode(bytes);
    } catch (error) {
      if (error instanceof safetensors.SafetensorsError) throw new WireError(error.message);
      throw error;
    }
    const fields = decodeMetadata(decoded.metadata);
    const tensors = {};
    for (const [flatName, tensor] of Object.entries(decoded.tensors)) {
      const cut = flatName.lastIndexOf("/");
      if (cut < 0) throw new WireError(`state tensor ${JSON.stringify(flatName)} is not named <tensor>/<state>`);
      const name = flatName.slice(0, cut);
      if (!Object.hasOwn(tensors, name)) setEntry(tensors, name, {});
      setEntry(tensors[name], flatName.slice(cut + 1), tensor);
    }
    const scalars = fields.scalars ?? {};
    delete fields.scalars;
    if (typeof scalars !== "object" || Array.isArray(scalars)) throw new WireError('"scalars" in the state metadata is not an object');
    for (const [name, values] of Object.entries(scalars)) {
      if (values === null || typeof values !== "object" || Array.isArray(values)) {
        throw new WireError(`"scalars.${name}" in the state metadata is not an object`);
      }
      if (!Object.hasOwn(tensors, name)) setEntry(tensors, name, {});
      for (const [key, value] of Object.entries(values)) setEntry(tensors[name], key, Number(value));
    }
    return { ...fields, tensors };
  }
  const fields = loads(bytes);
  if (fields === null || typeof fields !== "object" || fields.tensors === null || typeof fields.tensors !== "object") {
    throw new WireError('the state response has no "tensors" object');
  }
  const tensors = {};
  for (const [name, entry] of Object.entries(fields.tensors)) {
    if (entry === null || typeof entry !== "object" || Array.isArray(entry)) {
      throw new WireError(`"tensors.${name}" in the state response is not an object`);
    }
    const decoded = {};
    for (const [key, value] of Object.entries(entry)) {
      setEntry(decoded, key, value !== null && typeof value === "object" ? decodeJsonTensor(`tensors.${name}.${key}`, value) : Number(value));
    }
    setEntry(tensors, name, decoded);
  }
  return { ...fields, tensors };
}
