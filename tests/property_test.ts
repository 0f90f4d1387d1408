/**
 * A seeded property test of the paged cache: random sequences of operations through the public API
 * (create a sequence, append a prefill of many tokens or a decode step of one, to one layer or to
 * all, attend over a random batch, free, and create again on the freed pages; fork a sequence,
 * truncate one within its window, attend with several query tokens a sequence) against a float64
 * model of the cache written from kivi.h and kivi_format.h, checked after every step. The model
 * names each page it hands out: a fork keeps its parent's names for the full pages (those below
 * every layer's quantized length) and takes new ones for the rest, and the cache's block tables must
 * share a page exactly where the model shares a name.
 *
 * The model keeps every appended token (rounded to fp16, as the cache stores it), applies the
 * window rule (kivi_flush_count: when a layer's window would hold R + F tokens or more, its oldest
 * whole F-token units are quantized, F = the key group), and quantizes each flushed unit with the
 * format's formulas: uniform keys per channel over the F tokens, uniform values per token over
 * groups of G channels (kivi_uniform_params / _code / _value, fp16 params: the uniform oracle of
 * _helpers.ts), bits 16 as the fp16 values themselves. Codebook units are not re-fitted (k-means
 * is the CPU reference's own business, tested in codebook_test.ts): their values are read back from
 * the cache with `cache.read` when they are flushed, checked to be a codebook of the unit (at most
 * 2^b values per group, inside the group's range, each value the nearest of them), and from then
 * on the model holds them fixed.
 *
 * After every step: each live sequence's length and quantized length per layer (so the window
 * size), its block table (no page owned by two sequences, every id in the pool, as many pages as
 * its quantized tokens need in its longest layer), and the whole memory report. After every step
 * that changed a sequence, its dequantized contents (`cache.read`) equal the model's, bit for bit.
 * After an attend, every output equals float64 attention over the model's values within
 *   |got - want| <= 2^-23 |want| + 2^-30 max|V|:
 * the CPU reference accumulates in double from the same fp32 K/V and q (kivi.h), so its only
 * visible error is the final rounding to fp32 (2^-24 |out|, doubled for margin) plus double
 * rounding in sums of at most a few thousand terms (far below 2^-30 of the largest value).
 * A wrong value anywhere in the cache moves an output by orders of magnitude more.
 * Appends that the model says need more pages than are free must fail with KIVI_ERR_CAPACITY, a
 * sequence past maxSequences with KIVI_ERR_CAPACITY, and appends given a NaN with
 * KIVI_ERR_NONFINITE, each changing nothing.
 *
 * Budget: KIVI_PROPERTY_STEPS steps per configuration (default 100: a few seconds per runtime in CI);
 * set it higher for a long run. KIVI_TEST_SEED changes the seeds; each failure names its seed, run
 * and step.
 */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import process from "node:process";
import type { CacheFormat, CacheOptions, KVCache, Sequence } from "../src/mod.ts";
import { KiviError, pageBytes, resolveCacheOptions, Rng } from "../src/mod.ts";
import type { DataDType } from "./_helpers.ts";
import { attentionOracle, BASE_SEED, CB2_G64, f16, NONFINITE, openCpu } from "./_helpers.ts";
import { setRaw, toInput, U2_G32, U2_G64, U4_G128, U4_G64, uniformOracle } from "./_helpers.ts";

const STEPS = process.env.KIVI_PROPERTY_STEPS ? Number(process.env.KIVI_PROPERTY_STEPS) : 100;
assert.ok(
  Number.isInteger(STEPS) && STEPS >= 1,
  `KIVI_PROPERTY_STEPS must be a positive integer, got ${process.env.KIVI_PROPERTY_STEPS}`,
);

/** One configuration per run: every format is covered; sizes are drawn from the run's seed. */
const RUNS: { name: string; keys: CacheFormat; values: CacheFormat }[] = [
  { name: "uniform 2 / uniform 2", keys: U2_G32, values: U2_G32 },
  { name: "uniform 4 G64 / uniform 4 G64", keys: U4_G64, values: U4_G64 },
  { name: "bits 16 / bits 16", keys: { bits: 16 }, values: { bits: 16 } },
  { name: "uniform 2 / codebook 2 G64", keys: U2_G32, values: CB2_G64 },
  {
    name: "codebook 4 pinned / uniform 2 G64",
    keys: { kind: "codebook", bits: 4, group: 32, fit: "pinned" },
    values: U2_G64,
  },
  { name: "uniform 4 G128 / bits 16", keys: U4_G128, values: { bits: 16 } },
];

type Cfg = ReturnType<typeof resolveCacheOptions>;
type Part = Cfg["keys"];

/** A model sequence: per layer the stored value of every token ([H][D] each) and the quantized count. */
interface ModelSeq {
  seq: Sequence;
  /** Creation number in this run, for messages. */
  n: number;
  /** cut: truncated since its last flush (the window may hold fewer than R tokens). */
  layers: { k: Float64Array[]; v: Float64Array[]; qlen: number; cut?: boolean }[];
  /** Pages in the block table (shared by every layer). */
  pages: number;
  /** The model's name of each page of the block table: a fork's full pages keep their parent's. */
  ids: number[];
}

class Model {
  readonly seqs: ModelSeq[] = [];
  created = 0;
  /** Page ids handed out at some point to a sequence that was later freed. */
  readonly freedIds = new Set<number>();
  constructor(readonly c: Cfg) {}

  get F(): number {
    return this.c.keys.group;
  }
  /** Model page names handed out so far. */
  nextId = 0;
  /** Distinct pages held by the live sequences (a shared page once). */
  get usedPages(): number {
    return new Set(this.seqs.flatMap((s) => s.ids)).size;
  }
  get freePages(): number {
    return this.c.maxPages - this.usedPages;
  }
  /** Grows s's block table to `need` pages, each a new model page. */
  grow(s: ModelSeq, need: number): void {
    while (s.ids.length < need) s.ids.push(this.nextId++);
    s.pages = need;
  }
  /** Pages of s that no write reaches again: below every layer's quantized length. */
  fullPages(s: ModelSeq): number {
    return Math.floor(Math.min(...s.layers.map((l) => l.qlen)) / this.c.pageTokens);
  }
  /** kivi_format.h kivi_flush_count. */
  flushCount(len: number, qlen: number, n: number): number {
    const over = len + n - qlen - this.c.residual;
    return over >= this.F ? Math.floor(over / this.F) * this.F : 0;
  }
  /** Pages the block table needs after appending n tokens to `layers`, and each layer's flush. */
  plan(s: ModelSeq, layers: number[], n: number): { need: number; flush: Map<number, number> } {
    const flush = new Map(
      layers.map((l) => [l, this.flushCount(s.layers[l].k.length, s.layers[l].qlen, n)]),
    );
    let need = s.pages;
    s.layers.forEach((
      ly,
      l,
    ) => (need = Math.max(need, Math.ceil((ly.qlen + (flush.get(l) ?? 0)) / this.c.pageTokens))));
    return { need, flush };
  }
}

/** The dequantized values of one F-token unit of one head ([F][D] row-major) in a uniform or bits-16 part. */
function quantizeUnit(
  block: Float64Array,
  F: number,
  D: number,
  p: Part,
  isValue: boolean,
): Float64Array {
  if (p.bits === 16) return block;
  return uniformOracle(block, F, D, isValue ? "channel" : "token", isValue ? p.group : F, p.bits)
    .deq;
}

/**
 * Checks read-back codebook values of one unit of one head ([F][D]) against its fp16 inputs: per
 * group at most 2^b distinct values, each inside the group's [min, max], and each element's value the
 * nearest of them (up to a tie at an fp32-rounded midpoint).
 */
function checkCodebookUnit(
  x: Float64Array,
  got: Float64Array,
  F: number,
  D: number,
  p: Part,
  isValue: boolean,
  msg: string,
): void {
  const G = isValue ? p.group : F;
  const groups = isValue ? F * (D / G) : D;
  for (let g = 0; g < groups; g++) {
    const idx: number[] = [];
    if (isValue) {
      for (let i = 0; i < G; i++) idx.push(Math.floor(g / (D / G)) * D + (g % (D / G)) * G + i);
    } else for (let t = 0; t < F; t++) idx.push(t * D + g);
    let mn = Infinity, mx = -Infinity;
    for (const i of idx) (mn = Math.min(mn, x[i])), (mx = Math.max(mx, x[i]));
    const cents = [...new Set(idx.map((i) => got[i]))];
    assert.ok(
      cents.length <= 1 << p.bits,
      `${msg}: group ${g} holds ${cents.length} values, more than 2^${p.bits}`,
    );
    for (const i of idx) {
      assert.ok(
        got[i] >= mn && got[i] <= mx,
        `${msg}: group ${g} value ${got[i]} outside its range [${mn}, ${mx}]`,
      );
      const best = Math.min(...cents.map((c) => Math.abs(x[i] - c)));
      const slack = 2 ** -23 * (Math.abs(x[i]) + Math.max(...cents.map(Math.abs)));
      assert.ok(
        Math.abs(x[i] - got[i]) <= best + slack,
        `${msg}: element ${i} = ${x[i]} got ${got[i]}, not the nearest of ${cents}`,
      );
    }
  }
}

function fail(msg: string): never {
  throw new assert.AssertionError({ message: msg });
}

/** Exact equality of the cache's read() of one layer with the model's values. */
function checkRead(cache: KVCache, m: Model, s: ModelSeq, l: number, where: string): void {
  const { kvHeads: H, headDim: D } = m.c;
  const r = cache.read(s.seq, l);
  const ly = s.layers[l];
  const keys = r.keys as Float32Array, values = r.values as Float32Array;
  if (keys.length !== ly.k.length * H * D) {
    fail(
      `${where}: read() of seq #${s.n} layer ${l} has ${
        keys.length / (H * D)
      } tokens, model ${ly.k.length}`,
    );
  }
  for (let t = 0; t < ly.k.length; t++) {
    for (let j = 0; j < H * D; j++) {
      const a = keys[t * H * D + j], b = values[t * H * D + j];
      if (a !== ly.k[t][j] || b !== ly.v[t][j]) {
        fail(
          `${where}: seq #${s.n} layer ${l} token ${t} (${
            t < ly.qlen ? "in pages" : "in the window"
          }) element ${j}: ` +
            `cache k ${a} v ${b}, model k ${ly.k[t][j]} v ${ly.v[t][j]}`,
        );
      }
    }
  }
}

/** Lengths, block tables, page ownership and the memory report against the model. */
function checkState(cache: KVCache, m: Model, tableBytes: number, where: string): void {
  const c = m.c;
  const owner = new Map<number, number>(), byModel = new Map<number, number>();
  let tokens = 0, quantized = 0, resid = 0;
  for (const s of m.seqs) {
    for (let l = 0; l < c.layers; l++) {
      const ly = s.layers[l];
      const len = s.seq.length(l), q = s.seq.quantizedLength(l);
      if (len !== ly.k.length || q !== ly.qlen) {
        fail(
          `${where}: seq #${s.n} layer ${l} length ${len} quantized ${q}, model ${ly.k.length} / ${ly.qlen}`,
        );
      }
      // The window rule: between R and R + F - 1 tokens once the layer has more than R + F - 1 tokens.
      const w = len - q;
      if (
        q % m.F !== 0 || w >= c.residual + m.F ||
        (!ly.cut && len >= c.residual + m.F && w < c.residual)
      ) {
        fail(
          `${where}: seq #${s.n} layer ${l} window of ${w} tokens (length ${len}, R ${c.residual}, F ${m.F})`,
        );
      }
      tokens += len, quantized += q, resid += w;
    }
    const pages = s.seq.pages();
    if (pages.length !== s.pages) {
      fail(`${where}: seq #${s.n} holds ${pages.length} pages, model ${s.pages}`);
    }
    // a page is shared exactly where the model shares it (forks), and then it is full in every owner
    for (const [i, p] of pages.entries()) {
      if (!(p >= 0 && p < c.maxPages)) {
        fail(`${where}: seq #${s.n} holds page ${p}, outside 0..${c.maxPages - 1}`);
      }
      const id = s.ids[i];
      if (owner.has(p) && owner.get(p) !== id) {
        fail(
          `${where}: page ${p} of seq #${s.n} (model page ${id}) is also model page ${
            owner.get(p)
          }`,
        );
      }
      if (byModel.has(id) && byModel.get(id) !== p) {
        fail(`${where}: model page ${id} is page ${byModel.get(id)} and page ${p} (seq #${s.n})`);
      }
      owner.set(p, id);
      byModel.set(id, p);
    }
  }
  const used = owner.size, heads = c.layers * c.kvHeads, vals = c.pageTokens * c.headDim;
  const codes = (p: Part) => (vals * p.bits) / 8;
  const params = (
    p: Part,
  ) => (p.bits === 16 ? 0 : (vals / p.group) * (p.kind === "uniform" ? 4 : 2 << p.bits));
  const want = {
    codeBytes: used * heads * (codes(c.keys) + codes(c.values)),
    paramBytes: used * heads * (params(c.keys) + params(c.values)),
    residualBytes: resid * c.kvHeads * c.headDim * 4,
    tableBytes,
    poolBytes: pageBytes(c) * c.maxPages +
      c.maxSequences * c.layers * (c.residual + m.F) * c.kvHeads * c.headDim * 4,
    pagesUsed: used,
    pagesTotal: c.maxPages,
    tokens,
    quantizedTokens: quantized,
    bitsPerValue: 0,
    heldBitsPerValue: 0,
    ratioToFp16: 0,
    // a page's codes and params of K and V over its values, the same in every layer
    layerBitsPerValue: Array<number>(c.layers).fill(
      ((codes(c.keys) + params(c.keys) + codes(c.values) + params(c.values)) * 8) / (2 * vals),
    ),
    formatBitsPerValue: ((codes(c.keys) + params(c.keys) + codes(c.values) + params(c.values)) *
      8) / (2 * vals),
  };
  const values = tokens * c.kvHeads * c.headDim * 2,
    stored = want.codeBytes + want.paramBytes + want.residualBytes;
  want.bitsPerValue = values === 0 ? 0 : (stored * 8) / values;
  // Each held token at its format's rate: code bits plus the params spread over the group; 16 in the window.
  const rate = (
    p: Part,
  ) => (p.bits === 16 ? 16 : p.bits + (p.kind === "uniform" ? 32 : 16 << p.bits) / p.group);
  const per = c.kvHeads * c.headDim;
  want.heldBitsPerValue = values === 0
    ? 0
    : (quantized * per * (rate(c.keys) + rate(c.values)) + (tokens - quantized) * per * 32) /
      values;
  want.ratioToFp16 = values === 0 ? 0 : (stored + tableBytes) / (values * 2);
  assert.deepEqual(cache.memory(), want, `${where}: memory report`);
}

/** Seeded K or V rows [rows][H][D]: a random scale per call, an outlier channel, sometimes a constant channel. */
function data(rng: Rng, rows: number, H: number, D: number): Float64Array {
  const a = new Float64Array(rows * H * D);
  const scale = [0.05, 1, 8][rng.int(3)], outlier = rng.int(D);
  for (let i = 0; i < a.length; i++) a[i] = rng.normal() * scale * (i % D === outlier ? 10 : 1);
  if (rng.next() < 0.15) {
    const ch = rng.int(H * D), val = rng.uniform(-3, 3);
    for (let t = 0; t < rows; t++) a[t * H * D + ch] = val; // a constant key group: scale 0, no division
  }
  return a;
}

/** Expects fn to throw KiviError `code`, and the cache to be as the model says afterwards. */
function expectRefused(fn: () => unknown, code: string, where: string): void {
  assert.throws(
    fn,
    (e: unknown) => e instanceof KiviError && e.code === code,
    `${where}: expected ${code}`,
  );
}

interface Stats {
  steps: number;
  appended: number;
  flushed: number;
  attended: number;
  /** Appends refused for want of pages, for a NaN, and creates refused for want of slots. */
  full: number;
  nan: number;
  slots: number;
  /** Pages handed to a sequence that some freed sequence had held. */
  reused: number;
  /** Forks made (and refused for want of pages or slots), truncates, multi-token attentions. */
  forked: number;
  forkRefused: number;
  truncated: number;
  multi: number;
}
/** Stats with every count at zero. */
const noStats = (): Stats => ({
  steps: 0,
  appended: 0,
  flushed: 0,
  attended: 0,
  full: 0,
  nan: 0,
  slots: 0,
  reused: 0,
  forked: 0,
  forkRefused: 0,
  truncated: 0,
  multi: 0,
});

async function run(r: number): Promise<Stats> {
  const spec = RUNS[r];
  const seed = (BASE_SEED ^ Math.imul(r + 1, 0x9e3779b1)) >>> 0;
  const rng = new Rng(seed);
  const tag = `[run ${r} "${spec.name}"; seed 0x${seed.toString(16)}; KIVI_TEST_SEED=${BASE_SEED}]`;
  const F = spec.keys.group ?? 32;
  const vG = spec.values.group ?? 32;
  const headDim = vG === 128 ? 128 : [64, 128][rng.int(2)];
  const kvHeads = 1 + rng.int(2);
  const opts: CacheOptions = {
    layers: 1 + rng.int(3),
    kvHeads,
    queryHeads: kvHeads * [1, 2, 4][rng.int(3)],
    headDim,
    pageTokens: [32, 64, 128, 256].filter((p) => p % F === 0)[rng.int(2)],
    residual: F * rng.int(3),
    keys: spec.keys,
    values: spec.values,
    maxPages: 4 + rng.int(12),
    maxSequences: 2 + rng.int(3),
  };
  const c = resolveCacheOptions(opts);
  const { layers: L, kvHeads: H, queryHeads: QH, headDim: D } = c;
  using kivi = await openCpu();
  using cache = kivi.createCache(opts);
  const m = new Model(c);
  const tableBytes = cache.memory().tableBytes;
  const stats = noStats();
  const where = (step: number, op: string) =>
    `${tag} step ${step} (${op}; config ${JSON.stringify(opts)})`;

  const create = (step: number) => {
    if (m.seqs.length === c.maxSequences) {
      expectRefused(
        () => cache.createSequence(),
        "KIVI_ERR_CAPACITY",
        where(step, "create past maxSequences"),
      );
      stats.slots++;
      return;
    }
    const seq = cache.createSequence();
    m.seqs.push({
      seq,
      n: m.created++,
      layers: Array.from({ length: L }, () => ({ k: [], v: [], qlen: 0 })),
      pages: 0,
      ids: [],
    });
  };

  const append = (step: number, s: ModelSeq, n: number, layer: number | undefined) => {
    const targets = layer === undefined ? [...Array(L).keys()] : [layer];
    const dtype: DataDType = (["f32", "f32", "f16", "bf16"] as const)[rng.int(4)];
    const k = toInput(data(rng, n * targets.length, H, D), dtype),
      v = toInput(data(rng, n * targets.length, H, D), dtype);
    const op = `append ${n} token(s) ${dtype} to seq #${s.n} ${
      layer === undefined ? "in every layer" : `in layer ${layer}`
    }`;
    const { need, flush } = m.plan(s, targets, n);
    if (rng.next() < 0.05) {
      const bad = k.x.slice();
      setRaw(bad, rng.int(bad.length), NONFINITE[dtype][0][1]);
      expectRefused(
        () => s.seq.append(bad, v.x, { layer, dtype }),
        "KIVI_ERR_NONFINITE",
        where(step, `${op} with a NaN`),
      );
      stats.nan++;
      return;
    }
    if (need - s.pages > m.freePages) {
      expectRefused(
        () => s.seq.append(k.x, v.x, { layer, dtype }),
        "KIVI_ERR_CAPACITY",
        where(step, `${op}, ${need - s.pages} page(s) short of ${m.freePages} free`),
      );
      stats.full++;
      return;
    }
    s.seq.append(k.x, v.x, { layer, dtype });
    stats.appended += n * targets.length;
    const pagesBefore = s.pages;
    m.grow(s, need);
    targets.forEach((l, i) => {
      const ly = s.layers[l];
      for (let t = 0; t < n; t++) {
        const at = (i * n + t) * H * D;
        ly.k.push(Float64Array.from(k.v.subarray(at, at + H * D), f16));
        ly.v.push(Float64Array.from(v.v.subarray(at, at + H * D), f16));
      }
      const f = flush.get(l)!;
      const read = f > 0 &&
          (c.keys.kind === "codebook" && c.keys.bits !== 16 ||
            c.values.kind === "codebook" && c.values.bits !== 16)
        ? cache.read(s.seq, l)
        : undefined;
      for (let p = ly.qlen; p < ly.qlen + f; p += m.F) {
        for (let h = 0; h < H; h++) {
          for (const isValue of [false, true]) {
            const part = isValue ? c.values : c.keys;
            const rows = isValue ? ly.v : ly.k;
            const block = new Float64Array(m.F * D);
            for (let t = 0; t < m.F; t++) {
              block.set(rows[p + t].subarray(h * D, (h + 1) * D), t * D);
            }
            let deq: Float64Array;
            if (part.kind === "codebook" && part.bits !== 16) {
              const back = (isValue ? read!.values : read!.keys) as Float32Array;
              deq = new Float64Array(m.F * D);
              for (let t = 0; t < m.F; t++) {
                for (let d = 0; d < D; d++) deq[t * D + d] = back[((p + t) * H + h) * D + d];
              }
              checkCodebookUnit(
                block,
                deq,
                m.F,
                D,
                part,
                isValue,
                `${where(step, op)}: ${
                  isValue ? "values" : "keys"
                } of layer ${l} head ${h} tokens ${p}..${p + m.F - 1}`,
              );
            } else {
              deq = quantizeUnit(block, m.F, D, part, isValue);
            }
            for (let t = 0; t < m.F; t++) rows[p + t].set(deq.subarray(t * D, (t + 1) * D), h * D);
          }
        }
      }
      ly.qlen += f;
      if (f > 0) ly.cut = false;
      stats.flushed += f;
    });
    if (s.pages > pagesBefore) {
      const ids = s.seq.pages().subarray(pagesBefore);
      for (const id of ids) if (m.freedIds.has(id)) stats.reused++;
    }
    for (let l = 0; l < L; l++) checkRead(cache, m, s, l, where(step, op));
  };

  const attend = (step: number) => {
    const layer = rng.int(L);
    const ready = m.seqs.filter((s) => s.layers[layer].k.length > 0);
    if (ready.length === 0) return;
    const batch = Array.from({ length: 1 + rng.int(4) }, () => ready[rng.int(ready.length)]); // repeats allowed
    const q = Float32Array.from({ length: batch.length * QH * D }, () => rng.normal() * 2);
    const scale = Math.fround(rng.uniform(0.5, 1.5) / Math.sqrt(D));
    const out = cache.attend(layer, batch.map((s) => s.seq), q, { scale }) as Float32Array;
    batch.forEach((s, b) => {
      const ly = s.layers[layer];
      const len = ly.k.length;
      const { kf, vf, maxV } = flatKV(ly.k, ly.v, H * D);
      const want = attentionOracle(kf, vf, q.subarray(b * QH * D, (b + 1) * QH * D), len, c, scale);
      const got = out.subarray(b * QH * D, (b + 1) * QH * D);
      for (let i = 0; i < want.length; i++) {
        const tol = 2 ** -23 * Math.abs(want[i]) + 2 ** -30 * maxV;
        if (!(Math.abs(got[i] - want[i]) <= tol)) {
          fail(
            `${
              where(
                step,
                `attend layer ${layer} over seqs ${batch.map((x) => `#${x.n}`)}`,
              )
            }: batch ${b} (seq #${s.n}, ${len} tokens, ${ly.qlen} in pages) ` +
              `output ${i} is ${got[i]}, model ${want[i]} (tolerance ${tol})`,
          );
        }
      }
    });
    stats.attended++;
  };

  const free = (step: number) => {
    const i = rng.int(m.seqs.length);
    const s = m.seqs[i];
    for (const id of s.seq.pages()) m.freedIds.add(id);
    const used = cache.memory().pagesUsed;
    s.seq.free();
    m.seqs.splice(i, 1);
    assert.equal(
      cache.memory().pagesUsed,
      m.usedPages,
      `${where(step, `free seq #${s.n}`)}: its pages not shared with another went back`,
    );
    assert.ok(m.usedPages <= used);
  };

  const fork = (step: number) => {
    const s = m.seqs[rng.int(m.seqs.length)];
    const shared = Math.min(m.fullPages(s), s.pages), copies = s.pages - shared;
    const op = `fork seq #${s.n} (${shared} page(s) shared, ${copies} copied)`;
    if (m.seqs.length === c.maxSequences || copies > m.freePages) {
      expectRefused(() => s.seq.fork(), "KIVI_ERR_CAPACITY", where(step, op));
      stats.forkRefused++;
      return;
    }
    const child: ModelSeq = {
      seq: s.seq.fork(),
      n: m.created++,
      layers: s.layers.map((ly) => ({
        k: ly.k.map((x) => x.slice()),
        v: ly.v.map((x) => x.slice()),
        qlen: ly.qlen,
        cut: ly.cut,
      })),
      pages: 0,
      ids: s.ids.slice(0, shared),
    };
    m.grow(child, s.pages);
    m.seqs.push(child);
    stats.forked++;
    for (let l = 0; l < L; l++) checkRead(cache, m, child, l, where(step, op));
  };

  const truncate = (step: number) => {
    const s = m.seqs[rng.int(m.seqs.length)];
    const lo = Math.max(...s.layers.map((l) => l.qlen)),
      hi = Math.min(...s.layers.map((l) => l.k.length));
    const op = `truncate seq #${s.n} (window ${lo}..${hi})`;
    if (lo > hi || rng.next() < 0.1) { // past the window (or above a layer's length): refused
      const bad = lo > 0 && rng.next() < 0.5
        ? lo - 1
        : Math.max(...s.layers.map((l) => l.k.length)) + 1;
      if (!(lo > hi) && bad >= lo && bad <= hi) return;
      expectRefused(() => s.seq.truncate(bad), "KIVI_ERR_ARG", where(step, `${op} to ${bad}`));
      return;
    }
    const length = lo + rng.int(hi - lo + 1);
    s.seq.truncate(length);
    for (const ly of s.layers) {
      if (ly.k.length > length) ly.cut = true;
      ly.k.length = length;
      ly.v.length = length;
    }
    stats.truncated++;
    for (let l = 0; l < L; l++) checkRead(cache, m, s, l, where(step, `${op} to ${length}`));
  };

  const attendMulti = (step: number) => {
    const layer = rng.int(L);
    const ready = m.seqs.filter((s) => s.layers[layer].k.length > 0);
    if (ready.length === 0) return;
    const batch = Array.from({ length: 1 + rng.int(3) }, () => ready[rng.int(ready.length)]);
    const qlens = batch.map((s) => {
      const len = s.layers[layer].k.length;
      return rng.next() < 0.2 ? len : 1 + rng.int(Math.min(len, 24));
    });
    const tokens = qlens.reduce((a, b) => a + b);
    const q = Float32Array.from({ length: tokens * QH * D }, () => rng.normal() * 2);
    const scale = Math.fround(rng.uniform(0.5, 1.5) / Math.sqrt(D));
    const lse = new Float32Array(tokens * QH);
    const op = `attendMulti layer ${layer} over seqs ${batch.map((x) => `#${x.n}`)} qlens ${qlens}`;
    const out = cache.attendMulti(layer, batch.map((s) => s.seq), qlens, q, {
      scale,
      lse,
    }) as Float32Array;
    let t0 = 0;
    batch.forEach((s, b) => {
      const ly = s.layers[layer], len = ly.k.length, n = qlens[b];
      const { kf, vf, maxV } = flatKV(ly.k, ly.v, H * D);
      for (let i = 0; i < n; i++) { // query i sees len - n + i + 1 tokens
        const row = (t0 + i) * QH * D;
        const want = attentionOracle(
          kf,
          vf,
          q.subarray(row, row + QH * D),
          len - n + i + 1,
          c,
          scale,
        );
        for (let j = 0; j < want.length; j++) {
          const tol = 2 ** -23 * Math.abs(want[j]) + 2 ** -30 * maxV;
          if (!(Math.abs(out[row + j] - want[j]) <= tol)) {
            fail(
              `${where(step, op)}: batch ${b} query ${i} output ${j} is ${out[row + j]}, model ${
                want[j]
              }`,
            );
          }
        }
      }
      for (let j = 0; j < n * QH; j++) {
        if (!Number.isFinite(lse[t0 * QH + j])) {
          fail(`${where(step, op)}: lse ${j} is ${lse[t0 * QH + j]}`);
        }
      }
      t0 += n;
    });
    stats.multi++;
  };

  create(0);
  for (let step = 1; step <= STEPS; step++) {
    const live = m.seqs.length;
    const roll = rng.next();
    if (live === 0 || roll < 0.1) create(step);
    else if (roll < 0.17) free(step);
    else if (roll < 0.32) attend(step);
    else if (roll < 0.38) fork(step);
    else if (roll < 0.44) truncate(step);
    else if (roll < 0.5) attendMulti(step);
    else {
      const s = m.seqs[rng.int(live)];
      const prefill = rng.next() < 0.35;
      const n = prefill ? 2 + rng.int(3 * c.pageTokens) : 1;
      append(step, s, n, rng.next() < 0.5 ? undefined : rng.int(L));
    }
    checkState(cache, m, tableBytes, where(step, "after the step"));
    stats.steps++;
  }
  // Every sequence's contents once more, after all the others' appends, frees and reuse.
  for (const s of m.seqs) {
    for (let l = 0; l < L; l++) checkRead(cache, m, s, l, `${tag} at the end`);
  }
  return stats;
}

/** A sequence layer's model K/V (a row a token) as float64 [len][kvHeads * headDim], with the
 * largest |v|. */
function flatKV(k: ArrayLike<number>[], v: ArrayLike<number>[], row: number) {
  const kf = new Float64Array(k.length * row), vf = new Float64Array(k.length * row);
  let maxV = 0;
  for (let t = 0; t < k.length; t++) {
    kf.set(k[t], t * row);
    vf.set(v[t], t * row);
    for (let j = 0; j < v[t].length; j++) maxV = Math.max(maxV, Math.abs(v[t][j]));
  }
  return { kf, vf, maxV };
}

describe("the cache against a float64 model, random operations", () => {
  const totals = noStats();
  RUNS.forEach((spec, r) => {
    // Bun's default of 5 s per test would cut a long run short: allow 200 ms a step.
    it(`${spec.name}: ${STEPS} steps`, { timeout: Math.max(60_000, STEPS * 200) }, async () => {
      const s = await run(r);
      console.log(`property run ${r} (${spec.name}): ${JSON.stringify(s)}`);
      for (const k of Object.keys(totals) as (keyof typeof totals)[]) totals[k] += s[k];
      assert.ok(s.appended > 0 && s.attended > 0, `run ${r} did something: ${JSON.stringify(s)}`);
    });
  });
  // With the default budget or more, the seeds must have reached every kind of step; a change to
  // the generator that stops exercising one is caught here.
  it("the runs together filled the pool, the slots, hit NaNs and reused freed pages", () => {
    console.log(`property totals: ${JSON.stringify(totals)}`);
    assert.ok(totals.flushed > 0, `tokens quantized: ${JSON.stringify(totals)}`);
    if (STEPS >= 100) {
      for (const k of ["full", "nan", "slots", "reused", "forked", "truncated", "multi"] as const) {
        assert.ok(totals[k] > 0, `${k}: ${JSON.stringify(totals)}`);
      }
    }
  });
});
