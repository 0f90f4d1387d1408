/**
 * Bad checkpoints and bad runs of the model runner: each a clear error naming the file or tensor and
 * the expected value, with nothing loaded (no tensor left on the backend) and the backend usable.
 * Corrupted checkpoints are copies of byte-llama-9m made in a temporary folder.
 */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { closeSync, openSync, readFileSync, rmSync, statSync, truncateSync } from "node:fs";
import { unlinkSync, writeSync } from "node:fs";
import { join } from "node:path";
import { ModelError, openBackend } from "../src/mod.ts";
import { convert, copyModel, editConfig, MODEL_DIR, rawTensors, SHARD2 } from "./_model.ts";
import { singleFile } from "./_model.ts";

const kivi = await openBackend({ prefer: "cpu" });

/** Loading `dir` throws a ModelError matching `re` (and naming `file` and `tensor` where given);
 * nothing is left on the backend, which still loads the real model. */
function refused(dir: string, re: RegExp, where: { file?: string; tensor?: string } = {}): void {
  const before = kivi.liveTensors;
  try {
    assert.throws(() => kivi.loadModel(dir), (e: unknown) => {
      assert.ok(e instanceof ModelError, `${e}`);
      assert.match(e.message, re);
      if (where.file) assert.ok(e.file.endsWith(where.file), `file ${e.file}`);
      if (where.tensor) assert.equal(e.tensor, where.tensor);
      return true;
    });
    assert.equal(kivi.liveTensors, before, "a failed load left tensors behind");
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/** Overwrites bytes of a file at `offset`. */
function patch(file: string, offset: number, bytes: Uint8Array): void {
  const fd = openSync(file, "r+");
  writeSync(fd, bytes, 0, bytes.length, offset);
  closeSync(fd);
}

describe("model: bad checkpoints", () => {
  it("a missing shard names the file and the tensor the index puts there", () => {
    const dir = copyModel();
    unlinkSync(join(dir, SHARD2));
    refused(
      dir,
      /model-00002-of-00002\.safetensors: missing shard: cannot open \/.*\/model-00002-of-00002\.safetensors \(ENOENT\); model\.safetensors\.index\.json puts tensor model\.layers\.3\.input_layernorm\.weight there/,
      { file: SHARD2 },
    );
  });

  it("a truncated shard names the tensor that runs past the end and the file's size", () => {
    const dir = copyModel();
    const f = join(dir, SHARD2);
    truncateSync(f, statSync(f).size - 1000);
    refused(
      dir,
      /model-00002-of-00002\.safetensors: tensor [\w.]+ runs past the end of the file: it needs bytes \d+\.\.\d+, the file holds \d+ \(truncated\?\)/,
      { file: SHARD2 },
    );
  });

  it("a safetensors header pointing past the file's end", () => {
    const dir = copyModel();
    const len = new Uint8Array(8);
    new DataView(len.buffer).setBigUint64(0, 1n << 40n, true);
    patch(join(dir, SHARD2), 0, len);
    refused(
      dir,
      /model-00002-of-00002\.safetensors: the header claims 1099511627776 bytes, past the end of the file \(7085616 bytes, so at most 7085608\)/,
    );
  });

  it("an unknown dtype names the tensor and the dtypes kivi reads", () => {
    const dir = copyModel();
    const f = join(dir, SHARD2);
    const head = readFileSync(f).subarray(0, 4096);
    const at = Buffer.from(head).indexOf('"F16"');
    patch(f, at, new TextEncoder().encode('"I64"'));
    refused(
      dir,
      /model-00002-of-00002\.safetensors: tensor [\w.]+ has dtype "I64"; expected F16, BF16 or F32/,
    );
  });

  it("an unsupported architecture (GPT2LMHeadModel)", () => {
    const dir = copyModel();
    editConfig(dir, (c) => {
      c.architectures = ["GPT2LMHeadModel"];
      c.model_type = "gpt2";
    });
    refused(
      dir,
      /config\.json: unsupported architecture "GPT2LMHeadModel"; kivi runs LlamaForCausalLM and MistralForCausalLM/,
      { file: "config.json" },
    );
  });

  it("tensor shapes that contradict config.json name the tensor, its shape and the expected one", () => {
    const dir = copyModel();
    editConfig(dir, (c) => c.intermediate_size = 1000);
    refused(
      dir,
      /model-00001-of-00002\.safetensors: tensor model\.layers\.0\.mlp\.gate_proj\.weight has shape \[1024, 384\]; config\.json \(.*intermediate_size 1000.*\) implies \[1000, 384\]/,
      { tensor: "model.layers.0.mlp.gate_proj.weight" },
    );
    const dir2 = copyModel();
    editConfig(dir2, (c) => c.num_key_value_heads = 3);
    refused(
      dir2,
      /tensor model\.layers\.0\.self_attn\.k_proj\.weight has shape \[128, 384\]; .* implies \[192, 384\]/,
    );
  });

  it("a missing tensor, and a weight fp16 cannot hold, found mid-load, leave nothing loaded", () => {
    const raw = rawTensors();
    refused(
      singleFile(raw.filter((t) => t.name !== "model.norm.weight")),
      /missing tensor model\.norm\.weight \(shape \[384\]\)/,
      { tensor: "model.norm.weight" },
    );
    const big = raw.map((t) => convert(t, "F32"));
    const norm = big.find((t) => t.name === "model.norm.weight")!;
    new Float32Array(norm.data.buffer)[5] = 1e6;
    refused(
      singleFile(big),
      /model\.safetensors: tensor model\.norm\.weight holds 1000000 at index 5, which fp16 cannot hold/,
      { tensor: "model.norm.weight" },
    );
  });
});

describe("model: bad runs", () => {
  const model = kivi.loadModel(MODEL_DIR);

  it("a prompt longer than the context", async () => {
    const before = kivi.liveTensors;
    await assert.rejects(
      async () => {
        for await (const _ of model.generate("x".repeat(2049), { maxTokens: 1 })) void _;
      },
      /RangeError: the prompt holds 2049 tokens, longer than the model's context of 2048 \(max_position_embeddings\)/,
    );
    await assert.rejects(
      async () => {
        for await (const _ of model.generate("x".repeat(2000), { maxTokens: 100 })) void _;
      },
      /the prompt \(2000 tokens\) plus maxTokens \(100\) must fit the model's context of 2048; ask for at most 48 tokens/,
    );
    assert.equal(kivi.liveTensors, before);
  });

  it("a generation that would outgrow the page pool", async () => {
    const before = kivi.liveTensors;
    await assert.rejects(
      async () => {
        for await (
          const _ of model.generate("x".repeat(100), { maxTokens: 100, cache: { maxPages: 2 } })
        ) void _;
      },
      /RangeError: cache\.maxPages must hold the run: 1 sequence\(s\) of up to 200 tokens need 4 pages of 64 tokens, got 2/,
    );
    assert.equal(kivi.liveTensors, before);
    // a generation stopped early frees its cache and buffers
    for await (const _ of model.generate("Call me", { maxTokens: 50 })) break;
    assert.equal(kivi.liveTensors, before);
  });

  it("bad generation options", async () => {
    for (
      const [opts, re] of [
        [{ maxTokens: 0 }, /maxTokens must be a positive integer, got 0/],
        [{ temperature: -1 }, /temperature must be a finite number >= 0, got -1/],
        [{ topK: 1.5 }, /topK must be an integer >= 0, got 1.5/],
      ] as const
    ) {
      await assert.rejects(async () => {
        for await (const _ of model.generate("a", opts)) void _;
      }, re);
    }
    await assert.rejects(async () => {
      for await (const _ of model.generate("", {})) void _;
    }, /the prompt must hold at least one token, got 0/);
  });

  it("a disposed model", async () => {
    model.dispose();
    await assert.rejects(async () => {
      for await (const _ of model.generate("a")) void _;
    }, /generate: the model was disposed; load it again/);
    kivi.dispose();
  });
});
