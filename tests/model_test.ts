/**
 * The model runner on the CPU build with the real byte-llama-9m: the shortened perplexity protocol
 * against the teacher-forced forward (an independent path: exact attention over whole windows, no
 * cache), the model card's greedy continuation, seeded sampling, every checkpoint layout the loader
 * reads (single file or shards; fp16, bf16, f32; tied or separate output; rope_theta where it lives;
 * Mistral), and no leak across loads.
 */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { rmSync } from "node:fs";
import { type GenerateOptions, type LlamaModel, openBackend } from "../src/mod.ts";
import { perplexity, teacherForcedBpb } from "../src/model/perplexity.ts";
import { convert, HELDOUT, MODEL_DIR, rawTensors, singleFile } from "./_model.ts";

const kivi = await openBackend({ prefer: "cpu" });
const model = kivi.loadModel(MODEL_DIR);
const SHORT = { windows: 2, steps: 128 };
const BITS16 = { keys: { bits: 16 }, values: { bits: 16 } } as const;

async function generated(
  m: LlamaModel,
  prompt: string,
  opts: GenerateOptions,
): Promise<{ tokens: number[]; text: string }> {
  const tokens: number[] = [];
  let text = "";
  for await (const t of m.generate(prompt, opts)) {
    tokens.push(t.token);
    text += t.text;
  }
  return { tokens, text };
}

describe("model: byte-llama-9m on the CPU build", () => {
  it("reads the config and holds the weights in fp16", () => {
    const c = model.config;
    assert.deepEqual([
      c.layers,
      c.hidden,
      c.heads,
      c.kvHeads,
      c.headDim,
      c.intermediate,
      c.vocab,
      c.context,
    ], [6, 384, 6, 2, 64, 1024, 256, 2048]);
    assert.equal(c.ropeTheta, 10000);
    assert.equal(c.tied, true);
    assert.equal(model.weightBytes, 19080960 + 2048 * 64 * 4); // the card's total_size, plus the RoPE table
  });

  let tf = 0, b16 = 0;
  it("the shortened protocol at bits 16 equals the teacher-forced forward within 1e-3 bits per byte", () => {
    tf = teacherForcedBpb(model, HELDOUT, SHORT);
    const r = model.perplexity(HELDOUT, { ...SHORT, cache: BITS16 });
    b16 = r.bpb;
    assert.equal(r.windows, 2);
    assert.equal(r.steps, 128);
    assert.ok(Math.abs(b16 - tf) < 1e-3, `bits 16 ${b16} vs teacher-forced ${tf}`);
    assert.ok(b16 > 1.5 && b16 < 2.5, `${b16} bits per byte is far from the card's 1.82`);
  });

  it("2-bit caches stay close to bits 16 (KL and top-1 of each step against the bits-16 run)", () => {
    const ref = perplexity(model, HELDOUT, { ...SHORT, cache: BITS16, keep: true });
    assert.equal(ref.distributions!.length, 128 * 2 * 256);
    const r = perplexity(model, HELDOUT, {
      ...SHORT,
      reference: ref.distributions,
      cache: { residual: 32 },
    });
    assert.ok(r.klVsReference! > 0 && r.klVsReference! < 0.05, `KL ${r.klVsReference}`);
    assert.ok(r.top1VsReference! > 0.85, `top-1 ${r.top1VsReference}`);
    assert.ok(Math.abs(r.bpb - ref.bpb) < 0.05, `${r.bpb} vs ${ref.bpb}`);
    const self = perplexity(model, HELDOUT, {
      windows: 2,
      steps: 16,
      reference: ref.distributions!.subarray(0, 16 * 2 * 256),
      cache: BITS16,
    });
    assert.equal(self.top1VsReference, 1);
    assert.ok(
      Math.abs(self.klVsReference!) < 1e-9,
      `bits 16 against itself: KL ${self.klVsReference}`,
    );
  });

  it("greedy decoding gives the model card's continuation", async () => {
    const { text } = await generated(model, "The President said that the", {
      maxTokens: 60,
      cache: BITS16,
    });
    assert.equal(text, " Senate was a major program of the United States in the past");
  });

  it("seeded generation is deterministic, and the seed matters", async () => {
    const opts = { maxTokens: 40, temperature: 0.9, topK: 20, seed: 1234 };
    const a = await generated(model, "Call me Ishmael.", opts);
    const b = await generated(model, "Call me Ishmael.", opts);
    assert.deepEqual(a.tokens, b.tokens, "seed 1234");
    const c = await generated(model, "Call me Ishmael.", { ...opts, seed: 99 });
    assert.notDeepEqual(a.tokens, c.tokens, "seeds 1234 and 99 gave the same 40 tokens");
    assert.equal(a.tokens.length, 40);
  });

  it("loads single-file f32 and bf16 checkpoints, separate output weights, top-level rope_theta and Mistral", () => {
    const seq = [HELDOUT.subarray(1000, 1100)].map((b) => Int32Array.from(b));
    const want = model.teacherForced(seq);
    const raw = rawTensors();
    const embed = raw.find((t) => t.name === "model.embed_tokens.weight")!;
    const cases: [
      string,
      ReturnType<typeof rawTensors>,
      (c: Record<string, unknown>) => void,
      number,
    ][] = [
      ["f32, single file", raw.map((t) => convert(t, "F32")), () => {}, 0],
      ["separate lm_head, rope_theta at the top level", [...raw, {
        ...embed,
        name: "lm_head.weight",
      }], (c) => {
        c.tie_word_embeddings = false;
        c.rope_theta = 10000;
        delete c.rope_parameters;
      }, 0],
      ["Mistral", raw, (c) => {
        c.architectures = ["MistralForCausalLM"];
        c.model_type = "mistral";
        c.sliding_window = null;
      }, 0],
      ["bf16", raw.map((t) => convert(t, "BF16")), () => {}, 0.5],
    ];
    for (const [name, tensors, edit, tol] of cases) {
      const dir = singleFile(tensors, edit);
      try {
        using m = kivi.loadModel(dir);
        const got = m.teacherForced(seq);
        let worst = 0;
        for (let i = 0; i < got.length; i++) worst = Math.max(worst, Math.abs(got[i] - want[i]));
        if (tol === 0) {
          assert.equal(
            worst,
            0,
            `${name}: the same fp16 weights must give the same log-probabilities`,
          );
        } else {assert.ok(
            worst > 0 && worst < tol,
            `${name}: bf16 rounding of the weights moved a log-probability by ${worst}`,
          );}
      } finally {
        rmSync(dir, { recursive: true, force: true });
      }
    }
  });

  it("loading and disposing leaves no tensor behind", () => {
    const before = kivi.liveTensors;
    for (let i = 0; i < 3; i++) {
      const m = kivi.loadModel(MODEL_DIR);
      assert.equal(kivi.liveTensors, before + 6 * 9 + 3);
      m.dispose();
      m.dispose();
      assert.equal(kivi.liveTensors, before);
    }
    model.dispose();
    assert.equal(kivi.liveTensors, 0);
    kivi.dispose();
  });
});
