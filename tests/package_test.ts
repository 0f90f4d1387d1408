/**
 * package.json and deno.json describe a package that can be installed: the entry points exist, the
 * bin is a Bun script with a shebang, "files" ships everything the install step and the library
 * need (and nothing built or installed), and the postinstall script is plain JavaScript that Node
 * runs. No network, no npm: the real `npm pack` / `npm install` check is done by hand.
 */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { existsSync, readFileSync, statSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";

const root = fileURLToPath(new URL("../", import.meta.url));
const pkg = JSON.parse(readFileSync(join(root, "package.json"), "utf8"));
const deno = JSON.parse(readFileSync(join(root, "deno.json"), "utf8"));
const exists = (rel: string) => existsSync(join(root, rel));

/** True when `rel` is shipped by the "files" list (an entry names it or a folder above it). */
function shipped(rel: string): boolean {
  const clean = rel.replace(/^\.\//, "");
  return (pkg.files as string[]).some((f) => {
    const entry = f.replace(/^\.\//, "").replace(/\/$/, "");
    return clean === entry || clean.startsWith(entry + "/");
  });
}

describe("package.json", () => {
  it("exports '.' points at src/mod.ts, which exists and is shipped", () => {
    assert.equal(pkg.exports["."], "./src/mod.ts");
    assert.ok(exists("src/mod.ts"));
    assert.ok(shipped("src/mod.ts"));
  });

  it("deno.json exports the same entry point", () => {
    assert.equal(deno.exports, "./src/mod.ts");
    assert.equal(deno.version, pkg.version);
  });

  it("bin entries exist, are shipped and start with a shebang", () => {
    const bins = Object.entries(pkg.bin as Record<string, string>);
    assert.ok(bins.some(([name]) => name === "kivi"), "no 'kivi' bin");
    for (const [name, file] of bins) {
      assert.ok(exists(file), `bin ${name}: ${file} does not exist`);
      assert.ok(shipped(file), `bin ${name}: ${file} is not in "files"`);
      const first = readFileSync(join(root, file), "utf8").split("\n")[0];
      assert.match(
        first!,
        /^#!\/usr\/bin\/env (bun|node|deno)\b/,
        `bin ${name}: ${file} has no shebang`,
      );
    }
  });

  it("files exist and ship the sources, the build script and the install step", () => {
    for (const f of pkg.files as string[]) {
      assert.ok(exists(f), `"files" entry ${f} does not exist`);
    }
    // The CLI's demo and bench commands run these scripts from the installed package.
    for (
      const need of [
        "src/mod.ts",
        "src/backend.ts",
        "cuda/include/kivi.h",
        "build.ts",
        "README.md",
        "demo.ts",
        "bench/quant.ts",
        "bench/attention.ts",
        "bench/_report.ts",
      ]
    ) {
      assert.ok(shipped(need), `${need} is not in "files"`);
    }
    assert.ok(statSync(join(root, "cuda/cpu")).isDirectory() && shipped("cuda/cpu/cache.c"));
    assert.ok(shipped("cuda/src/cache.cu"));
    for (
      const never of [
        "node_modules/bun",
        "build/libkivi_cpu.so",
        "tests/package_test.ts",
        "bench/results/nvidia-h200.json",
        ".gpu/bun.xz",
      ]
    ) {
      assert.ok(!shipped(never), `${never} would be shipped`);
    }
  });

  it("postinstall runs a shipped plain-JavaScript script with node", () => {
    const cmd: string = pkg.scripts.postinstall;
    const m = cmd.match(/^node (\S+\.m?js)$/);
    assert.ok(m, `postinstall should be 'node <script>.mjs', got ${cmd}`);
    const script = m[1]!;
    assert.ok(exists(script), `${script} does not exist`);
    assert.ok(shipped(script), `${script} is not in "files"`);
    const text = readFileSync(join(root, script), "utf8");
    // Node 20 runs no TypeScript: no type annotations or TS-only syntax in the script.
    assert.doesNotMatch(text, /^\s*(import type|interface |type \w+ =)/m);
    assert.doesNotMatch(
      text,
      /from "\.\.?\/.*\.ts"/,
      "the postinstall script must not import TypeScript",
    );
    // It tells a dependency install from `npm ci` in this repository, where it builds the CPU
    // library only (tests/first_run_test.ts runs it).
    assert.match(text, /installedAsDependency/);
  });

  it("what the libraries are loaded from is what build.ts writes (build/ beside src/)", () => {
    const backend = readFileSync(join(root, "src/backend.ts"), "utf8");
    assert.match(backend, /\.\.\/build\/libkivi_\$\{kind\}\.so/);
    const build = readFileSync(join(root, "build.ts"), "utf8");
    assert.match(build, /build\/libkivi_cuda\.so/);
  });
});
