/**
 * The paged cache on the CPU reference: lengths and the residual window rule, pages equal to the
 * standalone quantizer, attention against a float64 oracle over the dequantized cache, page reuse,
 * all-or-nothing appends, and the memory report.
 */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import type { CacheFormat, CacheOptions, KVCache, Sequence } from "../src/mod.ts";
import { KiviError, pageBytes, resolveCacheOptions } from "../src/mod.ts";
import { attentionOracle, CB2_G64, CB4_G32, D64_R32, f16, FOUR_PAGES, kvRows } from "./_helpers.ts";
import { openCpu, Rng, U2_G32, U4_G32 } from "./_helpers.ts";

const kivi = await openCpu();
/** A one-layer cache of 64-dim heads. */
const oneLayer = (o: Omit<CacheOptions, "layers" | "headDim">) =>
  kivi.createCache({ layers: 1, headDim: 64, ...o });

/**
 * float64 attention over the dequantized cache of one sequence. The CPU build accumulates in double
 * from the same fp32 values, so the only difference is its final rounding to fp32: |diff| <= 2^-24
 * |out| plus the double rounding of sums of `len` terms (len * 2^-53 relative), far below the 1e-6
 * relative bound used.
 */
const oracle = attentionOracle;
const rows = kvRows;

function assertClose(
  got: ArrayLike<number>,
  want: ArrayLike<number>,
  rel: number,
  msg: string,
): void {
  let scale = 0;
  for (let i = 0; i < want.length; i++) scale = Math.max(scale, Math.abs(want[i]));
  for (let i = 0; i < want.length; i++) {
    const tol = rel * (Math.abs(want[i]) + scale * 1e-3) + 1e-30;
    if (!(Math.abs(got[i] - want[i]) <= tol)) {
      assert.fail(`${msg}: element ${i} is ${got[i]}, want ${want[i]} (tolerance ${tol})`);
    }
  }
}

/** Attention of every sequence checked against the oracle on that sequence's own read(). */
function checkAttention(
  cache: KVCache,
  seqs: Sequence[],
  layer: number,
  rng: Rng,
  tag: string,
): void {
  const c = cache.config;
  const q = rows(rng, seqs.length, c.queryHeads, c.headDim);
  // The scale crosses the ABI as a float: the oracle uses that same fp32 value.
  const scale = Math.fround(1 / Math.sqrt(c.headDim) * 0.9);
  const out = cache.attend(layer, seqs, q, { scale }) as Float32Array;
  seqs.forEach((s, b) => {
    const { keys, values } = cache.read(s, layer);
    const qb = q.subarray(b * c.queryHeads * c.headDim, (b + 1) * c.queryHeads * c.headDim);
    const want = oracle(
      keys as Float32Array,
      values as Float32Array,
      qb,
      s.length(layer),
      c,
      scale,
    );
    assertClose(
      out.subarray(b * c.queryHeads * c.headDim, (b + 1) * c.queryHeads * c.headDim),
      want,
      1e-6,
      `${tag} seq ${b}`,
    );
  });
}

const formats: { name: string; keys: CacheFormat; values: CacheFormat }[] = [
  { name: "uniform 2/uniform 2", keys: U2_G32, values: U2_G32 },
  { name: "uniform 2/codebook 2", keys: U2_G32, values: CB2_G64 },
  { name: "codebook 4/uniform 4", keys: CB4_G32, values: U4_G32 },
  { name: "16/16", keys: { bits: 16 }, values: { bits: 16 } },
];

describe("cache lengths and the residual window", () => {
  for (const residual of [0, 32, 128]) {
    it(`keeps len - qlen below R + F and qlen a multiple of F (R ${residual})`, () => {
      const rng = new Rng("window", residual);
      using cache = kivi.createCache({
        layers: 2,
        kvHeads: 2,
        headDim: 64,
        pageTokens: 64,
        residual,
        maxPages: 64,
      });
      const F = 32;
      using s = cache.createSequence();
      let len = 0;
      for (const n of [1, 31, residual, residual + F, 97, 1, 1, 1, 40]) {
        if (n === 0) continue;
        s.append(rows(rng, n, 2, 64, 2), rows(rng, n, 2, 64, 2));
        len += n;
        for (const layer of [0, 1]) {
          const q = s.quantizedLength(layer);
          assert.equal(s.length(layer), len, `${rng.tag} length after +${n}`);
          assert.equal(q % F, 0, `${rng.tag} qlen ${q} is a multiple of F`);
          assert.ok(len - q < residual + F, `${rng.tag} window holds ${len - q} < R + F`);
          if (len >= residual + F) {
            assert.ok(len - q >= residual, `${rng.tag} window holds at least R once long enough`);
          }
        }
        assert.equal(
          s.pages().length,
          Math.ceil(s.quantizedLength(0) / 64),
          `${rng.tag} pages cover the quantized tokens`,
        );
      }
    });
  }

  it("tracks each layer on its own when appended one layer at a time", () => {
    const rng = new Rng("layers");
    using cache = kivi.createCache({ ...D64_R32, layers: 3, kvHeads: 1, maxPages: 16 });
    using s = cache.createSequence();
    s.append(rows(rng, 100, 1, 64), rows(rng, 100, 1, 64), { layer: 1 });
    assert.deepEqual([0, 1, 2].map((l) => s.length(l)), [0, 100, 0]);
    assert.deepEqual([0, 1, 2].map((l) => s.quantizedLength(l)), [0, 64, 0]);
  });
});

describe("cache pages hold what the standalone quantizer gives", () => {
  // 2-bit uniform keys with 2-bit values use the tensor-core page layout (kivi_format.h), the others
  // the plain one.
  for (
    const [pageTokens, kb, vb, vg] of [[32, 2, 2, 64], [64, 4, 2, 64], [128, 2, 4, 64], [
      64,
      2,
      2,
      32,
    ], [256, 2, 2, 32]] as const
  ) {
    it(`uniform K${kb} G32 / V${vb} G${vg}, page ${pageTokens}`, () => {
      const rng = new Rng("pages", pageTokens);
      const kvHeads = 2, D = 128, n = 97 + 3 * pageTokens;
      using cache = kivi.createCache({
        layers: 1,
        kvHeads,
        headDim: D,
        pageTokens,
        residual: 32,
        maxPages: 32,
        keys: { kind: "uniform", bits: kb, group: 32 },
        values: { kind: "uniform", bits: vb, group: vg },
      });
      using s = cache.createSequence();
      const k = rows(rng, n, kvHeads, D), v = rows(rng, n, kvHeads, D);
      s.append(k.subarray(0, 50 * kvHeads * D), v.subarray(0, 50 * kvHeads * D), { layer: 0 });
      for (let t = 50; t < n; t++) {
        s.append(
          k.subarray(t * kvHeads * D, (t + 1) * kvHeads * D),
          v.subarray(t * kvHeads * D, (t + 1) * kvHeads * D),
          { layer: 0 },
        );
      }
      const ql = s.quantizedLength(0);
      const { keys, values } = cache.read(s, 0);
      const cols = kvHeads * D;
      // Pages quantize the fp16-rounded tokens: the same as quantizing them on their own.
      const kq = kivi.quantize(Float16Array.from(k.subarray(0, ql * cols)), {
        shape: [ql, cols],
        axis: "token",
        format: { kind: "uniform", bits: kb, group: 32 },
      });
      const vq = kivi.quantize(Float16Array.from(v.subarray(0, ql * cols)), {
        shape: [ql, cols],
        axis: "channel",
        format: { kind: "uniform", bits: vb, group: vg },
      });
      assert.deepEqual(
        (keys as Float32Array).subarray(0, ql * cols),
        kivi.dequantize(kq),
        `${rng.tag} keys in pages`,
      );
      assert.deepEqual(
        (values as Float32Array).subarray(0, ql * cols),
        kivi.dequantize(vq),
        `${rng.tag} values in pages`,
      );
      // The window holds the fp16-rounded tokens exactly.
      for (let i = ql * cols; i < n * cols; i++) {
        if ((keys as Float32Array)[i] !== f16(k[i]) || (values as Float32Array)[i] !== f16(v[i])) {
          assert.fail(`${rng.tag} window element ${i}`);
        }
      }
    });
  }

  it("bits 16 stores the fp16-rounded input exactly", () => {
    const rng = new Rng("fp16");
    const bits16 = { bits: 16 } as const;
    using cache = oneLayer({ kvHeads: 3, residual: 0, maxPages: 8, keys: bits16, values: bits16 });
    using s = cache.createSequence();
    const k = rows(rng, 200, 3, 64), v = rows(rng, 200, 3, 64);
    s.append(k, v, { layer: 0 });
    const r = cache.read(s, 0);
    assert.deepEqual(r.keys, k.map(f16));
    assert.deepEqual(r.values, v.map(f16));
  });
});

describe("cache attention against a float64 oracle", () => {
  for (const f of formats) {
    for (
      const [pageTokens, kvHeads, queryHeads] of [[32, 2, 2], [64, 2, 8], [128, 1, 8], [
        64,
        4,
        16,
      ]] as const
    ) {
      it(`${f.name}, page ${pageTokens}, GQA ${queryHeads}/${kvHeads}`, () => {
        const rng = new Rng(`attend ${f.name}`, pageTokens * 100 + queryHeads);
        const G = 32, R = 64, D = 64;
        using cache = kivi.createCache({
          layers: 1,
          kvHeads,
          queryHeads,
          headDim: D,
          pageTokens,
          residual: R,
          maxPages: 256,
          keys: f.keys,
          values: f.values,
        });
        const lengths = [1, G - 1, R, R + G, 97, 3];
        const seqs = lengths.map((n) => {
          const s = cache.createSequence();
          s.append(rows(rng, n, kvHeads, D), rows(rng, n, kvHeads, D), { layer: 0 });
          return s;
        });
        checkAttention(cache, seqs, 0, rng, `${rng.tag}`);
        // One decode step on each crosses or approaches a flush boundary; check again.
        for (const s of seqs) {
          s.append(rows(rng, 1, kvHeads, D), rows(rng, 1, kvHeads, D), { layer: 0 });
        }
        checkAttention(cache, seqs, 0, rng, `${rng.tag} after a decode step`);
      });
    }
  }

  it("batches of 1, 3 and 17 with a sequence of 4096 tokens, each equal to its single-sequence result", () => {
    const rng = new Rng("batch");
    using cache = oneLayer({ kvHeads: 2, queryHeads: 4, maxPages: 512 });
    const lengths = [4096, 1, 31, 128, 160, 97, 5, 64, 65, 129, 300, 2, 7, 33, 250, 96, 1000];
    const seqs = lengths.map((n) => {
      const s = cache.createSequence();
      s.append(rows(rng, n, 2, 64), rows(rng, n, 2, 64), { layer: 0 });
      return s;
    });
    for (const b of [1, 3, 17]) {
      checkAttention(cache, seqs.slice(0, b), 0, rng, `${rng.tag} batch ${b}`);
    }
    const q = rows(rng, 17, 4, 64);
    const all = cache.attend(0, seqs, q) as Float32Array;
    seqs.forEach((s, b) => {
      const one = cache.attend(0, [s], q.subarray(b * 256, (b + 1) * 256)) as Float32Array;
      assert.deepEqual(
        all.subarray(b * 256, (b + 1) * 256),
        one,
        `${rng.tag} batched == single for seq ${b}`,
      );
    });
  });
});

describe("cache pages are freed and reused without leaking data", () => {
  it("a new sequence on reused pages sees only its own tokens", () => {
    const rng = new Rng("reuse");
    using cache = kivi.createCache({ ...D64_R32, layers: 1, kvHeads: 2, maxPages: 6 });
    const a = cache.createSequence();
    a.append(rows(rng, 300, 2, 64), rows(rng, 300, 2, 64), { layer: 0 });
    const pagesA = [...a.pages()];
    assert.equal(cache.memory().pagesUsed, pagesA.length);
    a.free();
    assert.equal(cache.memory().pagesUsed, 0, `${rng.tag} pages returned`);
    using b = cache.createSequence();
    const kb = rows(rng, 300, 2, 64), vb = rows(rng, 300, 2, 64);
    b.append(kb, vb, { layer: 0 });
    assert.deepEqual([...b.pages()].sort(), pagesA.sort(), `${rng.tag} the same pages are reused`);
    // b's cache equals what a fresh cache gives for b's tokens alone.
    using fresh = kivi.createCache({ ...D64_R32, layers: 1, kvHeads: 2, maxPages: 6 });
    using f = fresh.createSequence();
    f.append(kb, vb, { layer: 0 });
    assert.deepEqual(
      cache.read(b, 0),
      fresh.read(f, 0),
      `${rng.tag} nothing of the freed sequence is visible`,
    );
    assert.throws(
      () => a.append(kb, vb),
      (e) => e instanceof KiviError && e.code === "KIVI_ERR_STATE",
    );
  });
});

describe("cache appends are all or nothing", () => {
  function snapshot(cache: KVCache, seqs: Sequence[], q: Float32Array) {
    return {
      out: cache.attend(0, seqs, q),
      mem: cache.memory(),
      lens: seqs.map((s) => [s.length(0), s.quantizedLength(0), [...s.pages()]]),
      reads: seqs.map((s) => cache.read(s, 0)),
    };
  }

  it("a full pool gives KIVI_ERR_CAPACITY and changes nothing", () => {
    const rng = new Rng("full");
    using cache = kivi.createCache(FOUR_PAGES);
    const s1 = cache.createSequence(), s2 = cache.createSequence();
    s1.append(rows(rng, 100, 2, 64), rows(rng, 100, 2, 64), { layer: 0 });
    s2.append(rows(rng, 40, 2, 64), rows(rng, 40, 2, 64), { layer: 0 });
    const q = rows(rng, 2, 2, 64);
    const before = snapshot(cache, [s1, s2], q);
    assert.throws(
      () => s2.append(rows(rng, 200, 2, 64), rows(rng, 200, 2, 64), { layer: 0 }),
      (e) => e instanceof KiviError && e.code === "KIVI_ERR_CAPACITY" && /page/.test(e.message),
    );
    assert.deepEqual(snapshot(cache, [s1, s2], q), before, `${rng.tag} state unchanged`);
  });

  for (const [where, bad] of [["k", NaN], ["v", Infinity], ["k", -Infinity]] as const) {
    it(`a ${bad} in ${where} gives KIVI_ERR_NONFINITE naming ${where} and changes nothing`, () => {
      const rng = new Rng(`nan ${where} ${bad}`);
      using cache = kivi.createCache({ ...D64_R32, layers: 2, kvHeads: 2, maxPages: 16 });
      using s = cache.createSequence();
      s.append(rows(rng, 150, 2, 64, 2), rows(rng, 150, 2, 64, 2));
      const q = rows(rng, 1, 2, 64);
      const before = snapshot(cache, [s], q);
      const k = rows(rng, 90, 2, 64, 2), v = rows(rng, 90, 2, 64, 2);
      (where === "k" ? k : v)[rng.int(k.length)] = bad;
      assert.throws(
        () => s.append(k, v),
        (e) =>
          e instanceof KiviError && e.code === "KIVI_ERR_NONFINITE" &&
          new RegExp(`\\b${where}\\b`).test(e.message),
      );
      assert.deepEqual(snapshot(cache, [s], q), before, `${rng.tag} state unchanged`);
    });
  }

  it("a NaN in q gives KIVI_ERR_NONFINITE and leaves out untouched", () => {
    const rng = new Rng("nan q");
    using cache = kivi.createCache({ layers: 1, kvHeads: 2, headDim: 64, maxPages: 8 });
    using s = cache.createSequence();
    s.append(rows(rng, 70, 2, 64), rows(rng, 70, 2, 64), { layer: 0 });
    const q = rows(rng, 1, 2, 64);
    q[5] = NaN;
    const out = new Float32Array(128).fill(7);
    assert.throws(
      () => cache.attend(0, [s], q, { out }),
      (e) => e instanceof KiviError && e.code === "KIVI_ERR_NONFINITE" && /\bq\b/.test(e.message),
    );
    assert.ok(out.every((x) => x === 7));
  });

  it("bad arguments are TypeError / RangeError naming the argument", () => {
    using cache = kivi.createCache({
      layers: 2,
      kvHeads: 2,
      queryHeads: 4,
      headDim: 64,
      maxPages: 8,
    });
    using s = cache.createSequence();
    const ok = new Float32Array(2 * 64);
    assert.throws(() => s.append(new Float32Array(100), new Float32Array(100), { layer: 0 }), {
      name: "TypeError",
      message: /k\.length/,
    });
    assert.throws(() => s.append(ok, new Float32Array(256), { layer: 0 }), {
      name: "TypeError",
      message: /v\.length/,
    });
    assert.throws(() => s.append(ok, ok, { layer: 2 }), { name: "RangeError", message: /layer/ });
    assert.throws(() => cache.attend(0, [s], new Float32Array(10)), {
      name: "TypeError",
      message: /q must hold/,
    });
    assert.throws(() => cache.attend(0, [], ok), { name: "TypeError", message: /seqs/ });
    assert.throws(
      () => kivi.createCache({ layers: 1, kvHeads: 3, queryHeads: 4, headDim: 64, maxPages: 1 }),
      { name: "RangeError", message: /queryHeads/ },
    );
    assert.throws(() => kivi.createCache({ layers: 1, kvHeads: 1, headDim: 96, maxPages: 1 }), {
      name: "RangeError",
      message: /headDim/,
    });
    assert.throws(
      () =>
        kivi.createCache({
          layers: 1,
          kvHeads: 1,
          headDim: 64,
          pageTokens: 32,
          keys: { kind: "uniform", bits: 2, group: 64 },
          maxPages: 1,
        }),
      { name: "RangeError", message: /pageTokens/ },
    );
    assert.throws(
      () => kivi.createCache({ layers: 1, kvHeads: 1, headDim: 64, residual: 40, maxPages: 1 }),
      { name: "RangeError", message: /residual/ },
    );
    assert.throws(() => kivi.createCache({ layers: 1, kvHeads: 1, headDim: 64 }), {
      name: "TypeError",
      message: /maxPages or budgetBytes/,
    });
    // An empty sequence cannot be attended to.
    assert.throws(
      () => cache.attend(0, [s], new Float32Array(4 * 64)),
      (e) => e instanceof KiviError && /seq/.test(e.message),
    );
  });
});

describe("cache memory report", () => {
  it("counts codes, params and residual, and sizes the pool as pageBytes says", () => {
    const rng = new Rng("memory");
    const opts: CacheOptions = {
      layers: 2,
      kvHeads: 2,
      headDim: 128,
      pageTokens: 64,
      residual: 128,
      maxPages: 10,
    };
    using cache = kivi.createCache(opts);
    using s = cache.createSequence();
    s.append(rows(rng, 64 * 4 + 128, 2, 128, 2), rows(rng, 64 * 4 + 128, 2, 128, 2));
    const m = cache.memory();
    const cfg = resolveCacheOptions(opts);
    assert.equal(m.pagesUsed, 4);
    assert.equal(m.pagesTotal, 10);
    assert.equal(m.tokens, 2 * (64 * 4 + 128));
    assert.equal(m.quantizedTokens, 2 * 64 * 4);
    // Uniform 2-bit keys: 2 bits of code + 32 bits of params per 32 values; codebook 2-bit values at
    // G64: 2 bits + 64 bits per 64 values. 4 full pages x 2 layers x 2 heads x 64 tokens x 128 dims.
    const vals = 4 * 2 * 2 * 64 * 128;
    assert.equal(m.codeBytes, (vals * 2 * 2) / 8);
    assert.equal(m.paramBytes, (vals / 32) * 4 + (vals / 64) * 8);
    assert.equal(m.residualBytes, 2 * 128 * 2 * 128 * 2 * 2);
    assert.ok(m.poolBytes >= pageBytes(cfg) * 10, "the pool holds maxPages pages");
    assert.equal(
      m.poolBytes,
      pageBytes(cfg) * 10 + 2 * 64 * (128 + 32) * 2 * 128 * 2 * 2,
      "pool + windows as kivi_format.h lays them out",
    );
    assert.ok(m.bitsPerValue > 3 && m.bitsPerValue < 16, `bits per value ${m.bitsPerValue}`);
    const { maxPages } = resolveCacheOptions({
      ...opts,
      maxPages: undefined,
      budgetBytes: pageBytes(cfg) * 7 + 5,
    });
    assert.equal(maxPages, 7);
  });
});
