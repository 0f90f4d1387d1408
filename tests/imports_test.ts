/**
 * No import circles in src/ (Deno std runs the same check as `lint:circular`): low-level modules
 * (tensor.ts, ffi/_native.ts, _checks.ts) never import the ones built on them. Type-only imports
 * count too, and so do dynamic `import()`s.
 */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { readdirSync, readFileSync, statSync } from "node:fs";
import { dirname, join, relative, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const src = fileURLToPath(new URL("../src/", import.meta.url));

/** Every .ts file under `dir`. */
function tsFiles(dir: string): string[] {
  return readdirSync(dir).flatMap((n) => {
    const p = join(dir, n);
    return statSync(p).isDirectory() ? tsFiles(p) : p.endsWith(".ts") ? [p] : [];
  });
}

/** The relative imports of each file (comments stripped first: JSDoc examples import ./mod.ts). */
function importGraph(files: string[]): Map<string, string[]> {
  const graph = new Map<string, string[]>();
  for (const f of files) {
    const text = readFileSync(f, "utf8").replace(/\/\*[\s\S]*?\*\//g, "").replace(
      /^\s*\/\/.*$/gm,
      "",
    );
    const deps = [...text.matchAll(/(?:\bfrom\s*|\bimport\s*\(\s*)["'](\.{1,2}\/[^"']+)["']/g)].map(
      (m) => resolve(dirname(f), m[1]),
    );
    graph.set(f, deps.filter((d) => files.includes(d)));
  }
  return graph;
}

/** Each import circle, as the chain of files that closes it. */
function circles(graph: Map<string, string[]>): string[][] {
  const found: string[][] = [];
  const state = new Map<string, "open" | "done">();
  const stack: string[] = [];
  const visit = (n: string) => {
    state.set(n, "open");
    stack.push(n);
    for (const d of graph.get(n) ?? []) {
      if (state.get(d) === "open") found.push([...stack.slice(stack.indexOf(d)), d]);
      else if (!state.has(d)) visit(d);
    }
    stack.pop();
    state.set(n, "done");
  };
  for (const n of graph.keys()) if (!state.has(n)) visit(n);
  return found;
}

describe("src/ imports", () => {
  it("finds a circle where there is one", () => {
    const g = new Map([["a", ["b"]], ["b", ["c"]], ["c", ["a"]], ["d", ["a"]]]);
    assert.deepEqual(circles(g), [["a", "b", "c", "a"]]);
  });
  it("has no import circles", () => {
    const found = circles(importGraph(tsFiles(src))).map((c) =>
      c.map((p) => relative(src, p)).join(" -> ")
    );
    assert.deepEqual(found, []);
  });
});
