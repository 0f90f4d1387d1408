/**
 * The test runner behind `npm test`: builds the libraries, runs every `tests/**\/*_test.ts` under
 * `bun test` and then under `deno test`, streams their output, counts the leaf tests (`it`/`test`
 * calls, not `describe` groups) of each runtime and ends with one line, `N passed, N failed`, summed
 * over both runtimes. Exits non-zero when a test failed, the build failed, a runtime crashed or
 * printed no summary, or no test file was found.
 *
 * Counting. Bun counts leaf tests itself: its summary (`N pass`, `N fail`, `N skip`, `N todo`,
 * `N error`) is used as is, with errors outside tests (a throwing `describe` body, a missing import)
 * counted as failures. Deno runs `describe`/`it` of node:test as tests and steps and counts the groups
 * too (`ok | 2 passed (5 steps) | ...`), so its pretty output is parsed line by line instead: a line
 * `name ... ok|FAILED|ignored` is a leaf unless it closes a `name ...` line that had children; a group
 * that failed with no failing child (a failing hook) counts as one failure. Skipped and todo tests are
 * neither passed nor failed. Both summaries are still required: a runtime that prints none crashed.
 *
 * Usage: `bun scripts/test.ts [--bun-only | --deno-only] [--no-build] [filter ...]` where a filter
 * keeps the test files whose path contains it (`bun scripts/test.ts quant tests/cache_test.ts`).
 */
import { spawn } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import process from "node:process";
import { fileURLToPath } from "node:url";
import { filesUnder } from "./_util.ts";
import { build } from "../build.ts";

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
/** Bun's default is 5 s per test; Deno has none. Large CPU reference cases need more. */
const BUN_TIMEOUT_MS = 300_000;

interface Counts {
  passed: number;
  failed: number;
  skipped: number;
  /** Why the run is counted as failed beyond its tests (crash, missing summary, exit code). */
  problems: string[];
}

/** Removes ANSI escape sequences. */
function plain(text: string): string {
  // deno-lint-ignore no-control-regex
  return text.replace(/\x1b\[[0-9;?]*[ -/]*[@-~]/g, "");
}

function findTestFiles(dir: string): string[] {
  return filesUnder(ROOT, dir, (n) => /_test\.tsx?$/.test(n));
}

/** The binary of a runtime: node_modules/.bin first (npm-pinned), else the one on PATH. */
function runtimeBin(name: "bun" | "deno"): string {
  const local = path.join(ROOT, "node_modules", ".bin", name);
  return fs.existsSync(local) ? local : name;
}

/** Runs a command in ROOT, streaming its stdout and stderr to our stdout, and returns both merged. */
function runStreaming(
  cmd: string,
  args: string[],
  env: Record<string, string>,
): Promise<{ code: number; output: string }> {
  console.log(`$ ${[path.relative(ROOT, cmd) || cmd, ...args].join(" ")}`);
  return new Promise((resolve) => {
    const child = spawn(cmd, args, {
      cwd: ROOT,
      stdio: ["ignore", "pipe", "pipe"],
      env: { ...process.env, ...env },
    });
    const chunks: string[] = [];
    const forward = (c: Buffer) => {
      chunks.push(c.toString("utf8"));
      process.stdout.write(c);
    };
    child.stdout.on("data", forward);
    child.stderr.on("data", forward);
    child.on("error", (err) => {
      chunks.push(`\n${cmd}: ${err.message}\n`);
      console.log(`${cmd}: ${err.message}`);
      resolve({ code: 127, output: chunks.join("") });
    });
    child.on(
      "close",
      (code, signal) => resolve({ code: code ?? (signal ? 128 : 1), output: chunks.join("") }),
    );
  });
}

/** Counts from `bun test` output: its own summary already counts leaf tests. */
export function countBun(output: string, code: number): Counts {
  const text = plain(output);
  const num = (word: string) => {
    const m = text.match(new RegExp(`^\\s*(\\d+) ${word}\\s*$`, "m"));
    return m ? Number(m[1]) : 0;
  };
  const c: Counts = {
    passed: num("pass"),
    failed: num("fail") + num("errors?"),
    skipped: num("skip") + num("todo"),
    problems: [],
  };
  if (!/^Ran \d+ tests? across \d+ files?/m.test(text)) {
    c.problems.push(`bun printed no summary (exit code ${code})`);
  } else if (code !== 0 && c.failed === 0) {
    c.problems.push(`bun exited with code ${code} but reported no failure`);
  }
  return c;
}

interface Open {
  indent: number;
  name: string;
  children: number;
  failedLeaves: number;
}

/** Counts leaf tests from `deno test` pretty output (see the module doc). */
export function countDeno(output: string, code: number): Counts {
  const c: Counts = { passed: 0, failed: 0, skipped: 0, problems: [] };
  let stack: Open[] = [];
  let resultLines = 0;
  const record = (result: string, parent: Open | undefined) => {
    if (result === "ok") c.passed++;
    else if (result === "FAILED") {
      c.failed++;
      for (const o of stack) o.failedLeaves++;
    } else c.skipped++;
    if (parent) parent.children++;
  };
  for (const raw of plain(output).split(/\r?\n/)) {
    if (/^running \d+ tests? from /.test(raw)) {
      stack = [];
      continue;
    }
    const result = raw.match(/^( *)(.*?) \.\.\. (ok|FAILED|ignored)(?: \(.*)?$/);
    if (result) {
      resultLines++;
      const [, spaces, name, outcome] = result as unknown as [string, string, string, string];
      const indent = spaces.length;
      while (stack.length > 0 && stack[stack.length - 1]!.indent > indent) stack.pop();
      let top = stack[stack.length - 1];
      if (top && top.indent === indent && top.name === name) {
        stack.pop();
        const parent = stack[stack.length - 1];
        if (top.children === 0) record(outcome, parent); // a leaf whose output was captured
        else {
          if (parent) parent.children++;
          if (outcome === "FAILED" && top.failedLeaves === 0) {
            c.failed++; // the group itself failed (a hook, or a throwing describe body)
            for (const o of stack) o.failedLeaves++;
          }
        }
      } else {
        while (top && top.indent >= indent) {
          stack.pop();
          top = stack[stack.length - 1];
        }
        record(outcome, top);
      }
      continue;
    }
    const open = raw.match(/^( *)(.*?) \.\.\.$/);
    if (open) {
      const indent = open[1]!.length;
      while (stack.length > 0 && stack[stack.length - 1]!.indent >= indent) stack.pop();
      stack.push({ indent, name: open[2]!, children: 0, failedLeaves: 0 });
    }
  }
  const summary = plain(output).match(
    /^(ok|FAILED) \| (\d+) passed(?: \((\d+) steps?\))? \| (\d+) failed(?: \((\d+) steps?\))?(?: \| (\d+) ignored(?: \((\d+) steps?\))?)?/m,
  );
  if (!summary) {
    c.problems.push(`deno printed no summary (exit code ${code})`);
  } else {
    const total = summary.slice(2).reduce((sum, n) => sum + Number(n ?? 0), 0);
    if (total !== resultLines) {
      console.log(
        `deno: warning: parsed ${resultLines} results but the summary adds up to ${total}`,
      );
    }
    if (code !== 0 && c.failed === 0) {
      c.problems.push(`deno exited with code ${code} but reported no failure`);
    }
  }
  return c;
}

function line(name: string, c: Counts): string {
  const extra = c.problems.length > 0 ? ` (${c.problems.join("; ")})` : "";
  return `${name}: ${c.passed} passed, ${
    c.failed + (c.problems.length > 0 ? 1 : 0)
  } failed, ${c.skipped} skipped${extra}`;
}

async function main(argv: string[]): Promise<number> {
  let runBun = true;
  let runDeno = true;
  let doBuild = true;
  const filters: string[] = [];
  for (const arg of argv) {
    if (arg === "--bun-only") runDeno = false;
    else if (arg === "--deno-only") runBun = false;
    else if (arg === "--no-build") doBuild = false;
    else if (arg.startsWith("-")) {
      console.log(
        `test: unknown flag '${arg}' (expected --bun-only, --deno-only, --no-build or file filters)`,
      );
      return 2;
    } else filters.push(arg.replace(/^\.\//, ""));
  }
  if (!runBun && !runDeno) {
    console.log("test: --bun-only and --deno-only exclude each other");
    return 2;
  }

  const fail = (why: string) => {
    console.log(`test: ${why}`);
    console.log("0 passed, 1 failed");
    return 1;
  };

  if (doBuild) {
    try {
      await build();
    } catch (err) {
      return fail(`build failed: ${err instanceof Error ? err.message : String(err)}`);
    }
  }

  const all = findTestFiles("tests");
  const files = filters.length === 0 ? all : all.filter((f) => filters.some((p) => f.includes(p)));
  if (files.length === 0) {
    return fail(
      filters.length
        ? `no test file matches ${filters.map((f) => `'${f}'`).join(", ")}`
        : "no tests/**/*_test.ts found",
    );
  }
  console.log(`test: ${files.length} file${files.length === 1 ? "" : "s"}`);

  // Colour only when a person watches; logs stay plain.
  const env: Record<string, string> = process.stdout.isTTY
    ? { FORCE_COLOR: "1" }
    : { NO_COLOR: "1" };
  const results: [string, Counts][] = [];
  if (runBun) {
    const { code, output } = await runStreaming(
      runtimeBin("bun"),
      ["test", `--timeout=${BUN_TIMEOUT_MS}`, ...files.map((f) => `./${f}`)],
      env,
    );
    results.push(["bun", countBun(output, code)]);
  }
  if (runDeno) {
    // Type errors are the job of `npm run check`; here both runtimes just run the code.
    // --expose-gc gives tests globalThis.gc, as Bun.gc does under Bun (finalizer tests).
    const { code, output } = await runStreaming(
      runtimeBin("deno"),
      ["test", "-A", "--no-check", "--v8-flags=--expose-gc", ...files],
      env,
    );
    results.push(["deno", countDeno(output, code)]);
  }

  console.log("");
  let passed = 0;
  let failed = 0;
  for (const [name, c] of results) {
    console.log(line(name, c));
    passed += c.passed;
    failed += c.failed + (c.problems.length > 0 ? 1 : 0);
  }
  console.log(`${passed} passed, ${failed} failed`);
  return failed > 0 ? 1 : 0;
}

if (import.meta.main) {
  process.exitCode = await main(process.argv.slice(2));
}
