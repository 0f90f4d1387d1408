/**
 * The CUDA paged cache and fused decode attention against the CPU reference: the same appends on
 * both, then identical pages (uniform and 16-bit bit for bit, codebook within a bound), attention
 * within fp32 accumulation error, flush boundaries, page reuse, all-or-nothing failures, and host
 * arrays taken by append and attend (copied to the device, the result copied back).
 */
import { it } from "node:test";
import assert from "node:assert/strict";
import type { CacheFormat, DeviceTensor } from "../src/mod.ts";
import { KiviError } from "../src/mod.ts";
import { FOUR_PAGES, Rng } from "./_helpers.ts";
import { assertNearGpu, CachePair, cpu, gpuDescribe, type GpuFormat, gpuFormat } from "./_gpu.ts";

function rows(rng: Rng, n: number, kvHeads: number, headDim: number): Float32Array {
  const a = new Float32Array(n * kvHeads * headDim);
  for (let i = 0; i < a.length; i++) a[i] = rng.normal() * (i % headDim === 3 ? 10 : 1);
  return a;
}

/** The same cache on both backends, fed the same tokens. */
class Pair extends CachePair {
  /** Appends to one layer, or (layer -1) to every layer at once. */
  append(i: number, k: Float32Array, v: Float32Array, layer = 0): void {
    const o = layer < 0 ? {} : { layer };
    this.cs[i].append(k, v, o);
    using kt = this.gpu.upload(k), vt = this.gpu.upload(v);
    this.gs[i].append(kt, vt, o);
  }
  async attention(rng: Rng, idx: number[], layer = 0): Promise<[Float32Array, Float32Array]> {
    const c = this.c.config;
    const q = rows(rng, idx.length, c.queryHeads, c.headDim);
    const scale = Math.fround(0.8 / Math.sqrt(c.headDim));
    const want = this.c.attend(layer, idx.map((i) => this.cs[i]), q, { scale }) as Float32Array;
    using qt = this.gpu.upload(q);
    const got = this.g.attend(layer, idx.map((i) => this.gs[i]), qt, { scale }) as DeviceTensor<
      "f32"
    >;
    const g = await got.read();
    got.dispose();
    return [g, want];
  }
  async reads(
    i: number,
    layer = 0,
  ): Promise<[Float32Array, Float32Array, Float32Array, Float32Array]> {
    const w = this.c.read(this.cs[i], layer);
    const r = this.g.read(this.gs[i], layer);
    const gk = await (r.keys as DeviceTensor<"f32">).read(),
      gv = await (r.values as DeviceTensor<"f32">).read();
    (r.keys as DeviceTensor).dispose();
    (r.values as DeviceTensor).dispose();
    return [gk, gv, w.keys as Float32Array, w.values as Float32Array];
  }
}

const U2: CacheFormat = { kind: "uniform", bits: 2, group: 32 };
const FORMATS: GpuFormat[] = [
  gpuFormat("uniform 2/2", U2, U2),
  gpuFormat("uniform 4/4", { kind: "uniform", bits: 4, group: 32 }, {
    kind: "uniform",
    bits: 4,
    group: 64,
  }),
  gpuFormat("uniform K 2 + codebook V 2", U2, { kind: "codebook", bits: 2, group: 64 }),
  gpuFormat("16/16", { bits: 16 }, { bits: 16 }),
  // tensor-core layout with longer key groups and codebook values in groups of 32
  gpuFormat("uniform K 2 G64 + codebook V 2 G32", { kind: "uniform", bits: 2, group: 64 }, {
    kind: "codebook",
    bits: 2,
    group: 32,
  }),
];

gpuDescribe("CUDA paged cache equals the CPU reference", (gpu) => {
  // The 17 sequences x 8 KV heads shape (136 units) is at least one unit an SM on an H100 or H200, so
  // its 2-bit cases run the four-CTA-a-SM tensor-core kernel; the others run the three-CTA one (D 128)
  // or the D 64 one. Ratios 7 (14/2), 16 (32/2) and 32 take one, two and four chunks of 8 query heads a
  // KV head.
  for (const f of FORMATS) {
    for (
      const [pageTokens, kvHeads, queryHeads, headDim] of [
        [32, 2, 2, 64],
        [64, 2, 8, 128],
        [128, 1, 8, 128],
        [64, 4, 16, 64],
        [64, 8, 8, 128],
        [64, 2, 14, 64],
        [64, 2, 32, 64],
        [128, 1, 32, 128],
      ] as const
    ) {
      if (pageTokens % (f.keys.group ?? 32) !== 0) continue;
      it(`${f.name}, page ${pageTokens}, GQA ${queryHeads}/${kvHeads}, D ${headDim}`, async () => {
        const rng = new Rng(`gpu cache ${f.name} ${pageTokens} ${queryHeads}`);
        const p = new Pair(gpu, {
          layers: 2,
          kvHeads,
          queryHeads,
          headDim,
          pageTokens,
          residual: 128,
          maxPages: 600,
          maxSequences: 20,
          keys: f.keys,
          values: f.values,
        });
        try {
          const lengths = [1, 31, 128, 160, 97, 4100, 3, 64, 65, 129, 300, 2, 7, 33, 250, 96, 1000];
          for (const n of lengths) {
            const i = p.add();
            p.append(i, rows(rng, n, kvHeads, headDim), rows(rng, n, kvHeads, headDim));
          }
          // Decode steps across a flush boundary for a few of them.
          for (let step = 0; step < 40; step++) {
            for (const i of [1, 3, 4]) {
              p.append(i, rows(rng, 1, kvHeads, headDim), rows(rng, 1, kvHeads, headDim));
            }
          }
          for (let i = 0; i < p.cs.length; i++) {
            assert.equal(p.gs[i].length(0), p.cs[i].length(0));
            assert.equal(p.gs[i].quantizedLength(0), p.cs[i].quantizedLength(0));
            assert.deepEqual(p.gs[i].pages(), p.cs[i].pages());
          }
          for (const i of [0, 3, 5, 16]) {
            const [gk, gv, wk, wv] = await p.reads(i);
            if (f.exact) {
              assert.deepEqual(gk, wk, `keys of seq ${i} ${rng.tag}`);
              assert.deepEqual(gv, wv, `values of seq ${i} ${rng.tag}`);
            } else {
              assert.deepEqual(gk, wk, `uniform keys of seq ${i} ${rng.tag}`);
              let differ = 0;
              for (let j = 0; j < wv.length; j++) {
                if (Math.abs(gv[j] - wv[j]) > 2e-3 * (Math.abs(wv[j]) + 1)) differ++;
              }
              assert.ok(differ <= wv.length * 2e-3, `${differ} codebook values differ ${rng.tag}`);
            }
          }
          for (const idx of [[5], [0, 3, 16], [...Array(17).keys()]]) {
            const [g, w] = await p.attention(rng, idx);
            assertNearGpu(g, w, `batch ${idx.length} ${rng.tag}`);
          }
        } finally {
          p.dispose();
        }
      });
    }
  }

  it("per-layer formats: each layer's pages and attention in its own format, appended to all layers at once and per layer, as on the CPU", async () => {
    const rng = new Rng("gpu cache per layer");
    const layers: { keys: CacheFormat; values: CacheFormat; exact: boolean }[] = [
      { keys: U2, values: U2, exact: true }, // tensor-core layout
      { keys: { kind: "uniform", bits: 4, group: 32 }, values: U2, exact: true }, // SIMT kernel
      { keys: U2, values: { kind: "codebook", bits: 2, group: 64 }, exact: false },
      { keys: { bits: 16 }, values: { kind: "uniform", bits: 4, group: 64 }, exact: true },
      { keys: U2, values: { bits: 16 }, exact: true },
    ];
    const L = layers.length, kvHeads = 2, headDim = 64;
    const p = new Pair(gpu, {
      layers: L,
      kvHeads,
      queryHeads: 8,
      headDim,
      pageTokens: 64,
      residual: 32,
      maxPages: 200,
      maxSequences: 8,
      keys: U2,
      values: U2,
      perLayer: layers.map(({ keys, values }, layer) => ({ layer, keys, values })),
    });
    try {
      for (const n of [1, 97, 300, 1030]) {
        const i = p.add();
        p.append(i, rows(rng, n * L, kvHeads, headDim), rows(rng, n * L, kvHeads, headDim), -1);
      }
      for (let step = 0; step < 40; step++) { // decode steps one layer at a time, across flushes
        for (let l = 0; l < L; l++) {
          p.append(1, rows(rng, 1, kvHeads, headDim), rows(rng, 1, kvHeads, headDim), l);
        }
      }
      for (let l = 0; l < L; l++) {
        for (const i of [0, 1, 2, 3]) {
          assert.equal(p.gs[i].quantizedLength(l), p.cs[i].quantizedLength(l));
          const [gk, gv, wk, wv] = await p.reads(i, l);
          assert.deepEqual(gk, wk, `keys of seq ${i} layer ${l} ${rng.tag}`);
          if (layers[l].exact) assert.deepEqual(gv, wv, `values of seq ${i} layer ${l} ${rng.tag}`);
          else {
            let differ = 0;
            for (let j = 0; j < wv.length; j++) {
              if (Math.abs(gv[j] - wv[j]) > 2e-3 * (Math.abs(wv[j]) + 1)) differ++;
            }
            assert.ok(differ <= wv.length * 2e-3, `${differ} codebook values differ ${rng.tag}`);
          }
        }
        const [g, w] = await p.attention(rng, [0, 1, 2, 3], l);
        assertNearGpu(g, w, `layer ${l} ${rng.tag}`);
      }
      assert.deepEqual(p.g.memory(), p.c.memory());
    } finally {
      p.dispose();
    }
  });

  it("freed pages are reused with nothing of the old sequence visible", async () => {
    const rng = new Rng("gpu reuse");
    const p = new Pair(gpu, {
      layers: 1,
      kvHeads: 2,
      headDim: 64,
      residual: 32,
      maxPages: 8,
      maxSequences: 4,
    });
    try {
      const a = p.add();
      p.append(a, rows(rng, 400, 2, 64), rows(rng, 400, 2, 64));
      p.cs[a].free();
      p.gs[a].free();
      const b = p.add();
      p.append(b, rows(rng, 300, 2, 64), rows(rng, 300, 2, 64));
      assert.deepEqual(p.gs[b].pages(), p.cs[b].pages());
      const [gk, gv, wk, wv] = await p.reads(b);
      assert.deepEqual(gk, wk);
      assert.deepEqual(gv.length, wv.length);
      const [g, w] = await p.attention(rng, [b]);
      assertNearGpu(g, w, rng.tag);
    } finally {
      p.dispose();
    }
  });

  it("host arrays: append and attend copy them to the device and give the tensor path's results", async () => {
    const rng = new Rng("gpu host arrays");
    const opts = {
      layers: 2,
      kvHeads: 2,
      queryHeads: 8,
      headDim: 128,
      residual: 64,
      maxPages: 64,
    } as const;
    using viaHost = gpu.createCache(opts);
    using viaTensors = gpu.createCache(opts);
    using ref = cpu.createCache(opts);
    const h = viaHost.createSequence(), t = viaTensors.createSequence(), c = ref.createSequence();
    const live = gpu.liveTensors;
    for (const n of [300, 1, 70]) {
      const k = rows(rng, 2 * n, 2, 128), v = rows(rng, 2 * n, 2, 128); // both layers
      h.append(k, v);
      using kt = gpu.upload(k), vt = gpu.upload(v);
      t.append(kt, vt);
      c.append(k, v);
    }
    const q = rows(rng, 1, 8, 128);
    for (const layer of [0, 1]) {
      const got = viaHost.attend(layer, [h], q);
      assert.ok(got instanceof Float32Array, "a host q gives a host result");
      using qt = gpu.upload(q);
      const fromTensors = viaTensors.attend(layer, [t], qt) as DeviceTensor<"f32">;
      assert.deepEqual(
        got,
        await fromTensors.read(),
        `layer ${layer}: same kernels, same bits ${rng.tag}`,
      );
      fromTensors.dispose();
      assertNearGpu(
        got,
        ref.attend(layer, [c], q) as Float32Array,
        `layer ${layer} vs CPU ${rng.tag}`,
      );
      const out = new Float16Array(8 * 128).fill(7);
      viaHost.attend(layer, [h], Float16Array.from(q), { dtype: "f16", out });
      assert.ok(out.some((x) => x !== 7), "attend wrote into the host out array");
    }
    const big = rows(rng, 3, 2, 128);
    big[5] = 1e6;
    assert.throws(
      () => h.append(big, big, { layer: 0 }),
      RangeError,
      "host arrays get the fp16 range check before the call",
    );
    assert.equal(gpu.liveTensors, live, "staging tensors freed");
  });

  it("a full pool and a NaN leave every sequence unchanged", async () => {
    const rng = new Rng("gpu all or nothing");
    using cache = gpu.createCache(FOUR_PAGES);
    const s = cache.createSequence();
    using k0 = gpu.upload(rows(rng, 100, 2, 64));
    s.append(k0, k0, { layer: 0 });
    using q = gpu.upload(rows(rng, 1, 2, 64));
    const before = await (cache.attend(0, [s], q) as DeviceTensor<"f32">).read();
    const mem = cache.memory();
    using big = gpu.upload(rows(rng, 300, 2, 64));
    assert.throws(
      () => s.append(big, big, { layer: 0 }),
      (e) => e instanceof KiviError && e.code === "KIVI_ERR_CAPACITY",
    );
    const nan = rows(rng, 10, 2, 64);
    nan[17] = NaN;
    using bad = gpu.upload(nan);
    assert.throws(
      () => s.append(bad, bad, { layer: 0 }),
      (e) => e instanceof KiviError && e.code === "KIVI_ERR_NONFINITE",
    );
    assert.deepEqual(await (cache.attend(0, [s], q) as DeviceTensor<"f32">).read(), before);
    assert.deepEqual(cache.memory(), mem);
  });
});
