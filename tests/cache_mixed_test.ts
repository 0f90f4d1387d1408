/**
 * Per-layer formats (mixed precision) on the CPU reference: each layer of a mixed cache holds the
 * bits a single-format cache of that layer's format holds for the same input (appended to every
 * layer at once or one layer at a time), its attention matches the float64 oracle over its own
 * read(), appends stay all or nothing, and the memory report gives each layer's bits per value.
 */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import type { CacheFormat, CacheOptions, LayerFormat } from "../src/mod.ts";
import {
  cacheBitsPerValue,
  KiviError,
  pageBytes,
  readPlan,
  resolveCacheOptions,
} from "../src/mod.ts";
import { configArray } from "../src/cache.ts";
import { attentionOracle, CB2_G64, CB4_G32, kvRows, openCpu, Rng } from "./_helpers.ts";
import { U2_G32, U2_G64, U4_G32, U4_G64 } from "./_helpers.ts";

const kivi = await openCpu();
const H = 2, QH = 8, D = 64;
/** Six layers, each of another format pair: uniform, codebook, 4-bit, 16, and the tensor-core pair. */
const LAYERS: { keys: CacheFormat; values: CacheFormat }[] = [
  { keys: U2_G32, values: U2_G32 },
  { keys: U4_G32, values: CB2_G64 },
  { keys: { bits: 16 }, values: U2_G64 },
  { keys: CB4_G32, values: U4_G64 },
  { keys: U2_G32, values: { bits: 16 } },
  { keys: U2_G32, values: CB2_G64 },
];
const PER_LAYER: LayerFormat[] = LAYERS.map((f, layer) => ({ layer, ...f }));
const BASE = {
  kvHeads: H,
  queryHeads: QH,
  headDim: D,
  pageTokens: 64,
  residual: 32,
  maxPages: 64,
} as const;

function mixed(extra: Partial<CacheOptions> = {}) {
  return kivi.createCache({ ...BASE, layers: LAYERS.length, perLayer: PER_LAYER, ...extra });
}

describe("a cache with per-layer formats", () => {
  it("holds in each layer what a single-format cache of that layer's format holds, appended to all layers at once or per layer", () => {
    const rng = new Rng("mixed read");
    const n = 203, L = LAYERS.length;
    const k = kvRows(rng, n, H, D, L), v = kvRows(rng, n, H, D, L);
    using all = mixed();
    using per = mixed();
    const a = all.createSequence(), p = per.createSequence();
    a.append(k, v);
    const row = n * H * D;
    for (let l = L - 1; l >= 0; l--) { // per layer, in another order
      p.append(k.subarray(l * row, (l + 1) * row), v.subarray(l * row, (l + 1) * row), {
        layer: l,
      });
    }
    for (let l = 0; l < L; l++) {
      using one = kivi.createCache({ ...BASE, layers: 1, ...LAYERS[l] });
      const s = one.createSequence();
      s.append(k.subarray(l * row, (l + 1) * row), v.subarray(l * row, (l + 1) * row), {
        layer: 0,
      });
      const want = one.read(s, 0);
      assert.equal(a.quantizedLength(l), s.quantizedLength(0), `layer ${l} ${rng.tag}`);
      assert.deepEqual(all.read(a, l), want, `layer ${l} appended with all ${rng.tag}`);
      assert.deepEqual(per.read(p, l), want, `layer ${l} appended alone ${rng.tag}`);
    }
  });

  it("attends each layer with its own format, as the float64 oracle over its read(), through decode steps", () => {
    const rng = new Rng("mixed attend");
    const L = LAYERS.length;
    using cache = mixed();
    const seqs = [1, 31, 64, 97, 150].map((n) => {
      const s = cache.createSequence();
      s.append(kvRows(rng, n, H, D, L), kvRows(rng, n, H, D, L));
      return s;
    });
    const scale = Math.fround(0.11);
    for (let step = 0; step < 3; step++) {
      for (let l = 0; l < L; l++) {
        const q = kvRows(rng, seqs.length, QH, D);
        const out = cache.attend(l, seqs, q, { scale }) as Float32Array;
        seqs.forEach((s, b) => {
          const { keys, values } = cache.read(s, l);
          const qb = q.subarray(b * QH * D, (b + 1) * QH * D);
          const want = attentionOracle(
            keys as Float32Array,
            values as Float32Array,
            qb,
            s.length(l),
            cache.config,
            scale,
          );
          const got = out.subarray(b * QH * D, (b + 1) * QH * D);
          let big = 0;
          for (const w of want) big = Math.max(big, Math.abs(w));
          for (let i = 0; i < want.length; i++) {
            // fp32 output of a float64 sum (cache_test.ts derives the bound)
            assert.ok(
              Math.abs(got[i] - want[i]) <= 1e-6 * (Math.abs(want[i]) + big * 1e-3),
              `layer ${l} seq ${b} step ${step} element ${i}: ${got[i]} vs ${want[i]} ${rng.tag}`,
            );
          }
        });
      }
      for (const s of seqs) s.append(kvRows(rng, 33, H, D, L), kvRows(rng, 33, H, D, L));
    }
  });

  it("refuses an append needing more pages than are free and changes nothing", () => {
    const rng = new Rng("mixed full");
    const L = LAYERS.length;
    using cache = mixed({ maxPages: 3 });
    const s = cache.createSequence();
    s.append(kvRows(rng, 100, H, D, L), kvRows(rng, 100, H, D, L));
    const before = Array.from({ length: L }, (_, l) => cache.read(s, l));
    const mem = cache.memory();
    assert.throws(
      () => s.append(kvRows(rng, 200, H, D, L), kvRows(rng, 200, H, D, L)),
      (e: unknown) => e instanceof KiviError && e.code === "KIVI_ERR_CAPACITY",
    );
    assert.deepEqual(Array.from({ length: L }, (_, l) => cache.read(s, l)), before);
    assert.deepEqual(cache.memory(), mem);
  });

  it("reports each layer's bits per value and their mean, and sizes its pages per layer", () => {
    using cache = mixed();
    const m = cache.memory();
    // K and V bits of each layer: 2-bit G32 uniform 3, 4-bit G32 5, codebook 2 G64 3, 16,
    // uniform 2 G64 2.5, codebook 4 G32 12, uniform 4 G64 4.5
    assert.deepEqual(m.layerBitsPerValue, [3, 4, 9.25, 8.25, 9.5, 3]);
    assert.equal(m.formatBitsPerValue, (3 + 4 + 9.25 + 8.25 + 9.5 + 3) / 6);
    assert.equal(cacheBitsPerValue(cache.config), m.formatBitsPerValue);
    const s = cache.createSequence();
    const rng = new Rng("mixed memory");
    s.append(kvRows(rng, 96, H, D, 6), kvRows(rng, 96, H, D, 6));
    const after = cache.memory();
    assert.equal(after.pagesUsed, 1);
    // one page in use: its bytes in all layers are the codes and params
    assert.equal(after.codeBytes + after.paramBytes, pageBytes(cache.config));
    assert.equal(
      (after.codeBytes + after.paramBytes) * 8 / (6 * 2 * 64 * H * D),
      m.formatBitsPerValue,
    );
  });

  it("keeps a single-format cache's config array as it was (no per-layer fields)", () => {
    const one = resolveCacheOptions({ ...BASE, layers: 2, keys: U2_G32, values: U2_G32 });
    assert.equal(one.perLayer, undefined);
    const same = resolveCacheOptions({
      ...BASE,
      layers: 2,
      keys: U2_G32,
      values: U2_G32,
      perLayer: [{ layer: [0, 1], keys: U4_G32 }],
    });
    assert.deepEqual(same.perLayer?.map((l) => l.keys.bits), [4, 4]);
    assert.deepEqual(same.perLayer?.map((l) => l.values.bits), [2, 2]);
    // kivi.h: KIVI_CFG_FIELDS (18) ints, then KIVI_LAYER_FIELDS (10) a layer only with perLayer
    assert.equal(configArray(one).length, 18);
    assert.deepEqual([...configArray(same).subarray(18)], [
      0,
      4,
      32,
      0,
      1,
      0,
      2,
      32,
      0,
      1,
      0,
      4,
      32,
      0,
      1,
      0,
      2,
      32,
      0,
      1,
    ]);
  });

  it("takes a plan's JSON (round trip through JSON.stringify) as perLayer", () => {
    const plan = {
      kivi: "plan",
      version: 1,
      budget: 3.3,
      bitsPerValue: 3.25,
      residual: 32,
      predictedKl: 1e-3,
      layers: LAYERS.length,
      keys: LAYERS[0].keys,
      values: LAYERS[0].values,
      perLayer: PER_LAYER,
      calibration: { windows: 1, window: 512, prefill: 256, steps: 8 },
      sensitivity: [],
    };
    const back = readPlan(JSON.stringify(plan));
    assert.deepEqual(back, plan);
    using cache = kivi.createCache({
      ...BASE,
      layers: LAYERS.length,
      keys: back.keys,
      values: back.values,
      perLayer: back.perLayer,
      residual: back.residual,
    });
    assert.deepEqual(
      cache.config.perLayer?.map((l) => [l.keys.bits, l.values.bits]),
      LAYERS.map((l) => [l.keys.bits, l.values.bits]),
    );
    assert.throws(() => readPlan("{"), TypeError);
    assert.throws(() => readPlan({ kivi: "plan", version: 2 }), /plan\.version must be 1, got 2/);
    assert.throws(() => readPlan([]), /plan must be an object with kivi: "plan"/);
  });
});
