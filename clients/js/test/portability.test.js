// The library must run in browsers as well as Node: no Node-only API, no dependency.
import assert from "node:assert/strict";
import { readdir, readFile } from "node:fs/promises";
import { test } from "node:test";

const SRC = new URL("../src/", import.meta.url);
const NODE_ONLY = /\b(Buffer|process|require|__dirname|__filename|global|setImmediate)\b|["']node:|from\s+["'](?![.]{1,2}\/)/;

test("src/ uses only web-platform globals and relative imports", async () => {
  const files = (await readdir(SRC)).filter((name) => name.endsWith(".js"));
  assert.ok(files.length >= 5);
  for (const name of files) {
    const code = (await readFile(new URL(name, SRC), "utf8"))
      .replace(/\/\*[\s\S]*?\*\//g, "")
      .replace(/(^|[^:"'`])\/\/.*$/gm, "$1");
    const hit = code.match(NODE_ONLY);
    assert.equal(hit, null, `${name} uses ${hit?.[0]}`);
  }
});

test("package.json declares no dependencies and an ES module entry", async () => {
  const pkg = JSON.parse(await readFile(new URL("../package.json", import.meta.url), "utf8"));
  assert.equal(pkg.type, "module");
  assert.equal(pkg.dependencies, undefined);
  assert.equal(pkg.devDependencies, undefined);
  assert.equal(pkg.exports["."], "./src/index.js");
  assert.equal(pkg.scripts.test, "node --test test/");
});
