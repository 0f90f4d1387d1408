/**
 * The CPU reference's own C tests (tests/c/cpu_smoke.c, tests/c/cache_smoke.c) and the ABI fuzzer
 * (tests/c/fuzz_abi.c), built from source and run
 *  - under AddressSanitizer and UBSan: any memory error, leak or undefined behaviour fails;
 *  - under valgrind memcheck (--leak-check=full --error-exitcode): the same, seen from outside the
 *    compiler (uninitialised reads too), on an unsanitised -O2 build. Valgrind is 20-50x slower, so
 *    the smoke tests run with --quick and the fuzzer with fewer iterations.
 * They exercise the C library, not the runtime, so they run once, under Bun; under Deno the tests
 * show as skipped. KIVI_FUZZ_ITERS sets the fuzzer's iterations under the sanitizers (default 6000,
 * about 4 s), KIVI_FUZZ_VALGRIND_ITERS under valgrind (default 500), KIVI_FUZZ_SEED its seed.
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
const hasValgrind = spawnSync("valgrind", ["--version"]).status === 0;
const SAN_FLAGS = [
  "-std=c11",
  "-O1",
  "-g",
  "-fsanitize=address,undefined",
  "-fno-omit-frame-pointer",
  "-fno-sanitize-recover=undefined",
];
const VG_FLAGS = ["-std=c11", "-O2", "-g"];
const sources = readdirSync(join(root, "cuda/cpu")).filter((f) => f.endsWith(".c")).map((f) =>
  join(root, "cuda/cpu", f)
);
const fuzzIters = process.env.KIVI_FUZZ_ITERS ?? "6000";
const fuzzSeed = process.env.KIVI_FUZZ_SEED ?? "1";

interface Program {
  name: string;
  args: string[];
  env?: Record<string, string>;
}

/** Builds tests/c/<name>.c with the CPU sources and `flags`, runs it through `wrap`, returns the result. */
function buildAndRun(p: Program, flags: string[], wrap: string[], env: Record<string, string>) {
  const dir = mkdtempSync(join(tmpdir(), "kivi-c-"));
  try {
    const exe = join(dir, p.name);
    const cc = spawnSync("gcc", [
      ...flags,
      `-I${join(root, "cuda/include")}`,
      ...sources,
      join(root, "tests/c", `${p.name}.c`),
      "-lm",
      "-o",
      exe,
    ], { encoding: "utf8" });
    assert.equal(cc.status, 0, `gcc failed:\n${cc.stderr}`);
    const cmd = [...wrap, exe, ...p.args];
    const r = spawnSync(cmd[0], cmd.slice(1), {
      encoding: "utf8",
      env: { ...process.env, ...env, ...p.env },
      maxBuffer: 64 << 20,
    });
    const tail = `${cmd.join(" ")}\n${r.stdout.slice(-2000)}\n${r.stderr.slice(-4000)}`;
    return { status: r.status, stdout: r.stdout, stderr: r.stderr, tail };
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

const fuzz = (iters: string): Program => ({ name: "fuzz_abi", args: [fuzzSeed, iters] });

describe("CPU reference C tests under AddressSanitizer and UBSan", () => {
  if (!isBun || !hasGcc) {
    it(`skipped: ${hasGcc ? "run once, under bun test" : "no gcc"}`, { skip: true }, () => {});
    return;
  }
  const programs: Program[] = [
    { name: "cpu_smoke", args: [] },
    { name: "cache_smoke", args: [] },
    { name: "seq_smoke", args: [] },
    fuzz(fuzzIters),
  ];
  for (const p of programs) {
    it(`${[p.name, ...p.args].join(" ")} is clean`, { timeout: 300_000 }, () => {
      // allocator_may_return_null: the fuzzer asks for 2^50-byte buffers and expects KIVI_ERR_NOMEM.
      const r = buildAndRun(p, SAN_FLAGS, [], {
        ASAN_OPTIONS: "detect_leaks=1:abort_on_error=0:allocator_may_return_null=1",
        UBSAN_OPTIONS: "print_stacktrace=1:halt_on_error=1",
      });
      assert.equal(r.status, 0, `${p.name} exited ${r.status}:\n${r.tail}`);
      assert.match(r.stdout, /PASS: \d+ passed, 0 failed/, r.tail);
      assert.doesNotMatch(
        r.stderr,
        /ERROR: (AddressSanitizer|LeakSanitizer)|runtime error:/,
        r.tail,
      );
    });
  }
});

describe("CPU reference C tests under valgrind memcheck", () => {
  if (!isBun || !hasGcc || !hasValgrind) {
    const why = !hasGcc
      ? "no gcc"
      : !hasValgrind
      ? "valgrind is not installed (apt-get install valgrind; .ci/run does)"
      : "run once, under bun test";
    it(`skipped: ${why}`, { skip: true }, () => {});
    return;
  }
  const programs: Program[] = [
    { name: "cpu_smoke", args: ["--quick"] },
    { name: "cache_smoke", args: ["--quick"] },
    { name: "seq_smoke", args: [] },
    fuzz(process.env.KIVI_FUZZ_VALGRIND_ITERS ?? "500"),
  ];
  for (const p of programs) {
    it(`${[p.name, ...p.args].join(" ")} is clean`, { timeout: 300_000 }, () => {
      const r = buildAndRun(p, VG_FLAGS, [
        "valgrind",
        "-q",
        "--error-exitcode=9",
        "--leak-check=full",
      ], {});
      assert.equal(
        r.status,
        0,
        `${p.name} exited ${r.status} (9: valgrind found errors):\n${r.tail}`,
      );
      assert.match(r.stdout, /PASS: \d+ passed, 0 failed/, r.tail);
      assert.doesNotMatch(
        r.stderr,
        /Invalid (read|write)|uninitialised|definitely lost|indirectly lost/,
        r.tail,
      );
    });
  }
});
