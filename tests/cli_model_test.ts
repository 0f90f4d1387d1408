/**
 * `kivi generate` and `kivi perplexity` on the CPU build with the real byte-llama-9m: the streamed
 * text and the closing tokens/s line, the protocol's table and JSON, and bad command lines (exit 2).
 */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { join } from "node:path";
import { main } from "../src/cli.ts";
import { parseFormat } from "../src/cli_model.ts";
import { MODEL_DIR, runModelCli } from "./_model.ts";

const TEXT = join(MODEL_DIR, "../../text/heldout.txt");

const run = runModelCli;

/** run() with --backend cpu and --model `model` after the command. */
const onCpu = (cmd: string, model: string, ...rest: string[]) =>
  run(cmd, "--backend", "cpu", "--model", model, ...rest);
const words = (s: string) => s.split(" ");

describe("kivi generate and kivi perplexity", () => {
  it("generate streams the prompt and the greedy continuation, then tokens/s", async () => {
    const r = await onCpu(
      "generate",
      MODEL_DIR,
      "--prompt",
      "The President said that the",
      ...words("--max-tokens 20 --keys 16 --values 16"),
    );
    assert.equal(r.code, 0, r.err);
    assert.equal(r.written, "The President said that the Senate was a major \n");
    assert.match(
      r.out,
      /^20 tokens on cpu \(.*\): prefill \d+\.\d ms, decode \d+\.\d tokens\/s \(batch 1\)$/,
    );
  });

  it("perplexity prints a row per cache against bits 16, or JSON", async () => {
    const r = await onCpu(
      "perplexity",
      MODEL_DIR,
      "--text",
      TEXT,
      ...words(
        "--windows 2 --steps 16 --keys uniform:2:32 --values codebook:2:64 --residual 32 --json",
      ),
    );
    assert.equal(r.code, 0, r.err);
    const j = JSON.parse(r.out);
    assert.equal(j.backend, "cpu");
    assert.deepEqual(
      j.rows.map((x: { cache: string; residual: number }) => [x.cache, x.residual]),
      [["bits 16", 32], ["keys uniform:2:32, values codebook:2:64", 32]],
    );
    assert.equal(j.rows[0].klVsBits16, 0);
    assert.ok(
      j.rows[1].bpb > 1 && j.rows[1].bpb < 3 && j.rows[1].top1VsBits16 > 0.5,
      JSON.stringify(j.rows[1]),
    );
    const t = await onCpu(
      "perplexity",
      MODEL_DIR,
      "--text",
      TEXT,
      ...words("--windows 1 --steps 4 --keys 16 --values uniform:4:32"),
    );
    assert.equal(t.code, 0, t.err);
    assert.match(t.out, /^cache +residual +bits\/value +bits\/byte/);
    assert.match(t.out, /\nbits 16 +128 +16\.000 +\d\.\d{4} /);
    assert.match(t.out, /\nkeys 16, values uniform:4:32 +128 +10\.500 +\d\.\d{4} /);
  });

  it("bad command lines exit 2 naming the problem; a bad model folder exits 1", async () => {
    const cases: [string[], RegExp][] = [
      [["generate", "--prompt", "x"], /generate needs --model/],
      [["perplexity", "--model", "m"], /perplexity needs --text/],
      [
        ["generate", "--model", "m", "--prompt", "x", "--keys", "uniform:3:32"],
        /--keys must be 16 or KIND:BITS:GROUP .*got "uniform:3:32"/,
      ],
      [
        ["generate", "--model", "m", "--prompt", "x", "--max-tokens", "0"],
        /--max-tokens must be an integer >= 1, got "0"/,
      ],
      [
        ["generate", "--model", "m", "--prompt", "x", "--windows", "2"],
        /--windows is not an option of generate/,
      ],
      [
        ["perplexity", "--model", "m", "--text", "t", "--keys", "16"],
        /--keys and --values go together/,
      ],
      [["generate", "--model", "m", "--prompt", "x", "--frob"], /--frob/],
    ];
    for (const [argv, re] of cases) {
      const r = await run(...argv);
      assert.equal(r.code, 2, argv.join(" "));
      assert.match(r.err, re, argv.join(" "));
    }
    const r = await onCpu("generate", "/nonexistent/model", ...words("--prompt x"));
    assert.equal(r.code, 1);
    assert.match(
      r.err,
      /kivi generate: config\.json: missing: \/nonexistent\/model\/config\.json does not exist/,
    );
    assert.deepEqual(parseFormat("values", "codebook:4:128"), {
      kind: "codebook",
      bits: 4,
      group: 128,
    });
  });

  it("the kivi command dispatches to them and lists them in its usage", async () => {
    const out: string[] = [];
    assert.equal(await main(["help"], (s) => out.push(s), () => {}), 0);
    assert.match(
      out.join("\n"),
      /generate --model DIR --prompt TEXT[\s\S]*perplexity --model DIR --text FILE/,
    );
    const err: string[] = [];
    assert.equal(await main(["generate"], () => {}, (s) => err.push(s)), 2);
    assert.match(err.join("\n"), /generate needs --model/);
  });
});
