// The safetensors codec: unit tests, and a two-way check against the Python `safetensors`
// package through files the pytest wrapper (tests/test_js_client.py) prepares and then verifies.
import assert from "node:assert/strict";
import { mkdir, readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { describe, test } from "node:test";

import { SafetensorsError, decodeState, encodeMessage, encodeState, safetensors } from "../src/index.js";
import { FIXTURES, SKIP_FIXTURES, bitsOf, fromBits, readBytes, rng, sameBits, tensor } from "./helpers/env.js";

const { compareCodePoints, decode, encode } = safetensors;

/** Every kind of float32 the codec must carry bit for bit. */
const SPECIAL_BITS = [
  0x00000000, 0x80000000, // +0, -0
  0x7fc00000, 0xffc00000, 0x7fc00001, 0x7f800001, 0x7fbfffff, // NaNs: quiet, negative, payloads, signalling
  0x7f800000, 0xff800000, // +-inf
  0x00000001, 0x807fffff, 0x00800000, // subnormals, smallest normal
  0x7f7fffff, 0xff7fffff, 0x3f800000, 0x15ae43fd, // largest, 1.0, the JSON double-rounding trap
];

const headerOf = (bytes) => {
  const n = new DataView(bytes.buffer, bytes.byteOffset).getUint32(0, true);
  return { length: n, text: new TextDecoder().decode(bytes.subarray(8, 8 + n)) };
};

describe("safetensors codec", () => {
  test("round trip keeps every bit, shape, name and metadata", () => {
    const tensors = {
      special: tensor([SPECIAL_BITS.length], fromBits(SPECIAL_BITS)),
      matrix: tensor([3, 4], rng(1).finiteBits(12)),
      scalar: tensor([], [2.5]),
      empty: tensor([0, 3], []),
      "enc/w": tensor([2], [1, 2]),
      "é😀": tensor([1], [3]),
      ["__proto__"]: tensor([1], [4]),
    };
    const metadata = { version: "7", worker: '"a"', "": "empty key" };
    const decoded = decode(encode(tensors, metadata));
    assert.deepEqual(Object.keys(decoded.tensors).sort(), Object.keys(tensors).sort());
    for (const [name, t] of Object.entries(tensors)) assert.ok(sameBits(decoded.tensors[name], t), name);
    assert.deepEqual({ ...decoded.metadata }, metadata);
    assert.equal(Object.getPrototypeOf(decoded.tensors), Object.prototype);
  });

  test("layout: LE length, padded header, __metadata__ first, names in code point order", () => {
    const bytes = encode(
      { b: tensor([1], [1]), a: tensor([1], [2]), "\uff01": tensor([1], [3]), "😀": tensor([1], [4]), 10: tensor([1], [5]), 9: tensor([1], [6]) },
      { k: "v" },
    );
    const { length, text } = headerOf(bytes);
    assert.equal(length % 8, 0);
    assert.equal(bytes.length, 8 + length + 6 * 4);
    assert.match(text, /^\{"__metadata__":\{"k":"v"\},"10":.*,"9":.*,"a":.*,"b":.*,"！":.*,"😀":\{"dtype":"F32","shape":\[1\],"data_offsets":\[20,24\]\}\} *$/u);
    // The data section holds the values in that same order, little-endian.
    const data = new DataView(bytes.buffer, bytes.byteOffset + 8 + length);
    assert.deepEqual([0, 1, 2, 3, 4, 5].map((i) => data.getFloat32(4 * i, true)), [5, 6, 2, 1, 3, 4]);
  });

  test("matches the Python package's bytes for a small known file", () => {
    // safetensors.numpy.save({"a": np.array([1.0], np.float32)})
    const header = '{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}';
    const padded = header + " ".repeat((8 - (header.length % 8)) % 8);
    const expected = new Uint8Array(8 + padded.length + 4);
    new DataView(expected.buffer).setUint32(0, padded.length, true);
    expected.set(new TextEncoder().encode(padded), 8);
    expected.set([0, 0, 0x80, 0x3f], 8 + padded.length);
    assert.deepEqual(encode({ a: tensor([1], [1]) }), expected);
    assert.deepEqual(encode({ a: tensor([1], [1]) }, {}), expected); // empty metadata is left out
  });

  test("decodes from an unaligned view and from an ArrayBuffer, and copies the data", () => {
    const bytes = encode({ w: tensor([3], [1, 2, 3]) });
    const shifted = new Uint8Array(bytes.length + 1);
    shifted.set(bytes, 1);
    const view = shifted.subarray(1);
    const decoded = decode(view);
    assert.deepEqual(Array.from(decoded.tensors.w.data), [1, 2, 3]);
    decoded.tensors.w.data[0] = 9;
    assert.deepEqual(Array.from(decode(view).tensors.w.data), [1, 2, 3]);
    assert.deepEqual(Array.from(decode(bytes.slice().buffer).tensors.w.data), [1, 2, 3]);
  });

  test("compareCodePoints orders astral characters after the top of the BMP", () => {
    const names = ["😀", "\uffff", "a", "\ue000", "é", "", "ab"];
    assert.deepEqual([...names].sort(compareCodePoints), ["", "a", "ab", "é", "\ue000", "\uffff", "😀"]);
  });

  test("encode refuses what safetensors cannot hold", () => {
    assert.throws(() => encode({ w: { shape: [2], data: [1, 2] } }), SafetensorsError); // not a Float32Array
    assert.throws(() => encode({ w: tensor([3], [1, 2]) }), SafetensorsError);
    assert.throws(() => encode({ w: tensor([-1], []) }), SafetensorsError);
    assert.throws(() => encode({ __metadata__: tensor([1], [1]) }), SafetensorsError);
    assert.throws(() => encode({ "\ud800": tensor([1], [1]) }), SafetensorsError);
    assert.throws(() => encode({}, { k: 1 }), SafetensorsError);
  });

  test("decode refuses malformed bytes with a SafetensorsError", () => {
    const good = encode({ w: tensor([2], [1, 2]) }, { k: "v" });
    const withHeader = (text, data = new Uint8Array()) => {
      const header = new TextEncoder().encode(text);
      const out = new Uint8Array(8 + header.length + data.length);
      new DataView(out.buffer).setUint32(0, header.length, true);
      out.set(header, 8);
      out.set(data, 8 + header.length);
      return out;
    };
    const cases = {
      "too short": good.subarray(0, 5),
      "header past the end": good.subarray(0, 20),
      "huge header length": Uint8Array.from([0, 0, 0, 0, 1, 0, 0, 0]),
      "not JSON": withHeader("{nope"),
      "not UTF-8": withHeader('{"aX":1}').map((b, i) => (i === 8 + 3 ? 0xff : b)),
      "not an object": withHeader("[1]"),
      "entry not an object": withHeader('{"w":1}'),
      "wrong dtype": withHeader('{"w":{"dtype":"F16","shape":[2],"data_offsets":[0,4]}}', new Uint8Array(4)),
      "bad shape": withHeader('{"w":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}}', new Uint8Array(8)),
      "offsets not matching the shape": withHeader('{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}', new Uint8Array(4)),
      "reversed offsets": withHeader('{"w":{"dtype":"F32","shape":[0],"data_offsets":[4,0]}}', new Uint8Array(4)),
      "a gap": withHeader('{"w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', new Uint8Array(8)),
      "an overlap": withHeader(
        '{"v":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}',
        new Uint8Array(8),
      ),
      "trailing bytes": withHeader('{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', new Uint8Array(8)),
      "metadata not strings": withHeader('{"__metadata__":{"k":1}}'),
    };
    for (const [what, bytes] of Object.entries(cases)) {
      assert.throws(() => decode(bytes), SafetensorsError, what);
    }
  });

  test("a million values encode and decode quickly and exactly", () => {
    const data = rng(2).finiteBits(1 << 20);
    const started = performance.now();
    const back = decode(encode({ w: tensor([1024, 1024], data) })).tensors.w;
    assert.ok(performance.now() - started < 2000);
    assert.ok(sameBits(back, tensor([1024, 1024], data)));
  });
});

// -- against the Python package ------------------------------------------------------------------

function fromB64(b64) {
  const bytes = Buffer.from(b64, "base64");
  return new Float32Array(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength));
}

function toB64(data) {
  return Buffer.from(data.buffer, data.byteOffset, data.byteLength).toString("base64");
}

function manifestTensors(entry) {
  return Object.fromEntries(Object.entries(entry.tensors).map(([name, t]) => [name, tensor(t.shape, fromB64(t.b64))]));
}

/** Files this side writes for the wrapper to load with the Python package. */
const written = {};

async function writeCase(dir, name, bytes, tensors, metadata) {
  await writeFile(join(dir, `${name}.safetensors`), bytes);
  written[name] = {
    file: `${name}.safetensors`,
    metadata,
    tensors: Object.fromEntries(Object.entries(tensors).map(([n, t]) => [n, { shape: t.shape, b64: toB64(t.data) }])),
  };
}

describe("safetensors against the Python package", { skip: SKIP_FIXTURES }, () => {
  const pyDir = FIXTURES && join(FIXTURES, "py");
  const jsDir = FIXTURES && join(FIXTURES, "js");

  test("decodes the package's files bit for bit, and encodes the same bytes", async () => {
    const manifest = JSON.parse(await readFile(join(pyDir, "manifest.json"), "utf8"));
    assert.ok(Object.keys(manifest).length >= 4, "the wrapper wrote its cases");
    await mkdir(jsDir, { recursive: true });
    for (const [name, entry] of Object.entries(manifest)) {
      const bytes = await readBytes(join(pyDir, entry.file));
      const decoded = decode(bytes);
      const expected = manifestTensors(entry);
      assert.deepEqual(Object.keys(decoded.tensors).sort(), Object.keys(expected).sort(), name);
      for (const [tname, t] of Object.entries(expected)) {
        assert.ok(sameBits(decoded.tensors[tname], t), `${name}: ${tname}`);
      }
      assert.deepEqual({ ...decoded.metadata }, entry.metadata ?? {}, name);

      const ours = encode(expected, entry.metadata ?? undefined);
      if (Object.keys(entry.metadata ?? {}).length <= 1) {
        // The package writes metadata in hash order, so only files with at most one entry
        // have one byte-exact form.
        assert.deepEqual(ours, bytes, `${name}: byte-identical to the package`);
      } else {
        assert.equal(ours.length, bytes.length, name);
        assert.deepEqual({ ...decode(ours).metadata }, entry.metadata, name);
      }
      // Re-encode what was decoded, for the wrapper to compare with its originals.
      await writeCase(jsDir, `roundtrip_${name}`, encode(decoded.tensors, decoded.metadata), decoded.tensors, decoded.metadata);
    }
  });

  test("writes files the package reads back bit for bit", async () => {
    await mkdir(jsDir, { recursive: true });
    const made = {
      special: tensor([4, 4], fromBits(SPECIAL_BITS)),
      random: tensor([64, 33], rng(3).finiteBits(64 * 33)),
      scalar: tensor([], [-0]),
      empty: tensor([2, 0], []),
      "enc/w": tensor([3], [0.1, 0.2, 0.3]),
      "名前": tensor([1], [7]),
      "😀": tensor([2, 1], [8, 9]),
    };
    const metadata = { version: "12", note: "ünïcode ✓", quote: '"q"' };
    await writeCase(jsDir, "js_made", encode(made, metadata), made, metadata);

    // A push body as the client sends it: fields as JSON texts in the metadata.
    const grads = { w: tensor([2, 3], [1, 2, 3, 4, 5, 6]), b: new Float32Array([0.5, -0.5]) };
    const message = encodeMessage("safetensors", "grads", grads, { base_version: 3, worker: "w1" });
    await writeCase(jsDir, "message", message.body, { w: grads.w, b: tensor([2], grads.b) }, { base_version: "3", worker: '"w1"' });

    // A state document: arrays as <tensor>/<state>, scalars in the metadata.
    const document = {
      version: 5,
      optimizer: { name: "adam", lr: 0.01 },
      tensors: { "enc/w": { param: tensor([2], [1, 2]), exp_avg: tensor([2], [0.25, 0.5]), step: 5 } },
    };
    const state = encodeState(document, "safetensors");
    const flat = { "enc/w/param": document.tensors["enc/w"].param, "enc/w/exp_avg": document.tensors["enc/w"].exp_avg };
    await writeCase(jsDir, "state", state.body, flat, {
      version: "5",
      optimizer: '{"name":"adam","lr":0.01}',
      scalars: '{"enc/w":{"step":5}}',
    });
    const back = decodeState(state.body, "application/x-safetensors");
    assert.equal(back.tensors["enc/w"].step, 5);
    assert.ok(sameBits(back.tensors["enc/w"].exp_avg, document.tensors["enc/w"].exp_avg));
    assert.equal(bitsOf(made.scalar.data)[0], 0x80000000);
  });

  test("manifest for the wrapper", async () => {
    await mkdir(jsDir, { recursive: true });
    await writeFile(join(jsDir, "manifest.json"), JSON.stringify(written));
    assert.ok(Object.keys(written).length > 0);
  });
});
