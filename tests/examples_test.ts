/**
 * The examples in src/examples/ run under their own runtime, in a subprocess, with small arguments:
 * the Bun one with the bun binary, the Deno one with `deno run -A`. Each must exit 0 and print its
 * summary: a line per decode step, the memory report with quantized tokens, and a finite
 * `max relative difference vs bits 16` below 0.5.
 */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { existsSync } from "node:fs";
import { join } from "node:path";
import process from "node:process";
import { fileURLToPath } from "node:url";

const root = fileURLToPath(new URL("../", import.meta.url));
const isBun = "Bun" in globalThis;
const isDeno = "Deno" in globalThis;

/** The runtime's binary: ourselves when we are it, else node_modules/.bin, else PATH. */
function runtime(name: "bun" | "deno"): string {
  if ((name === "bun" && isBun) || (name === "deno" && isDeno)) return process.execPath;
  const local = join(root, "node_modules", ".bin", name);
  return existsSync(local) ? local : name;
}

const STEPS = 3;
// 80 prompt tokens with a 32-token residual window: 32 of them go into quantized pages at prefill.
const ARGS = ["--steps", String(STEPS), "--prompt", "80", "--layers", "2"];

function runExample(cmd: string, args: string[]): string {
  const r = spawnSync(cmd, args, {
    cwd: root,
    encoding: "utf8",
    timeout: 120_000,
    env: { ...process.env, NO_COLOR: "1" },
  });
  const output = `${r.stdout ?? ""}${r.stderr ?? ""}`;
  assert.equal(r.error, undefined, `${cmd} could not run: ${r.error?.message}`);
  assert.equal(r.status, 0, `${cmd} ${args.join(" ")} exited with ${r.status}:\n${output}`);
  return r.stdout;
}

function checkSummary(out: string): void {
  const steps = out.match(/^step +\d+: attention output norm \d+\.\d+ \(bits 16: \d+\.\d+\)/gm) ?? [];
  assert.equal(steps.length, STEPS, `expected ${STEPS} step lines in:\n${out}`);
  const mem = out.match(/^memory: (\d+) tokens over all layers \((\d+) in (\d+) pages\).*? ([\d.]+) bits per value/m);
  assert.ok(mem, `no memory line in:\n${out}`);
  assert.ok(Number(mem[2]) > 0, `no token was quantized: ${mem[0]}`);
  assert.ok(Number(mem[4]) < 16, `bits per value ${mem[4]} is not below fp16`);
  const diff = out.match(/^max relative difference vs bits 16: (\S+)$/m);
  assert.ok(diff, `no 'max relative difference vs bits 16' line in:\n${out}`);
  const x = Number(diff[1]);
  assert.ok(Number.isFinite(x) && x > 0 && x < 0.5, `max relative difference ${diff[1]} is not in (0, 0.5)`);
}

describe("examples", () => {
  it("src/examples/bun_decode.ts runs under Bun", () => {
    checkSummary(runExample(runtime("bun"), ["src/examples/bun_decode.ts", ...ARGS]));
  });

  // On a machine with only Bun (the lent GPU, where one runtime is carried at a time) there is no Deno to run.
  if (spawnSync(runtime("deno"), ["--version"]).error !== undefined) {
    it("skipped: src/examples/deno_decode.ts needs deno (npm ci installs it)", { skip: true }, () => {});
    return;
  }
  it("src/examples/deno_decode.ts runs under Deno", () => {
    checkSummary(runExample(runtime("deno"), ["run", "-A", "src/examples/deno_decode.ts", ...ARGS]));
  });
});
