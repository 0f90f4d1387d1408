/**
 * Several query tokens a sequence on CUDA against the CPU reference: the same appends, truncates and
 * forks on both builds give the same sequences (read() bit for bit for uniform and 16-bit formats),
 * multi-token attention with ragged qlens (1, 2, 7, 16, 513; a sequence whose every token is a query)
 * and its log-sum-exp within 2e-3 of the output's scale (see cache_gpu_test.ts for the bound), forks of
 * forks, truncate to 0 and to the window's edge, the merge and a chunked prefill. On a machine
 * without a device the suite shows one skipped test, "skipped: no CUDA device".
 */
import { it } from "node:test";
import assert from "node:assert/strict";
import type { CacheFormat, CacheOptions, DeviceTensor } from "../src/mod.ts";
import { KiviError } from "../src/mod.ts";
import { kvRows, Rng } from "./_helpers.ts";
import { assertNearGpu, CachePair, gpuDescribe, type GpuFormat, gpuFormat } from "./_gpu.ts";
import { maxDiff } from "./_multitoken.ts";

/** The same cache on both builds, driven by the same calls. */
class Twin extends CachePair {
  fork(i: number): number {
    this.cs.push(this.cs[i].fork());
    this.gs.push(this.gs[i].fork());
    return this.cs.length - 1;
  }
  truncate(i: number, n: number): void {
    this.cs[i].truncate(n);
    this.gs[i].truncate(n);
  }
  append(i: number, rng: Rng, n: number): void {
    const c = this.c.config, L = c.layers;
    const k = kvRows(rng, n, c.kvHeads, c.headDim, L), v = kvRows(rng, n, c.kvHeads, c.headDim, L);
    this.cs[i].append(k, v);
    using kt = this.gpu.upload(k), vt = this.gpu.upload(v);
    this.gs[i].append(kt, vt);
  }
  /** Lengths, pages and read() of sequence i in every layer: identical on both (codebook within 2e-3). */
  same(i: number, exact: boolean, msg: string): void {
    const L = this.c.config.layers;
    assert.deepEqual([...this.gs[i].pages()].length, [...this.cs[i].pages()].length, msg);
    for (let l = 0; l < L; l++) {
      assert.equal(this.gs[i].length(l), this.cs[i].length(l), msg);
      assert.equal(this.gs[i].quantizedLength(l), this.cs[i].quantizedLength(l), msg);
      const w = this.c.read(this.cs[i], l), r = this.g.read(this.gs[i], l);
      if (this.cs[i].length(l) === 0) continue;
      const host = (x: unknown) => {
        if (x instanceof Float32Array) return x; // the CPU build's read
        const h = (x as DeviceTensor<"f32">).readSync();
        (x as DeviceTensor).dispose();
        return h;
      };
      const gk = host(r.keys), gv = host(r.values);
      if (exact) {
        assert.deepEqual(gk, w.keys, `${msg}: keys of layer ${l}`);
        assert.deepEqual(gv, w.values, `${msg}: values of layer ${l}`);
      } else {
        assertNearGpu(gk, w.keys as Float32Array, `${msg}: keys of layer ${l}`);
        assertNearGpu(gv, w.values as Float32Array, `${msg}: values of layer ${l}`);
      }
    }
  }
  /** attendMulti on both: outputs and log-sum-exps. */
  multi(rng: Rng, layer: number, idx: number[], qlens: number[], msg: string): void {
    const c = this.c.config;
    const tokens = qlens.reduce((a, b) => a + b);
    const q = kvRows(rng, tokens, c.queryHeads, c.headDim);
    const scale = Math.fround(0.8 / Math.sqrt(c.headDim));
    const lse = new Float32Array(tokens * c.queryHeads);
    const want = this.c.attendMulti(layer, idx.map((i) => this.cs[i]), qlens, q, {
      scale,
      lse,
    }) as Float32Array;
    using qt = this.gpu.upload(q), lt = this.gpu.alloc([tokens * c.queryHeads], "f32");
    const got = this.g.attendMulti(layer, idx.map((i) => this.gs[i]), qlens, qt, {
      scale,
      lse: lt,
    }) as DeviceTensor<
      "f32"
    >;
    assertNearGpu(got.readSync(), want, `${msg}: outputs`);
    got.dispose();
    // the lse is a log: its error is the relative error of the softmax sum, about 2e-3 at most
    const gl = lt.readSync();
    assert.ok(
      maxDiff(gl, lse) <= 2e-3 * (1 + Math.max(...lse.map(Math.abs))),
      `${msg}: lse ${maxDiff(gl, lse)}`,
    );
    // host arrays through the CUDA build: staged, the same result
    const hl = new Float32Array(tokens * c.queryHeads);
    const host = this.g.attendMulti(layer, idx.map((i) => this.gs[i]), qlens, q, {
      scale,
      lse: hl,
    }) as Float32Array;
    assertNearGpu(host, want, `${msg}: host q`);
  }
}

const U2: CacheFormat = { kind: "uniform", bits: 2, group: 32 };

/** Options of the twins' caches: `o` over one layer, GQA 8 / 2, D 128, pages of 64 tokens, a window
 * of 64, 64 pages and uniform 2-bit G32 keys and values. */
function twinOptions(o: Partial<CacheOptions>): CacheOptions {
  return {
    layers: 1,
    kvHeads: 2,
    queryHeads: 8,
    headDim: 128,
    pageTokens: 64,
    residual: 64,
    maxPages: 64,
    keys: U2,
    values: U2,
    ...o,
  };
}

const FORMATS: GpuFormat[] = [
  // the tensor-core layout: prefixes ending inside a 32-token page tile take the reference kernel
  gpuFormat("uniform K 2 + codebook V 2 (tensor cores)", U2, {
    kind: "codebook",
    bits: 2,
    group: 32,
  }),
  gpuFormat("uniform 2/2 G64 (tensor cores)", { kind: "uniform", bits: 2, group: 64 }, {
    kind: "uniform",
    bits: 2,
    group: 64,
  }),
  gpuFormat("uniform 4/4 (CUDA cores)", { kind: "uniform", bits: 4, group: 32 }, {
    kind: "uniform",
    bits: 4,
    group: 64,
  }),
  gpuFormat("16/16 (CUDA cores)", { bits: 16 }, { bits: 16 }),
];

gpuDescribe("CUDA multi-token attention, truncate and fork equal the CPU reference", (gpu) => {
  for (const f of FORMATS) {
    for (const headDim of [64, 128] as const) {
      it(`${f.name}, D ${headDim}: ragged qlen 1, 2, 7, 16, 513 with the log-sum-exp`, () => {
        const rng = new Rng(`multi gpu ${f.name} ${headDim}`);
        using t = new Twin(
          gpu,
          twinOptions({
            layers: 2,
            headDim,
            pageTokens: 128,
            maxPages: 96,
            maxSequences: 8,
            keys: f.keys,
            values: f.values,
          }),
        );
        const lens = [5, 40, 7, 300, 700];
        for (const [i, n] of lens.entries()) {
          t.add();
          for (let a = 0; a < n; a += 97) t.append(i, rng, Math.min(97, n - a));
        }
        t.multi(rng, 1, [0, 1, 2, 3, 4], [1, 2, 7, 16, 513], `${f.name} D ${headDim} ${rng.tag}`);
        // every query's own token in the window: the rows differ in window tiles only
        t.multi(
          rng,
          1,
          [0, 1, 2, 3, 4],
          [1, 2, 5, 7, 16],
          `${f.name} D ${headDim} in the window ${rng.tag}`,
        );
        t.multi(
          rng,
          0,
          [4, 3, 4],
          [16, 8, 3],
          `${f.name} D ${headDim} in the window, repeats ${rng.tag}`,
        );
        t.multi(rng, 0, [3, 3, 4], [1, 33, 700], `${f.name} D ${headDim} repeats ${rng.tag}`);
        // every sequence with the same qlen: q and out in the caller's order, no gather (2, 5, 40
        // queries: 8, 20 and 160 rows a KV head)
        for (const [idx, ql] of [[[0, 2], 2], [[1, 3, 4], 5], [[3, 4, 3], 40]] as const) {
          t.multi(
            rng,
            1,
            [...idx],
            idx.map(() => ql),
            `${f.name} D ${headDim} qlen ${ql} each ${rng.tag}`,
          );
        }
      });
    }
    it(`${f.name}: forks of forks and truncates (to 0, to the window's edge) keep both builds equal`, () => {
      const rng = new Rng(`fork gpu ${f.name}`);
      using t = new Twin(
        gpu,
        twinOptions({
          layers: 2,
          headDim: 64,
          pageTokens: 128,
          maxSequences: 10,
          keys: f.keys,
          values: f.values,
        }),
      );
      const g = f.keys.group ?? 32;
      const a = t.add();
      t.append(a, rng, 20);
      t.truncate(a, 0);
      t.same(a, f.exact, `truncate to 0 ${rng.tag}`);
      t.append(a, rng, 250); // quantized a multiple of the key group, not of the page
      const b = t.fork(a), c = t.fork(a);
      t.append(b, rng, 3 * g + 5);
      const d = t.fork(b);
      t.append(d, rng, 50);
      t.append(c, rng, 1);
      t.append(a, rng, 70);
      const q = t.cs[a].quantizedLength(0);
      t.truncate(a, q); // the window's edge
      for (const i of [a, b, c, d]) t.same(i, f.exact, `sequence ${i} ${rng.tag}`);
      assert.equal(t.g.memory().pagesUsed, t.c.memory().pagesUsed, rng.tag);
      t.multi(rng, 0, [a, b, c, d], [1, 5, 2, 40], `after forks ${rng.tag}`);
      t.cs[a].free();
      t.gs[a].free();
      t.same(b, f.exact, `after the parent was freed ${rng.tag}`);
      assert.equal(t.g.memory().pagesUsed, t.c.memory().pagesUsed, rng.tag);
    });
  }

  it("per-layer formats (tensor cores, CUDA cores, 16 bits): forks, truncates and multi-token attention a layer", () => {
    const rng = new Rng("multi per layer gpu");
    using t = new Twin(
      gpu,
      twinOptions({
        layers: 3,
        maxSequences: 6,
        perLayer: [{ layer: 1, keys: { kind: "uniform", bits: 4, group: 32 } }, {
          layer: 2,
          keys: { bits: 16 },
          values: { bits: 16 },
        }],
      }),
    );
    const a = t.add();
    t.append(a, rng, 300);
    const b = t.fork(a);
    t.append(b, rng, 45);
    t.truncate(b, t.cs[b].quantizedLength(0) + 3);
    t.append(a, rng, 9);
    for (const i of [a, b]) t.same(i, true, `sequence ${i} ${rng.tag}`);
    for (const layer of [0, 1, 2]) {
      t.multi(rng, layer, [a, b, b], [9, 1, 40], `layer ${layer} ${rng.tag}`);
    }
  });

  it("a decode batch's log-sum-exp equals the CPU's", () => {
    const rng = new Rng("batch lse gpu");
    using t = new Twin(
      gpu,
      twinOptions({ maxSequences: 3, values: { kind: "codebook", bits: 2, group: 64 } }),
    );
    for (const n of [70, 1000, 333]) t.append(t.add(), rng, n);
    const qh = kvRows(rng, 3, 8, 128);
    const want = new Float32Array(3 * 8);
    const wo = t.c.attend(0, t.cs, qh, { lse: want }) as Float32Array;
    using q = gpu.upload(qh),
      out = gpu.alloc([3, 8, 128], "f32"),
      lse = gpu.alloc([3 * 8], "f32");
    using batch = t.g.batch(t.gs, { q, out, lse });
    batch.attend(0);
    assertNearGpu(out.readSync(), wo, rng.tag);
    const gl = lse.readSync();
    assert.ok(
      maxDiff(gl, want) <= 2e-3 * (1 + Math.max(...want.map(Math.abs))),
      `lse ${maxDiff(gl, want)} ${rng.tag}`,
    );
  });

  it("mergeAttention and a chunked prefill equal the CPU's", () => {
    const rng = new Rng("merge prefill gpu");
    using t = new Twin(gpu, twinOptions({ maxSequences: 2 }));
    const rows = 9, D = 128;
    const outs = [kvRows(rng, rows, 1, D), kvRows(rng, rows, 1, D)];
    const lses = [
      Float32Array.from({ length: rows }, () => rng.normal() * 3),
      new Float32Array(rows).fill(1),
    ];
    lses[1][4] = -Infinity;
    const want = t.c.mergeAttention(outs, lses), got = t.g.mergeAttention(outs, lses);
    assert.ok(maxDiff(got.out, want.out) < 1e-5 && maxDiff(got.lse, want.lse) < 1e-5, rng.tag);
    const s = t.add();
    for (const n of [200, 512, 77]) {
      const q = kvRows(rng, n, 8, D), k = kvRows(rng, n, 2, D), v = kvRows(rng, n, 2, D);
      const w = t.c.prefill(0, t.cs[s], q, k, v);
      const g = t.g.prefill(0, t.gs[s], q, k, v);
      assertNearGpu(g, w, `prefill chunk of ${n} ${rng.tag}`);
    }
    t.same(s, true, `after prefill ${rng.tag}`);
  });

  it("the errors of the CPU build: qlen over a length, a fork with the pool exhausted, truncate past the window", () => {
    const rng = new Rng("errors gpu");
    using t = new Twin(
      gpu,
      twinOptions({ queryHeads: 4, headDim: 64, residual: 32, maxPages: 2, maxSequences: 4 }),
    );
    const a = t.add();
    t.append(a, rng, 150); // quantized 96: both pages taken, the second half full
    for (const [c, s] of [[t.c, t.cs[a]], [t.g, t.gs[a]]] as const) {
      const code = (fn: () => unknown) => {
        try {
          fn();
        } catch (e) {
          return e instanceof KiviError ? e.code : String(e);
        }
        return "ok";
      };
      assert.equal(
        code(() => c.attendMulti(0, [s], [151], new Float32Array(151 * 4 * 64))),
        "KIVI_ERR_ARG",
      );
      assert.equal(code(() => s.fork()), "KIVI_ERR_CAPACITY");
      assert.equal(code(() => s.truncate(95)), "KIVI_ERR_ARG");
      assert.equal(c.memory().pagesUsed, 2);
      assert.equal(s.length(0), 150);
    }
  });
});
