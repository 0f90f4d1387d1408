/**
 * Documentation that cannot go stale: every public export of src/mod.ts has JSDoc with an
 * @example, and every @example code block in src/ runs (imports of ./mod.ts pointed at this
 * checkout).
 */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import * as mod from "../src/mod.ts";

const srcDir = fileURLToPath(new URL("../src/", import.meta.url));
const sources = readdirSync(srcDir).filter((f) => f.endsWith(".ts")).map((f) => ({
  file: f,
  text: readFileSync(join(srcDir, f), "utf8"),
}));

/** The JSDoc block right before `export ... name`, if any. */
function docOf(name: string): string | undefined {
  for (const { text } of sources) {
    const m = new RegExp(`export (?:async )?(?:function|class|const) ${name}\\b`).exec(text);
    if (!m) continue;
    const before = text.slice(0, m.index).trimEnd();
    if (!before.endsWith("*/")) return "";
    return before.slice(before.lastIndexOf("/**"));
  }
  return undefined;
}

const examples = sources.flatMap(({ file, text }) =>
  [...text.matchAll(/\/\*\*[\s\S]*?\*\//g)].flatMap((c) =>
    [...c[0].matchAll(/```ts\n([\s\S]*?)```/g)].map((b) => ({
      file,
      code: b[1].split("\n").map((l) => l.replace(/^\s*\* ?/, "")).join("\n"),
    }))
  )
);

describe("docs", () => {
  it("every exported function, class and constant of mod.ts has JSDoc with an @example", () => {
    const missing = Object.keys(mod).filter((n) => {
      const d = docOf(n);
      return d !== undefined && !d.includes("@example");
    });
    assert.deepEqual(missing, []);
  });

  it(`has examples to run (${examples.length})`, () => assert.ok(examples.length >= 20));
  const modUrl = pathToFileURL(join(srcDir, "mod.ts")).href;
  examples.forEach(({ file, code }, i) => {
    it(`example ${i + 1} of ${file} runs`, async () => {
      const dir = mkdtempSync(join(tmpdir(), "kivi-doc-"));
      const path = join(dir, `example_${i + 1}.ts`);
      writeFileSync(path, code.replaceAll('"./mod.ts"', `"${modUrl}"`));
      const log = console.log;
      console.log = () => {};
      try {
        await import(pathToFileURL(path).href);
      } finally {
        console.log = log;
        rmSync(dir, { recursive: true, force: true });
      }
    });
  });
});
