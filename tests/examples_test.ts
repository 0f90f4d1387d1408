/**
 * The examples in src/examples/ run under their own runtime, in a subprocess, with small arguments:
 * the Bun one with the bun binary, the Deno one with `deno run -A`. Each decodes the real
 * byte-llama-9m over a 2-bit and a bits-16 cache and must exit 0 and print a line per decode step
 * with finite log-probabilities, both texts, and how many tokens agree with bits 16.
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

const STEPS = 6;
const ARGS = ["--steps", String(STEPS), "--backend", "cpu"];

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
  const steps = [
    ...out.matchAll(/^step +\d+: ".+" log p (-?\d+\.\d+) \(bits 16: ".+" (-?\d+\.\d+)\)$/gm),
  ];
  assert.equal(steps.length, STEPS, `expected ${STEPS} step lines in:\n${out}`);
  for (const m of steps) assert.ok(Number(m[1]) <= 0 && Number(m[2]) <= 0, m[0]);
  assert.match(out, /^2-bit cache: ".*The President said that the.+"$/m);
  assert.match(out, /^bits-16 cache: ".*The President said that the.+"$/m);
  const agree = out.match(/^agreement with bits 16: (\d+) of (\d+) tokens$/m);
  assert.ok(agree, `no agreement line in:\n${out}`);
  assert.equal(Number(agree[2]), STEPS);
  assert.ok(Number(agree[1]) >= 1, agree[0]);
}

describe("examples", () => {
  it("src/examples/bun_decode.ts runs under Bun", () => {
    checkSummary(runExample(runtime("bun"), ["src/examples/bun_decode.ts", ...ARGS]));
  });

  // On a machine with only Bun (the lent GPU, where one runtime is carried at a time) there is no Deno to run.
  if (spawnSync(runtime("deno"), ["--version"]).error !== undefined) {
    it(
      "skipped: src/examples/deno_decode.ts needs deno (npm ci installs it)",
      { skip: true },
      () => {},
    );
    return;
  }
  it("src/examples/deno_decode.ts runs under Deno", () => {
    checkSummary(
      runExample(runtime("deno"), ["run", "-A", "src/examples/deno_decode.ts", ...ARGS]),
    );
  });
});
