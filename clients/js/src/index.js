/**
 * optserve client for Node 18+ and browsers: push gradients, pull parameters, checkpoint state.
 *
 *   import { Client } from "optserve-client";
 *   const client = new Client({ url: "http://127.0.0.1:8000" });
 *   const session = await client.createSession({ optimizer: "adam", lr: 1e-3,
 *     params: { w: { shape: [2, 3], data: new Float32Array(6) } } });
 *   const { version, params } = await session.push({ w: { shape: [2, 3], data: grad } });
 */

export { Client, LIST_PAGE, RETURNING, RetryPolicy, Session, VERSION, newIdempotencyKey, retryAfterMs } from "./client.js";
export { OptservError } from "./errors.js";
export * as safetensors from "./safetensors.js";
export { SafetensorsError } from "./safetensors.js";
export { decodeState, encodeState } from "./state.js";
export {
  CODECS,
  JSON_TYPE,
  SAFETENSORS_TYPE,
  WireError,
  decodeJsonTensor,
  decodeMessage,
  encodeJsonTensor,
  encodeMessage,
  formatFloat32,
  toTensor,
  toTensors,
} from "./wire.js";
