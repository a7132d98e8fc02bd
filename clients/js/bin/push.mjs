#!/usr/bin/env node
// Push one set of gradients and print the answer as JSON:
//
//   node clients/js/bin/push.mjs URL SESSION_ID GRADS_JSON_FILE [json|safetensors]
//
// GRADS_JSON_FILE holds {"name": {"shape": [...], "data": [...]}, ...}. The push goes through the
// client (one Idempotency-Key over its retries, base_version = the session's version when this
// command joined it). stdout gets one JSON object: the server's fields (version, applied,
// staleness, ...) plus "replayed", "idempotency_key" and "params" as JSON tensors whose numbers
// read back as exactly the float32s the server sent. Errors go to stderr as the problem
// document, with exit status 1 (2 for bad usage).
import { readFile } from "node:fs/promises";

import { Client, OptservError, encodeJsonTensor } from "../src/index.js";

const USAGE = "usage: node push.mjs URL SESSION_ID GRADS_JSON_FILE [json|safetensors]";

async function main(argv) {
  if (argv.length < 3 || argv.length > 4 || (argv[3] !== undefined && !["json", "safetensors"].includes(argv[3]))) {
    process.stderr.write(`${USAGE}\n`);
    return 2;
  }
  const [url, sessionId, gradsFile, codec = "safetensors"] = argv;
  let grads;
  try {
    grads = JSON.parse(await readFile(gradsFile, "utf8"));
  } catch (error) {
    process.stderr.write(`cannot read ${gradsFile}: ${error.message}\n`);
    return 2;
  }
  try {
    const client = new Client({ url, codec });
    const session = await client.session(sessionId);
    const result = await session.push(grads);
    const parts = Object.entries({ ...result.fields, replayed: result.replayed, idempotency_key: result.idempotencyKey })
      .map(([key, value]) => `${JSON.stringify(key)}:${JSON.stringify(value)}`);
    const params = Object.entries(result.params).map(([name, t]) => `${JSON.stringify(name)}:${encodeJsonTensor(name, t)}`);
    parts.push(`"params":{${params.join(",")}}`);
    process.stdout.write(`{${parts.join(",")}}\n`);
    return 0;
  } catch (error) {
    if (error instanceof OptservError) {
      process.stderr.write(`${JSON.stringify({ ...error.problem, status: error.status, code: error.code, detail: error.detail })}\n`);
    } else {
      process.stderr.write(`${error?.stack ?? error}\n`);
    }
    return 1;
  }
}

process.exitCode = await main(process.argv.slice(2));
