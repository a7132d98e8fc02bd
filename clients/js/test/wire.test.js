// JSON tensors and message bodies, without a server.
import assert from "node:assert/strict";
import { describe, test } from "node:test";

import {
  WireError,
  decodeJsonTensor,
  decodeMessage,
  decodeState,
  encodeJsonTensor,
  encodeMessage,
  encodeState,
  formatFloat32,
  safetensors,
  toTensor,
} from "../src/index.js";
import { bitsOf, fromBits, rng, sameBits, tensor } from "./helpers/env.js";

describe("JSON tensors", () => {
  test("every finite float32 survives encode -> JSON.parse -> Float32Array bit for bit", () => {
    const data = rng(10).finiteBits(200_000);
    const extra = fromBits([0x80000000, 0x00000001, 0x807fffff, 0x7f7fffff, 0x15ae43fd, 0x95ae43fd, 0x3dcccccd]);
    for (const values of [data, extra]) {
      const spec = JSON.parse(encodeJsonTensor("w", tensor([values.length], values)));
      assert.ok(sameBits(decodeJsonTensor("w", spec), tensor([values.length], values)));
    }
  });

  test("-0 is written as -0.0, which JSON.stringify would lose", () => {
    assert.equal(formatFloat32(-0), "-0.0");
    assert.equal(encodeJsonTensor("z", tensor([2], [-0, 0])), '{"shape":[2],"data":[-0.0,0]}');
    assert.equal(bitsOf(decodeJsonTensor("z", JSON.parse('{"shape":[1],"data":[-0.0]}')).data)[0], 0x80000000);
  });

  test("NaN and infinity are refused with advice to use safetensors", () => {
    for (const bad of [NaN, Infinity, -Infinity]) {
      assert.throws(() => encodeJsonTensor("g", new Float32Array([1, bad])), /safetensors/);
    }
  });

  test("decoding rounds each number to float32 once and checks the shape", () => {
    const t = decodeJsonTensor("w", { shape: [2, 2], data: [0.1, 1, 2, 1e-50] });
    assert.deepEqual(t.shape, [2, 2]);
    assert.deepEqual(Array.from(t.data), [Math.fround(0.1), 1, 2, 0]);
    assert.throws(() => decodeJsonTensor("w", { shape: [3], data: [1, 2] }), WireError);
    assert.throws(() => decodeJsonTensor("w", { shape: [1], data: ["1"] }), WireError);
    assert.throws(() => decodeJsonTensor("w", { shape: [-1], data: [] }), WireError);
    assert.throws(() => decodeJsonTensor("w", [1, 2]), WireError);
  });
});

describe("tensor input", () => {
  test("{shape, data}, a bare Float32Array, arrays and other typed arrays", () => {
    const f = new Float32Array([1, 2, 3, 4, 5, 6]);
    assert.equal(toTensor("w", { shape: [2, 3], data: f }).data, f); // no copy
    assert.deepEqual(toTensor("w", f).shape, [6]);
    assert.deepEqual(toTensor("w", [1, 2]), tensor([2], [1, 2]));
    assert.deepEqual(toTensor("w", { shape: [2], data: new Float64Array([0.1, 2]) }), tensor([2], [Math.fround(0.1), 2]));
    assert.deepEqual(toTensor("s", { shape: [], data: [3] }), tensor([], [3]));
    assert.throws(() => toTensor("w", { shape: [4], data: f }), RangeError);
    assert.throws(() => toTensor("w", { shape: [2, 3.5], data: f }), TypeError);
    assert.throws(() => toTensor("w", [[1, 2]]), TypeError);
    assert.throws(() => toTensor("w", 3), TypeError);
  });
});

describe("messages", () => {
  const grads = { w: tensor([2, 2], [1, -0, 0.5, 3]), b: new Float32Array([7]) };

  test("JSON: fields beside the tensor field, numbers exact", () => {
    const { body, contentType } = encodeMessage("json", "grads", grads, { base_version: 4, worker: "a", skip: undefined });
    assert.equal(contentType, "application/json");
    assert.equal(
      body,
      '{"base_version":4,"worker":"a","grads":{"w":{"shape":[2,2],"data":[1,-0.0,0.5,3]},"b":{"shape":[1],"data":[7]}}}',
    );
    const back = decodeMessage(new TextEncoder().encode(body), "application/json; charset=utf-8", "grads");
    assert.deepEqual(back.fields, { base_version: 4, worker: "a" });
    assert.ok(sameBits(back.tensors.w, grads.w));
  });

  test("safetensors: fields as JSON texts in the metadata, read back as values", () => {
    const { body, contentType } = encodeMessage("safetensors", "grads", grads, { base_version: 4, worker: "a" });
    assert.equal(contentType, "application/x-safetensors");
    assert.deepEqual({ ...safetensors.decode(body).metadata }, { base_version: "4", worker: '"a"' });
    const back = decodeMessage(body, "application/x-safetensors", "grads");
    assert.deepEqual(back.fields, { base_version: 4, worker: "a" });
    assert.ok(sameBits(back.tensors.b, tensor([1], [7])));
    // A metadata value that is not JSON is a bare string, as the server reads it.
    const bare = safetensors.encode({}, { worker: "plain" });
    assert.deepEqual(decodeMessage(bare, "application/x-safetensors", "grads").fields, { worker: "plain" });
  });

  test("state documents in both codecs decode to the same shape", () => {
    const document = {
      version: 3,
      optimizer: { name: "sgd", lr: 0.1, momentum: 0.9 },
      lr_schedule: null,
      tensors: {
        "enc/w": { param: tensor([2], [1, 2]), momentum_buffer: tensor([2], [0.5, -0]), step: 3 },
        frozen: { param: tensor([1], [4]) },
      },
    };
    for (const [codec, type] of [["json", "application/json"], ["safetensors", "application/x-safetensors"]]) {
      const { body, contentType } = encodeState(document, codec);
      assert.equal(contentType, type);
      const bytes = typeof body === "string" ? new TextEncoder().encode(body) : body;
      const back = decodeState(bytes, contentType);
      assert.equal(back.version, 3);
      assert.deepEqual(back.optimizer, document.optimizer);
      assert.equal(back.tensors["enc/w"].step, 3);
      assert.ok(sameBits(back.tensors["enc/w"].momentum_buffer, document.tensors["enc/w"].momentum_buffer));
      assert.deepEqual(Object.keys(back.tensors.frozen), ["param"]);
    }
  });
});
