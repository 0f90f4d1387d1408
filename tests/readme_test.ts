/**
 * Every ```ts block of README.md runs as a test (imports of ./src/ rewritten to this checkout), so
 * the documentation cannot go stale.
 */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";

const root = fileURLToPath(new URL("../", import.meta.url));
const readme = readFileSync(join(root, "README.md"), "utf8");
const blocks = [...readme.matchAll(/```ts\n([\s\S]*?)```/g)].map((m) => m[1]);

describe("README code blocks run", () => {
  it("has code blocks to run", () => assert.ok(blocks.length >= 3, `found ${blocks.length}`));
  blocks.forEach((code, i) => {
    const title = code.split("\n").find((l) => l.trim() && !l.startsWith("import"))?.trim() ?? "";
    it(`block ${i + 1}: ${title.slice(0, 60)}`, async () => {
      const src = code.replaceAll('"./src/', `"${pathToFileURL(join(root, "src"))}/`);
      const dir = mkdtempSync(join(tmpdir(), "kivi-readme-"));
      const file = join(dir, `block_${i + 1}.ts`);
      writeFileSync(file, src);
      try {
        await import(pathToFileURL(file).href);
      } finally {
        rmSync(dir, { recursive: true, force: true });
      }
    });
  });
});
