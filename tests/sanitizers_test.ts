/**
 * The CPU reference's own C tests (tests/c/cpu_smoke.c, tests/c/cache_smoke.c) built from source
 * with AddressSanitizer and UBSan and run: any memory error, leak or undefined behaviour fails.
 * They exercise the C library, not the runtime, so they run once, under Bun; under Deno the test
 * shows as skipped.
 */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { mkdtempSync, readdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import process from "node:process";
import { fileURLToPath } from "node:url";

const root = fileURLToPath(new URL("../", import.meta.url));
const isBun = (globalThis as { Bun?: unknown }).Bun !== undefined;
const hasGcc = spawnSync("gcc", ["--version"]).status === 0;
const FLAGS = ["-std=c11", "-O1", "-g", "-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"];

describe("CPU reference C tests under AddressSanitizer and UBSan", () => {
  if (!isBun || !hasGcc) {
    it(`skipped: ${hasGcc ? "run once, under bun test" : "no gcc"}`, { skip: true }, () => {});
    return;
  }
  const sources = readdirSync(join(root, "cuda/cpu")).filter((f) => f.endsWith(".c")).map((f) => join(root, "cuda/cpu", f));
  for (const name of ["cpu_smoke", "cache_smoke"]) {
    it(`${name} is clean`, { timeout: 300_000 }, () => {
      const dir = mkdtempSync(join(tmpdir(), "kivi-asan-"));
      try {
        const exe = join(dir, name);
        const cc = spawnSync("gcc", [...FLAGS, `-I${join(root, "cuda/include")}`, ...sources, join(root, "tests/c", `${name}.c`), "-lm", "-o", exe], { encoding: "utf8" });
        assert.equal(cc.status, 0, `gcc failed:\n${cc.stderr}`);
        const r = spawnSync(exe, [], {
          encoding: "utf8",
          env: { ...process.env, ASAN_OPTIONS: "detect_leaks=1:abort_on_error=0", UBSAN_OPTIONS: "print_stacktrace=1:halt_on_error=1" },
          maxBuffer: 64 << 20,
        });
        const tail = `${r.stdout.slice(-2000)}\n${r.stderr.slice(-4000)}`;
        assert.equal(r.status, 0, `${name} exited ${r.status}:\n${tail}`);
        assert.match(r.stdout, /PASS: \d+ passed, 0 failed/, tail);
        assert.doesNotMatch(r.stderr, /ERROR: (AddressSanitizer|LeakSanitizer)|runtime error:/, tail);
      } finally {
        rmSync(dir, { recursive: true, force: true });
      }
    });
  }
});
