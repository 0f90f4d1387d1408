/**
 * Every ```ts block of README.md and docs/*.md runs as a test (imports of ./src/ rewritten to this
 * checkout, the examples' model folder ./byte-llama-9m to the tests' copy of it), so
 * the documentation cannot go stale: once on the CPU build and, where there is a device, once on
 * CUDA, unchanged (KIVI_LIB_PATH names the build, so a block that asked for the other one would fail).
 */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import process from "node:process";
import { fileURLToPath, pathToFileURL } from "node:url";
import { defaultLibraryPath } from "../src/mod.ts";
import { gpuDescribe } from "./_gpu.ts";
import { MODEL_DIR } from "./_model.ts";

const root = fileURLToPath(new URL("../", import.meta.url));
const readme = readFileSync(join(root, "README.md"), "utf8");
const docs = readdirSync(join(root, "docs")).filter((f) => f.endsWith(".md")).map((f) =>
  `docs/${f}`
);
const pages = ["README.md", ...docs].map((file) => ({
  file,
  text: readFileSync(join(root, file), "utf8"),
}));
const blocks = pages.flatMap((p) => [...p.text.matchAll(/```ts\n([\s\S]*?)```/g)].map((m) => m[1]));
/** The error table lives in docs/errors.md (the README has the summary). */
const errorsDoc = readFileSync(join(root, "docs/errors.md"), "utf8");

/** Registers one test per block, each run with KIVI_LIB_PATH set to `lib`. */
function runBlocks(lib: string): void {
  blocks.forEach((code, i) => {
    const title = code.split("\n").find((l) => l.trim() && !l.startsWith("import"))?.trim() ?? "";
    it(`block ${i + 1}: ${title.slice(0, 60)}`, async () => {
      const src = code.replaceAll('"./src/', `"${pathToFileURL(join(root, "src"))}/`)
        .replaceAll('"./byte-llama-9m"', JSON.stringify(MODEL_DIR));
      const dir = mkdtempSync(join(tmpdir(), "kivi-readme-"));
      const file = join(dir, `block_${i + 1}.ts`);
      writeFileSync(file, src);
      const saved = process.env.KIVI_LIB_PATH;
      process.env.KIVI_LIB_PATH = lib;
      try {
        await import(pathToFileURL(file).href);
      } finally {
        if (saved === undefined) delete process.env.KIVI_LIB_PATH;
        else process.env.KIVI_LIB_PATH = saved;
        rmSync(dir, { recursive: true, force: true });
      }
    });
  });
}

describe("README code blocks run", () => {
  it("has code blocks to run", () => assert.ok(blocks.length >= 3, `found ${blocks.length}`));
  runBlocks(defaultLibraryPath("cpu"));
});

gpuDescribe(
  "README code blocks run unchanged on CUDA",
  () => runBlocks(defaultLibraryPath("cuda")),
);

/** Titles of the describe/it calls of a test file (template parts kept as written). */
function testTitles(file: string): string[] {
  const text = readFileSync(join(root, file), "utf8");
  // deno fmt writes a title holding double quotes in single quotes
  return [...text.matchAll(/\b(?:it|describe)\(\s*(["'`])((?:\\.|(?!\1).)*)\1/g)].map((m) =>
    m[2].replace(/\\(["'])/g, "$1")
  );
}

describe("README for users", () => {
  it("is at most 250 lines", () => {
    const lines = readme.split("\n").length - (readme.endsWith("\n") ? 1 : 0);
    assert.ok(lines <= 250, `README.md has ${lines} lines`);
  });
  it("points only at files in the repository", () => {
    for (const { file, text } of pages) {
      const base = file.startsWith("docs/") ? join(root, "docs") : root;
      const links = [...text.matchAll(/\]\(([^)#\s]+)\)/g)].map((m) => m[1]).filter((l) =>
        !/^[a-z]+:/.test(l)
      ).map((l) => join(base, l));
      const paths = [...text.matchAll(/`((?:src|cuda|bench|docs|tests|scripts)\/[\w./-]+)`/g)].map((
        m,
      ) => join(root, m[1]));
      for (const p of [...links, ...paths]) {
        if (p.includes("*")) continue;
        assert.ok(
          existsSync(p),
          `${file} points at ${p.slice(root.length)}, which is not in the repository`,
        );
      }
    }
  });
});

describe("docs/errors.md error table", () => {
  const section = errorsDoc.slice(
    errorsDoc.indexOf("### Bad input, kind by kind"),
    errorsDoc.indexOf("### Robustness tests"),
  );
  const rows = section.split("\n").filter((l) => /^\| \d+ \|/.test(l));
  it("lists at least 30 kinds of bad input, numbered in order", () => {
    assert.ok(rows.length >= 30, `found ${rows.length} rows`);
    rows.forEach((r, i) =>
      assert.ok(r.startsWith(`| ${i + 1} |`), `row ${i + 1}: ${r.slice(0, 40)}`)
    );
  });
  it("names, in every row, tests that exist", () => {
    for (const row of rows) {
      const cell = row.split(" | ").at(-1)!.replace(/ \|$/, "");
      // `tests/a_test.ts`: fragment; fragment; `tests/b_test.ts`: fragment
      const parts = [...cell.matchAll(/`(tests\/[\w.]+)`: ([^`]*)/g)];
      assert.ok(parts.length > 0, `no test named in: ${row.slice(0, 60)}`);
      for (const [, file, frags] of parts) {
        const titles = testTitles(file);
        for (const frag of frags.split(";").map((f) => f.trim()).filter(Boolean)) {
          assert.ok(
            titles.some((t) => t.includes(frag)),
            `${row.slice(0, 12)}: no test in ${file} whose name holds "${frag}"`,
          );
        }
      }
    }
  });
});
