/**
 * The hostile-input fuzzer: seeded batches of calls of every public function with hostile arguments
 * (getters that dispose, Proxies, lying subclasses, detached and shared buffers, duck-typed tensors
 * and sequences, -0, huge and fractional sizes, unknown keys, non-boolean flags, mismatched dtype
 * hints, overlapping buffers), each batch in a child process of this runtime (tests/_hostile_child.ts),
 * so that a crash is a failure here instead of the end of the test run. Every call must give the
 * plain call's result or a TypeError, RangeError or KiviError that changed nothing.
 *
 * KIVI_FUZZ_CALLS sets the calls per backend (default 10^4, in 8 batches, two at a time) and
 * KIVI_FUZZ_SEED the first batch's seed (default from KIVI_TEST_SEED); a failure prints the command
 * that replays its batch. On a machine with a CUDA device the same batches run against the CUDA
 * build; elsewhere that part shows as "skipped: no CUDA device".
 */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import process from "node:process";
import { fileURLToPath } from "node:url";
import { BASE_SEED } from "./_helpers.ts";
import { gpuDescribe } from "./_gpu.ts";

const child = fileURLToPath(new URL("./_hostile_child.ts", import.meta.url));
const isBun = (globalThis as { Bun?: unknown }).Bun !== undefined;
const CALLS = Number(process.env.KIVI_FUZZ_CALLS ?? 10_000);
const SEED = Number(process.env.KIVI_FUZZ_SEED ?? BASE_SEED) >>> 0;
const BATCHES = 8;

interface Report {
  seed: number;
  backend: string;
  calls: number;
  counts: Record<string, number>;
  failures: string[];
}

/** Runs one batch; resolves with its report, or rejects with the replay command and its output. */
function batch(seed: number, calls: number, backend: "cpu" | "cuda"): Promise<Report> {
  const args = isBun
    ? [child, String(seed), String(calls), backend]
    : ["run", "-A", child, String(seed), String(calls), backend];
  const replay = `${
    isBun ? "bun" : "deno run -A"
  } tests/_hostile_child.ts ${seed} ${calls} ${backend}`;
  return new Promise((resolve, reject) => {
    const p = spawn(process.execPath, args, { stdio: ["ignore", "pipe", "pipe"] });
    let out = "", err = "";
    p.stdout.setEncoding("utf8").on("data", (c: string) => (out += c));
    p.stderr.setEncoding("utf8").on("data", (c: string) => (err += c));
    const timer = setTimeout(() => p.kill("SIGKILL"), 240_000);
    p.on("close", (code, signal) => {
      clearTimeout(timer);
      const line = out.trim().split("\n").at(-1) ?? "";
      let report: Report | undefined;
      try {
        report = JSON.parse(line) as Report;
      } catch {
        // a crash prints no report
      }
      if (code === 0 && report !== undefined) return resolve(report);
      const why = signal ? `killed by ${signal} (a crash)` : `exit ${code}`;
      reject(
        new Error(
          `batch seed ${seed} (${backend}): ${why}; replay: ${replay}\n${
            report ? report.failures.join("\n") : ""
          }\n${err.slice(-4000)}`,
        ),
      );
    });
  });
}

/** Runs the batches two at a time and checks the totals. */
async function fuzz(backend: "cpu" | "cuda"): Promise<void> {
  const per = Math.ceil(CALLS / BATCHES);
  const seeds = Array.from({ length: BATCHES }, (_, i) => (SEED + i * 0x9e3779b1) >>> 0);
  const reports: Report[] = [];
  const errors: string[] = [];
  let next = 0;
  const worker = async () => {
    while (next < seeds.length) {
      const seed = seeds[next++];
      try {
        reports.push(await batch(seed, per, backend));
      } catch (e) {
        errors.push((e as Error).message);
      }
    }
  };
  await Promise.all([worker(), worker()]);
  assert.deepEqual(errors, [], errors.join("\n\n"));
  const total = reports.reduce((s, r) => s + r.calls, 0);
  const outcomes: Record<string, number> = {};
  for (const r of reports) {
    for (const [k, n] of Object.entries(r.counts)) {
      outcomes[k.split(" ")[1]] = (outcomes[k.split(" ")[1]] ?? 0) + n;
    }
  }
  console.log(
    `hostile fuzz (${backend}, ${
      isBun ? "bun" : "deno"
    }): ${total} calls in ${reports.length} processes, seeds from ${SEED}: ${
      JSON.stringify(outcomes)
    }`,
  );
  assert.ok(total >= CALLS, `${total} calls made, ${CALLS} asked for`);
  // Both outcomes happened: valid calls went through and hostile ones were refused.
  assert.ok(
    (outcomes.ok ?? 0) > total / 10 && total - (outcomes.ok ?? 0) > total / 10,
    JSON.stringify(outcomes),
  );
}

const RUNS = [
  [describe, "hostile-input fuzzer", "CPU", "cpu"],
  [gpuDescribe, "hostile-input fuzzer on CUDA", "CUDA", "cuda"],
] as const;
for (const [suite, title, label, kind] of RUNS) {
  suite(title, () => {
    it(
      `${label}: ${CALLS} hostile calls in ${BATCHES} child processes, each a correct result or a typed error that changed nothing`,
      { timeout: 600_000 },
      async () => {
        await fuzz(kind);
      },
    );
  });
}
