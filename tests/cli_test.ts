/**
 * The command line on the CPU: output and exit codes of every command, bad flags included.
 */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import process from "node:process";
import { fileURLToPath } from "node:url";
import { main, parseCli, UsageError } from "../src/cli.ts";
import { ABI_VERSION } from "../src/mod.ts";

async function run(...argv: string[]): Promise<{ code: number; out: string; err: string }> {
  const out: string[] = [], err: string[] = [];
  const code = await main(argv, (s) => out.push(s), (s) => err.push(s));
  return { code, out: out.join("\n"), err: err.join("\n") };
}

describe("kivi CLI", () => {
  it("prints usage for help, --help and no command, exit 0", async () => {
    for (const argv of [["help"], ["--help"], [], ["info", "--help"]]) {
      const r = await run(...argv);
      assert.equal(r.code, 0, argv.join(" "));
      assert.match(r.out, /usage: kivi <command>/);
    }
  });

  it("rejects bad command lines with exit 2 and a message naming the problem", async () => {
    const cases: [string[], RegExp][] = [
      [["frobnicate"], /unknown command "frobnicate"/],
      [["info", "--fast"], /unknown option "--fast" for info/],
      [["info", "--backend", "gpu"], /--backend must be auto, cpu or cuda, got "gpu"/],
      [["info", "--backend"], /option --backend needs a value/],
      [["accuracy", "--tokens", "-5"], /--tokens must be a positive integer, got "-5"/],
      [["accuracy", "--tokens", "1.5"], /--tokens must be a positive integer/],
      [["info", "extra"], /unexpected argument "extra"/],
    ];
    for (const [argv, re] of cases) {
      const r = await run(...argv);
      assert.equal(r.code, 2, argv.join(" "));
      assert.match(r.err, re, argv.join(" "));
      assert.match(r.err, /usage:/);
    }
    assert.throws(() => parseCli(["bench", "--nope"]), UsageError);
  });

  it("passes unknown options of demo through to the demo", () => {
    const p = parseCli(["demo", "--layers", "2", "--backend", "cpu", "--steps", "3"]);
    assert.deepEqual(p.rest, ["--layers", "2", "--steps", "3"]);
    assert.equal(p.flags.get("backend"), "cpu");
  });

  it("info --json reports backend, reason, device, library, ABI and copy bandwidth", async () => {
    const r = await run("info", "--backend", "cpu", "--json");
    assert.equal(r.code, 0, r.err);
    const j = JSON.parse(r.out);
    assert.equal(j.backend, "cpu");
    assert.match(j.reason, /CPU/);
    assert.match(j.library, /libkivi_cpu\.so$/);
    assert.equal(j.abiVersion, ABI_VERSION);
    assert.ok(j.copyGBps > 0 && j.memoryTotalBytes > 0);
    const text = await run("info", "--backend", "cpu");
    assert.match(text.out, /^backend: +cpu/m);
    assert.match(text.out, /^copy: +[\d.]+ GB\/s/m);
  });

  it("accuracy --json covers every format, bit width and group size, K and V", async () => {
    const r = await run("accuracy", "--backend", "cpu", "--tokens", "256", "--json");
    assert.equal(r.code, 0, r.err);
    const j = JSON.parse(r.out);
    const rows: {
      case: string;
      quantized: string;
      format: string;
      "bits/value": number;
      "attention rel. error": number;
    }[] = j.rows;
    assert.equal(rows.length, 2 * (12 * 2 + 2));
    for (const row of rows) {
      assert.ok(
        row["attention rel. error"] > 0 && Number.isFinite(row["attention rel. error"]),
        JSON.stringify(row),
      );
    }
    const bits = (f: string) => rows.find((x) => x.format === f)!["bits/value"];
    assert.equal(bits("uniform 2-bit G32"), 3);
    assert.equal(bits("codebook 2-bit G64"), 3);
    assert.equal(bits("codebook 2-bit G32"), 4);
    assert.equal(bits("uniform 4-bit G128"), 4.25);
    // More bits never hurt: 4-bit error below 2-bit error for the same format and group.
    for (const c of ["llama-like", "gaussian"]) {
      for (const q of ["keys", "values"]) {
        const err = (f: string) =>
          rows.find((x) =>
            x.case === c && x.quantized === q && x.format === f
          )!["attention rel. error"];
        assert.ok(err("uniform 4-bit G32") < err("uniform 2-bit G32"), `${c} ${q}`);
      }
    }
  });

  it("demo --json prints one JSON object with the three caches; human text goes to stderr", () => {
    const cli = fileURLToPath(new URL("../src/cli.ts", import.meta.url));
    const isDeno = (globalThis as { Deno?: unknown }).Deno !== undefined;
    const args = [
      "demo",
      "--backend",
      "cpu",
      "--json",
      "--layers",
      "2",
      "--steps",
      "3",
      "--prompt",
      "200",
    ];
    const r = isDeno
      ? spawnSync(process.execPath, ["run", "-A", cli, ...args])
      : spawnSync(process.execPath, [cli, ...args]);
    assert.equal(r.status, 0, String(r.stderr));
    const j = JSON.parse(String(r.stdout));
    assert.deepEqual(j.model, {
      layers: 2,
      heads: 16,
      kvHeads: 4,
      headDim: 128,
      prompt: 200,
      steps: 3,
      seed: 42,
    });
    assert.deepEqual(j.rows.map((x: { cache: string }) => x.cache), [
      "bits 16 (fp16 baseline)",
      "uniform 2-bit (KIVI)",
      "codebook 2-bit (kivi default)",
    ]);
    const [fp16, uni, cb] = j.rows;
    assert.equal(fp16.attentionError, null);
    assert.ok(uni.kvBytes < fp16.kvBytes && cb.kvBytes === uni.kvBytes, "2-bit caches are smaller");
    assert.ok(uni.attentionError > 0 && cb.attentionError > 0);
    assert.match(String(r.stderr), /kivi demo on/);
  });

  it("runs as a script: `src/cli.ts --help` exits 0, a bad flag exits 2", () => {
    const cli = fileURLToPath(new URL("../src/cli.ts", import.meta.url));
    const isDeno = (globalThis as { Deno?: unknown }).Deno !== undefined;
    const cmd = (args: string[]) =>
      isDeno
        ? spawnSync(process.execPath, ["run", "-A", cli, ...args])
        : spawnSync(process.execPath, [cli, ...args]);
    const ok = cmd(["--help"]);
    assert.equal(ok.status, 0, String(ok.stderr));
    assert.match(String(ok.stdout), /usage: kivi/);
    const bad = cmd(["info", "--backend", "tpu"]);
    assert.equal(bad.status, 2);
    assert.match(String(bad.stderr), /--backend must be auto, cpu or cuda/);
  });
});
