/**
 * Bad input to the paged cache, each checked twice: the error (its class or KiviError code, and a
 * message naming the argument and the expected value) and that nothing changed. "Nothing changed"
 * is a snapshot taken before and after: the attention output of every layer for a fixed query, the
 * memory report, each sequence's lengths per layer, block table and dequantized K/V, the live
 * sequences, and the backend's live tensors and native references. docs/errors.md lists each
 * kind with the test that covers it.
 */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import type { Backend, CacheOptions, KVCache, Sequence } from "../src/mod.ts";
import { KiviError } from "../src/mod.ts";
import { assertUntouched, cacheOptions, DTYPES, kvRows, NONFINITE, openCpu } from "./_helpers.ts";
import {
  type ErrorCase,
  expectCases,
  Rng,
  sentinel,
  setRaw,
  throwsNaming,
  toInput,
} from "./_helpers.ts";

const L = 2, H = 2, QH = 4, D = 64, ROW = H * D;
const OPTS = cacheOptions(L, H, QH, D, 8, 3);

/** A cache with two sequences holding pages and window tokens in both layers (4 of 8 pages used). */
interface Fixture {
  kivi: Backend;
  cache: KVCache;
  seqs: Sequence[];
  q: Float32Array;
  rng: Rng;
}
/** A new sequence of `cache` holding n seeded tokens in every layer. */
function filled(cache: KVCache, rng: Rng, n: number): Sequence {
  const s = cache.createSequence();
  s.append(kvRows(rng, n, H, D, L), kvRows(rng, n, H, D, L));
  return s;
}
async function fixture(label: string): Promise<Fixture> {
  const rng = new Rng(`errors cache ${label}`);
  const kivi = await openCpu();
  const cache = kivi.createCache(OPTS);
  const a = filled(cache, rng, 150); // 96 tokens in 3 pages, 54 in the window
  const b = filled(cache, rng, 70); // 32 in 1 page, 38 in the window
  return { kivi, cache, seqs: [a, b], q: kvRows(rng, 2, QH, D), rng };
}

function snapshot(f: Fixture) {
  const c = f.cache;
  return {
    outs: Array.from({ length: L }, (_, l) => c.attend(l, f.seqs, f.q)),
    mem: c.memory(),
    seqs: f.seqs.map((s) => ({
      lens: Array.from({ length: L }, (_, l) => [s.length(l), s.quantizedLength(l)]),
      pages: [...s.pages()],
      reads: Array.from({ length: L }, (_, l) => c.read(s, l)),
    })),
    live: c.sequences.length,
    tensors: f.kivi.liveTensors,
    refs: f.kivi._nativeRefs,
  };
}

describe("cache options out of range", () => {
  it("each bad option is a TypeError or RangeError naming it; no cache is made and the others are unchanged", async () => {
    const f = await fixture("options");
    using _ = f.kivi;
    const base = { layers: 1, kvHeads: 2, headDim: 64, maxPages: 4 } as CacheOptions;
    const make = (o: Partial<CacheOptions> | null) => () =>
      f.kivi.createCache(o === null ? (null as unknown as CacheOptions) : { ...base, ...o });
    const uni = { kind: "uniform", bits: 2 } as const;
    const R = RangeError, T = TypeError;
    expectCases(f, snapshot, [
      ["options null", make(null), T, /options must be an object, got null/],
      ["layers 0", make({ layers: 0 }), R, /layers must be between 1 and 4096, got 0/],
      ["layers negative", make({ layers: -2 }), R, /layers must be between 1 and 4096, got -2/],
      ["layers fractional", make({ layers: 1.5 }), R, /layers must be an integer, got 1\.5/],
      [
        "layers huge",
        make({ layers: 2 ** 53 }),
        R,
        /layers must be between 1 and 4096, got 9007199254740992/,
      ],
      ["layers NaN", make({ layers: NaN }), R, /layers must be an integer, got NaN/],
      [
        "layers a string",
        make({ layers: "2" as unknown as number }),
        T,
        /layers must be a number, got "2"/,
      ],
      ["kvHeads fractional", make({ kvHeads: 0.5 }), R, /kvHeads must be an integer, got 0\.5/],
      [
        "queryHeads not a multiple",
        make({ kvHeads: 4, queryHeads: 6 }),
        R,
        /queryHeads must be a multiple of kvHeads \(4\) at most 32 times it, got 6/,
      ],
      [
        "queryHeads over 32x",
        make({ kvHeads: 2, queryHeads: 66 }),
        R,
        /queryHeads must be a multiple of kvHeads \(2\) at most 32 times it, got 66/,
      ],
      ["headDim 96", make({ headDim: 96 }), R, /headDim must be one of 64, 128, 256, got 96/],
      [
        "headDim a string",
        make({ headDim: "64" as unknown as 64 }),
        T,
        /headDim must be one of 64, 128, 256, got "64"/,
      ],
      [
        "keys.bits 3",
        make({ keys: { kind: "uniform", bits: 3 as 2 } }),
        R,
        /keys\.bits must be one of 2, 4, 16, got 3/,
      ],
      [
        "values.bits 8",
        make({ values: { kind: "uniform", bits: 8 as 2 } }),
        R,
        /values\.bits must be one of 2, 4, 16, got 8/,
      ],
      [
        "keys.group 48",
        make({ keys: { ...uni, group: 48 as 32 } }),
        R,
        /keys\.group must be one of 32, 64, 128, got 48/,
      ],
      [
        "values.group not dividing headDim",
        make({ values: { ...uni, group: 128 } }),
        R,
        /values\.group must divide headDim \(64\), got 128/,
      ],
      [
        "keys.kind",
        make({ keys: { kind: "linear" as "uniform", bits: 2 } }),
        R,
        /keys\.kind must be one of "uniform", "codebook", got "linear"/,
      ],
      [
        "keys null",
        make({ keys: null as unknown as undefined }),
        T,
        /keys must be a format object, got null/,
      ],
      [
        "values.iterations 0",
        make({ values: { kind: "codebook", bits: 2, iterations: 0 } }),
        R,
        /values\.iterations must be between 1 and 256, got 0/,
      ],
      [
        "values.fit",
        make({ values: { kind: "codebook", bits: 2, fit: "loose" as "free" } }),
        R,
        /values\.fit must be one of "free", "pinned", got "loose"/,
      ],
      [
        "pageTokens 48",
        make({ pageTokens: 48 }),
        R,
        /pageTokens must be one of 32, 64, 128, 256, got 48/,
      ],
      [
        "pageTokens not a multiple of keys.group",
        make({ pageTokens: 32, keys: { ...uni, group: 64 } }),
        R,
        /pageTokens must be a multiple of keys\.group \(64\), got 32/,
      ],
      [
        "residual not a multiple of keys.group",
        make({ residual: 40 }),
        R,
        /residual must be a multiple of keys\.group \(32\), got 40/,
      ],
      [
        "residual negative",
        make({ residual: -32 }),
        R,
        /residual must be between 0 and 1048576, got -32/,
      ],
      ["maxPages 0", make({ maxPages: 0 }), R, /maxPages must be between 1 and 1073741824, got 0/],
      [
        "maxPages huge",
        make({ maxPages: 2 ** 40 }),
        R,
        /maxPages must be between 1 and 1073741824, got 1099511627776/,
      ],
      [
        "maxPages and budgetBytes",
        make({ budgetBytes: 1 << 20 }),
        T,
        /give maxPages or budgetBytes, not both/,
      ],
      [
        "neither maxPages nor budgetBytes",
        make({ maxPages: undefined }),
        T,
        /give maxPages or budgetBytes to size the page pool/,
      ],
      [
        "budgetBytes below one page",
        make({ maxPages: undefined, budgetBytes: 100 }),
        R,
        /budgetBytes must hold at least one page \(\d+ bytes\), got 100/,
      ],
      [
        "maxSequences 0",
        make({ maxSequences: 0 }),
        R,
        /maxSequences must be between 1 and 65536, got 0/,
      ],
      // In range for every field, but ~2^58 bytes: the library's allocation fails and says what it tried.
      [
        "pool too large to allocate",
        make({ layers: 4096, kvHeads: 4096, headDim: 256, maxPages: 1 << 20 }),
        "KIVI_ERR_NOMEM",
        /kivi_cache_create: could not allocate the pool \(4096 layers x 1048576 pages/,
      ],
    ]);
  });
});

describe("per-layer formats with bad input", () => {
  it("a bad perLayer (a layer out of range or named twice, a format the cache cannot hold) is a TypeError or RangeError naming the entry; no cache is made", async () => {
    const f = await fixture("perLayer");
    using _ = f.kivi;
    const base = { layers: 2, kvHeads: 2, headDim: 64, maxPages: 4, residual: 32 } as CacheOptions;
    const make = (perLayer: unknown) => () =>
      f.kivi.createCache({ ...base, perLayer } as CacheOptions);
    const u4 = { kind: "uniform", bits: 4, group: 32 } as const;
    const R = RangeError, T = TypeError;
    expectCases(f, snapshot, [
      [
        "perLayer not an array",
        make({ layer: 0 }),
        T,
        /perLayer must be an array of \{ layer, keys\?, values\? \}, got/,
      ],
      [
        "an entry null",
        make([null]),
        T,
        /perLayer\[0\] must be an object \{ layer, keys\?, values\? \}, got null/,
      ],
      [
        "a layer out of range",
        make([{ layer: 2, keys: u4 }]),
        R,
        /perLayer\[0\]\.layer must be between 0 and 1, got 2/,
      ],
      [
        "a negative layer",
        make([{ layer: -1, keys: u4 }]),
        R,
        /perLayer\[0\]\.layer must be between 0 and 1, got -1/,
      ],
      [
        "a range past the last layer",
        make([{ layer: [0, 5], keys: u4 }]),
        R,
        /perLayer\[0\]\.layer\[1\] must be between 0 and 1, got 5/,
      ],
      [
        "a reversed range",
        make([{ layer: [1, 0], keys: u4 }]),
        R,
        /perLayer\[0\]\.layer\[1\] must be between 1 and 1, got 0/,
      ],
      [
        "a range of three",
        make([{ layer: [0, 1, 1], keys: u4 }]),
        T,
        /perLayer\[0\]\.layer must be a layer or \[from, to\], got/,
      ],
      [
        "a layer named twice",
        make([{ layer: 1, keys: u4 }, { layer: [0, 1], values: u4 }]),
        R,
        /perLayer\[1\]\.layer names layer 1, which perLayer\[0\] already names/,
      ],
      [
        "keys.bits 3",
        make([{ layer: 0, keys: { kind: "uniform", bits: 3 } }]),
        R,
        /perLayer\[0\]\.keys\.bits must be one of 2, 4, 16, got 3/,
      ],
      [
        "a key group other than the cache's",
        make([{ layer: 0, keys: { kind: "uniform", bits: 4, group: 64 } }]),
        R,
        /perLayer\[0\]\.keys\.group must be the cache's keys\.group \(32\), the flush unit all layers share, got 64/,
      ],
      [
        "a value group that does not divide headDim",
        make([{ layer: 1, values: { kind: "uniform", bits: 2, group: 128 } }]),
        R,
        /perLayer\[0\]\.values\.group must divide headDim \(64\), got 128/,
      ],
      [
        "an unknown key",
        make([{ layer: 0, key: u4 }]),
        T,
        /perLayer\[0\] has an unknown key "key"/,
      ],
    ]);
  });
});

describe("appends with bad input", () => {
  it("wrong types, dtypes, lengths and layers are TypeErrors or RangeErrors naming the argument", async () => {
    const f = await fixture("append args");
    using _ = f.kivi;
    const [s] = f.seqs;
    const k1 = kvRows(f.rng, 3, H, D), kAll = kvRows(f.rng, 3, H, D, L);
    expectCases(f, snapshot, [
      [
        "k a plain array",
        () => s.append([0.5] as unknown as Float32Array, k1, { layer: 0 }),
        TypeError,
        /\bk must be a typed array or DeviceTensor, got \[0\.5\]/,
      ],
      [
        "k a Float64Array",
        () => s.append(new Float64Array(k1) as unknown as Float32Array, k1, { layer: 0 }),
        TypeError,
        /\bk must be a Float32Array, Float16Array or Uint16Array, got Float64Array/,
      ],
      [
        "v an Int32Array",
        () => s.append(k1, new Int32Array(k1.length) as unknown as Float32Array, { layer: 0 }),
        TypeError,
        /\bv must be a Float32Array, Float16Array or Uint16Array, got Int32Array/,
      ],
      [
        "k f32, v f16",
        () => s.append(k1, Float16Array.from(k1), { layer: 0 }),
        TypeError,
        /k and v must have the same dtype, got f32 and f16/,
      ],
      [
        "k.length not a multiple of a row",
        () => s.append(k1.subarray(0, 100), k1.subarray(0, 100), { layer: 0 }),
        TypeError,
        /k\.length must be a positive multiple of kvHeads \(2\) x headDim \(64\) = 128, got 100/,
      ],
      [
        "one layer's rows for every layer",
        () => s.append(k1.subarray(0, ROW), k1.subarray(0, ROW)),
        TypeError,
        /k\.length must be a positive multiple of layers \(2\) x kvHeads \(2\) x headDim \(64\) = 256, got 128/,
      ],
      [
        "empty k",
        () => s.append(new Float32Array(0), new Float32Array(0), { layer: 0 }),
        TypeError,
        /k\.length must be a positive multiple of .* = 128, got 0/,
      ],
      [
        "v shorter than k",
        () => s.append(kAll, kAll.subarray(0, 2 * ROW)),
        TypeError,
        /v\.length must equal k\.length \(768\), got 256/,
      ],
      [
        "layer past the last",
        () => s.append(k1, k1, { layer: L }),
        RangeError,
        /\blayer must be between 0 and 1, got 2/,
      ],
      [
        "layer negative",
        () => s.append(k1, k1, { layer: -1 }),
        RangeError,
        /\blayer must be between 0 and 1, got -1/,
      ],
      [
        "layer fractional",
        () => s.append(k1, k1, { layer: 0.5 }),
        RangeError,
        /\blayer must be an integer, got 0\.5/,
      ],
      [
        "opts null",
        () => s.append(k1, k1, null as unknown as undefined),
        TypeError,
        /options must be an object, got null/,
      ],
    ]);
  });

  for (const dtype of DTYPES) {
    it(`${dtype}: NaN, +Inf and -Inf in k or v are KIVI_ERR_NONFINITE naming the array and index`, async () => {
      const f = await fixture(`append nonfinite ${dtype}`);
      using _ = f.kivi;
      const cases: ErrorCase[] = [];
      for (const [label, bits] of NONFINITE[dtype]) {
        for (const where of ["k", "v"] as const) {
          for (const layer of [undefined, 1]) {
            const n = 1 + f.rng.int(80), rows = n * (layer === undefined ? L : 1);
            const k = toInput(kvRows(f.rng, rows, H, D), dtype).x,
              v = toInput(kvRows(f.rng, rows, H, D), dtype).x;
            const at = f.rng.int(k.length);
            setRaw(where === "k" ? k : v, at, bits);
            const names = new RegExp(
              `kivi_cache_append: ${where} must be finite, got ${
                label.replace("+", "\\+")
              } at index ${at} \\(layer ${layer ?? Math.floor(at / (n * ROW))}, token ${
                Math.floor(at / ROW) % n
              }`,
            );
            cases.push([
              `${label} in ${where}, layer ${layer ?? "all"}, ${n} tokens`,
              () => f.seqs[1].append(k, v, { layer, dtype }),
              "KIVI_ERR_NONFINITE",
              names,
            ]);
          }
        }
      }
      expectCases(f, snapshot, cases);
    });
  }

  it("a finite value beyond fp16's range (which the cache stores) is a RangeError naming the array and index", async () => {
    const f = await fixture("append fp16 range");
    using _ = f.kivi;
    const k = kvRows(f.rng, 5, H, D, L), v = kvRows(f.rng, 5, H, D, L);
    const big = v.slice();
    big[333] = -1e5;
    const bf = toInput(kvRows(f.rng, 5, H, D), "bf16").x, bfBig = bf.slice();
    bfBig[17] = toInput([3e30], "bf16").x[0];
    const kEdge = k.slice();
    kEdge[0] = 65520; // the first value fp16 rounds to Inf
    using kt = f.kivi.upload(k), bigT = f.kivi.upload(big);
    expectCases(f, snapshot, [
      [
        "-1e5 in v",
        () => f.seqs[0].append(k, big),
        RangeError,
        /\bv must hold values below 65520 in magnitude \(the cache stores fp16\), got -100000 at index 333 \(layer 0, token 2, head 1, channel 13\)/,
      ],
      [
        "65520 in k",
        () => f.seqs[0].append(kEdge, v),
        RangeError,
        /\bk must hold values below 65520 in magnitude.*got 65520 at index 0\b/,
      ],
      [
        "3e30 in bf16 k",
        () => f.seqs[0].append(bfBig, bf, { layer: 1, dtype: "bf16" }),
        RangeError,
        /\bk must hold values below 65520 in magnitude.*at index 17 \(layer 1, token 0, head 0, channel 17\)/,
      ],
      // The CPU backend's tensors are host memory and scanned too.
      [
        "-1e5 in a v tensor",
        () => f.seqs[0].append(kt, bigT),
        RangeError,
        /\bv must hold values below 65520 in magnitude.*got -100000 at index 333\b/,
      ],
    ]);
    // The largest value below the limit is accepted (it rounds to fp16's largest finite, 65504).
    const ok = k.slice();
    ok[0] = 65519;
    f.seqs[0].append(ok, v);
    assert.equal((f.cache.read(f.seqs[0], 0).keys as Float32Array)[150 * ROW], 65504);
  });

  it("a prefill that needs more pages than are free is KIVI_ERR_CAPACITY naming the pages", async () => {
    const f = await fixture("capacity prefill");
    using _ = f.kivi;
    // 300 more tokens for b (70 held, 32 in its one page): 370 - 32 - R = 306 over the window, so
    // 288 flush and b needs 320 / 32 = 10 pages, 9 more than it has; 4 are free.
    const k = kvRows(f.rng, 300, H, D, L), v = kvRows(f.rng, 300, H, D, L);
    expectCases(f, snapshot, [
      [
        "prefill of 300",
        () => f.seqs[1].append(k, v),
        "KIVI_ERR_CAPACITY",
        /the page pool is full: sequence \d+ needs 9 more page\(s\), 4 of 8 are free/,
      ],
      [
        "prefill of 300 in one layer",
        () => f.seqs[1].append(k.subarray(0, 300 * ROW), v.subarray(0, 300 * ROW), { layer: 1 }),
        "KIVI_ERR_CAPACITY",
        /needs 9 more page\(s\), 4 of 8 are free/,
      ],
    ]);
  });

  it("decode steps past maxPages end in KIVI_ERR_CAPACITY at the step that needs a page, changing nothing", async () => {
    const f = await fixture("capacity decode");
    using _ = f.kivi;
    const [a] = f.seqs;
    let steps = 0;
    for (;;) {
      const k = kvRows(f.rng, 1, H, D, L), v = kvRows(f.rng, 1, H, D, L);
      const before = snapshot(f);
      try {
        a.append(k, v);
      } catch (e) {
        assert.ok(e instanceof KiviError && e.code === "KIVI_ERR_CAPACITY", `step ${steps}: ${e}`);
        assert.match(
          e.message,
          /the page pool is full: sequence \d+ needs 1 more page\(s\), 0 of 8 are free/,
        );
        assert.deepEqual(snapshot(f), before, `${f.rng.tag} the failed step changed the cache`);
        break;
      }
      steps++;
      assert.ok(steps < 1000, "the pool never filled");
    }
    // a held 150 tokens, 96 of them in 3 pages; the 4 free pages take it to 7 pages (224 quantized
    // tokens) and its window to R + F - 1 = 63 tokens: at 287 tokens the next step flushes into an 8th.
    assert.equal(a.length(0), 96 + 4 * 32 + 63, `${f.rng.tag} length when the pool is full`);
    assert.equal(steps, a.length(0) - 150);
    assert.equal(f.cache.memory().pagesUsed, 8);
  });

  it("a full set of sequence slots is KIVI_ERR_CAPACITY naming the slots", async () => {
    const f = await fixture("slots");
    using _ = f.kivi;
    filled(f.cache, f.rng, 1);
    expectCases(f, snapshot, [[
      "a 4th sequence",
      () => f.cache.createSequence(),
      "KIVI_ERR_CAPACITY",
      /kivi_cache_seq_create: all 3 sequence slots are taken \(free one with kivi_cache_seq_free\)/,
    ]]);
  });
});

describe("attention with bad input", () => {
  it("wrong layers, batches, queries, scales and outputs are TypeErrors or RangeErrors naming the argument", async () => {
    const f = await fixture("attend args");
    using _ = f.kivi;
    using other = f.kivi.createCache(OPTS);
    using foreign = filled(other, f.rng, 2);
    const { cache, seqs, q } = f;
    const out = sentinel(new Float32Array(q.length));
    const at = (o: Record<string, unknown>) => () => cache.attend(0, seqs, q, o);
    expectCases(f, snapshot, [
      [
        "layer past the last",
        () => cache.attend(L, seqs, q),
        RangeError,
        /\blayer must be between 0 and 1, got 2/,
      ],
      [
        "layer fractional",
        () => cache.attend(0.5, seqs, q),
        RangeError,
        /\blayer must be an integer, got 0\.5/,
      ],
      [
        "no sequences",
        () => cache.attend(0, [], q),
        TypeError,
        /seqs must be a non-empty array of Sequences, got \[\]/,
      ],
      [
        "a Sequence, not an array",
        () => cache.attend(0, seqs[0] as unknown as Sequence[], q),
        TypeError,
        /seqs must be a non-empty array of Sequences, got Sequence/,
      ],
      [
        "a sequence of another cache",
        () => cache.attend(0, [seqs[0], foreign], q),
        TypeError,
        /seqs\[1\] must be a Sequence of this cache/,
      ],
      [
        "q one short",
        () => cache.attend(0, seqs, q.subarray(1)),
        TypeError,
        /\bq must hold batch \(2\) x queryHeads \(4\) x headDim \(64\) = 512 values, got 511/,
      ],
      [
        "q for one sequence",
        () => cache.attend(0, seqs, q.subarray(0, 256)),
        TypeError,
        /\bq must hold batch \(2\) .* = 512 values, got 256/,
      ],
      [
        "q a Float64Array",
        () => cache.attend(0, seqs, new Float64Array(q) as unknown as Float32Array),
        TypeError,
        /\bq must be a Float32Array, Float16Array or Uint16Array, got Float64Array/,
      ],
      [
        "scale NaN",
        at({ scale: NaN }),
        RangeError,
        /scale must be a number finite in fp32 \(below 3\.4e38 in magnitude\), got NaN/,
      ],
      [
        "scale Infinity",
        at({ scale: -Infinity }),
        RangeError,
        /scale must be a number finite in fp32.*got -Infinity/,
      ],
      [
        "scale beyond fp32",
        at({ scale: 1e39 }),
        RangeError,
        /scale must be a number finite in fp32.*got 1e\+39/,
      ],
      [
        "scale a string",
        at({ scale: "0.1" }),
        RangeError,
        /scale must be a number finite in fp32.*got "0\.1"/,
      ],
      [
        "dtype f64",
        at({ dtype: "f64" }),
        RangeError,
        /\bdtype must be one of "f32", "f16", "bf16", got "f64"/,
      ],
      [
        "out one short",
        at({ out: out.buf.subarray(1) }),
        TypeError,
        /\bout must be a f32 array of 512 values like q/,
      ],
      [
        "out of another dtype",
        at({ out: new Float16Array(512) }),
        TypeError,
        /\bout must be a f32 array of 512 values like q/,
      ],
      [
        "read: a sequence of another cache",
        () => cache.read(foreign, 0),
        TypeError,
        /\bseq must be a Sequence of this cache, got Sequence/,
      ],
      [
        "read: layer past the last",
        () => cache.read(seqs[0], 7),
        RangeError,
        /\blayer must be between 0 and 1, got 7/,
      ],
      [
        "read: dtype f64",
        () => cache.read(seqs[0], 0, "f64" as "f32"),
        RangeError,
        /\bdtype must be one of "f32", "f16", "bf16", got "f64"/,
      ],
    ]);
    assertUntouched(out, "out");
  });

  for (const dtype of DTYPES) {
    it(`${dtype}: NaN, +Inf and -Inf in q are KIVI_ERR_NONFINITE naming q; out untouched`, async () => {
      const f = await fixture(`attend nonfinite ${dtype}`);
      using _ = f.kivi;
      const cases: ErrorCase[] = [];
      const outs: ReturnType<typeof sentinel>[] = [];
      for (const [label, bits] of NONFINITE[dtype]) {
        const q = toInput(f.q, dtype).x;
        const at = f.rng.int(q.length);
        setRaw(q, at, bits);
        const out = sentinel(new Float32Array(f.q.length));
        outs.push(out);
        const names = new RegExp(
          `\\bq must be finite, got ${label.replace("+", "\\+")} at index ${at}\\b`,
        );
        cases.push([
          `${label} in q`,
          () => f.cache.attend(1, f.seqs, q as Float32Array, { out: out.buf, qDtype: dtype }),
          "KIVI_ERR_NONFINITE",
          names,
        ]);
      }
      expectCases(f, snapshot, cases);
      outs.forEach((o, i) => assertUntouched(o, `out ${i}`));
    });
  }

  it("a sequence with no token in the layer is KIVI_ERR_STATE naming it; out untouched", async () => {
    const f = await fixture("attend empty");
    using _ = f.kivi;
    const c = f.cache.createSequence();
    c.append(kvRows(f.rng, 5, H, D), kvRows(f.rng, 5, H, D), { layer: 1 }); // tokens in layer 1 only
    const q = kvRows(f.rng, 3, QH, D);
    const out = sentinel(new Float32Array(q.length));
    expectCases(f, snapshot, [[
      "empty in layer 0",
      () => f.cache.attend(0, [...f.seqs, c], q, { out: out.buf }),
      "KIVI_ERR_STATE",
      /kivi_cache_attend: seqs\[2\] \(sequence \d+\) holds no token in layer 0/,
    ]]);
    assertUntouched(out, "out");
    assert.equal(
      (f.cache.attend(1, [...f.seqs, c], q) as Float32Array).length,
      q.length,
      "layer 1 attends",
    );
  });
});

describe("disposed and freed objects", () => {
  it("a freed sequence is KIVI_ERR_STATE on every use, and its pages went back to the pool", async () => {
    const f = await fixture("freed seq");
    using _ = f.kivi;
    const gone = filled(f.cache, f.rng, 100);
    const used = f.cache.memory().pagesUsed;
    gone.free();
    assert.equal(f.cache.memory().pagesUsed, used - pagesOf(100), "pages returned");
    gone.free(); // idempotent
    const k = kvRows(f.rng, 1, H, D, L);
    const freed = /the sequence was freed; create a new one/;
    expectCases(f, snapshot, [
      ["append", () => gone.append(k, k), "KIVI_ERR_STATE", freed],
      ["length", () => gone.length(0), "KIVI_ERR_STATE", freed],
      ["quantizedLength", () => gone.quantizedLength(1), "KIVI_ERR_STATE", freed],
      ["pages", () => gone.pages(), "KIVI_ERR_STATE", freed],
      ["id", () => gone.id, "KIVI_ERR_STATE", freed],
      ["read", () => f.cache.read(gone, 0), "KIVI_ERR_STATE", freed],
      ["attend", () => f.cache.attend(0, [f.seqs[0], gone], f.q), "KIVI_ERR_STATE", freed],
    ]);
  });

  it("a disposed cache is KIVI_ERR_STATE on every use; the backend and its other caches are unchanged", async () => {
    const f = await fixture("disposed cache");
    using _ = f.kivi;
    const dead = f.kivi.createCache(OPTS);
    const s = filled(dead, f.rng, 40);
    dead.dispose();
    dead.dispose(); // idempotent
    const k = kvRows(f.rng, 1, H, D, L);
    const disposed = /the cache was disposed; create a new one/;
    expectCases(f, snapshot, [
      ["createSequence", () => dead.createSequence(), "KIVI_ERR_STATE", disposed],
      ["attend", () => dead.attend(0, [s], f.q.subarray(0, 256)), "KIVI_ERR_STATE", disposed],
      ["memory", () => dead.memory(), "KIVI_ERR_STATE", disposed],
      ["read", () => dead.read(s, 0), "KIVI_ERR_STATE", disposed],
      ["its sequence", () => s.append(k, k), "KIVI_ERR_STATE", /the sequence was freed/],
    ]);
  });

  it("a disposed backend is KIVI_ERR_STATE on createCache and on its caches; a new backend works", async () => {
    const f = await fixture("disposed backend");
    const { kivi, cache, seqs, q } = f;
    const want = cache.attend(0, seqs, q);
    kivi.dispose();
    throwsNaming(
      () => kivi.createCache(OPTS),
      "KIVI_ERR_STATE",
      /createCache: the backend was disposed; open a new one with openBackend\(\)/,
      "createCache",
    );
    throwsNaming(
      () => cache.attend(0, seqs, q),
      "KIVI_ERR_STATE",
      /the cache was disposed/,
      "attend",
    );
    throwsNaming(() => cache.memory(), "KIVI_ERR_STATE", /the cache was disposed/, "memory");
    throwsNaming(() => seqs[0].append(q, q), "KIVI_ERR_STATE", /the sequence was freed/, "append");
    assert.equal(kivi._nativeRefs, 0, "the context was released");
    // A new backend works: the same seeded fixture gives the same attention as before the dispose.
    const g = await fixture("disposed backend");
    using _ = g.kivi;
    assert.deepEqual(g.cache.attend(0, g.seqs, g.q), want, "a new backend gives the same result");
  });

  it("a disposed tensor as k, v, q or out is KIVI_ERR_STATE naming the tensor", async () => {
    const f = await fixture("disposed tensor");
    using _ = f.kivi;
    const k = f.kivi.upload(kvRows(f.rng, 2, H, D, L)),
      v = f.kivi.upload(kvRows(f.rng, 2, H, D, L));
    const q = f.kivi.upload(f.q), out = f.kivi.upload(new Float32Array(f.q.length));
    using live = f.kivi.upload(f.q);
    for (const t of [k, v, q, out]) t.dispose();
    const disposed = /the tensor was disposed; allocate a new one/;
    using kl = f.kivi.upload(kvRows(f.rng, 2, H, D, L));
    expectCases(f, snapshot, [
      ["k", () => f.seqs[0].append(k, kl), "KIVI_ERR_STATE", disposed],
      ["v", () => f.seqs[0].append(kl, v), "KIVI_ERR_STATE", disposed],
      ["q", () => f.cache.attend(0, f.seqs, q), "KIVI_ERR_STATE", disposed],
      ["out", () => f.cache.attend(0, f.seqs, live, { out }), "KIVI_ERR_STATE", disposed],
    ]);
  });

  it("a tensor of another backend (another device) or of a non-data dtype is refused before the call", async () => {
    const f = await fixture("foreign tensor");
    using _ = f.kivi;
    // Each device has its own backend, so a tensor of another device is one of another backend.
    using b = await openCpu();
    using kb = b.upload(kvRows(f.rng, 2, H, D, L)), qb = b.upload(f.q);
    using ka = f.kivi.upload(kvRows(f.rng, 2, H, D, L));
    using codes = f.kivi.upload(new Uint32Array(2 * L * ROW).fill(7));
    const upload = /belongs to another backend; upload it to this one first/;
    expectCases(f, snapshot, [
      [
        "k of another backend",
        () => f.seqs[0].append(kb, ka),
        TypeError,
        new RegExp(`\\bk ${upload.source}`),
      ],
      [
        "v of another backend",
        () => f.seqs[0].append(ka, kb),
        TypeError,
        new RegExp(`\\bv ${upload.source}`),
      ],
      [
        "q of another backend",
        () => f.cache.attend(0, f.seqs, qb),
        TypeError,
        new RegExp(`\\bq ${upload.source}`),
      ],
      [
        "k a u32 tensor",
        () => f.seqs[0].append(codes, codes),
        RangeError,
        /\bk\.dtype must be one of "f32", "f16", "bf16", got "u32"/,
      ],
    ]);
  });
});

/** Pages a lone sequence of n tokens holds (R 32, F 32, page 32). */
function pagesOf(n: number): number {
  const flushed = n - 32 >= 32 ? Math.floor((n - 32) / 32) * 32 : 0;
  return Math.ceil(flushed / 32);
}

describe("overlapping asynchronous operations", () => {
  it("attention into a tensor whose read() is in flight is KIVI_ERR_STATE; the read gets the first result", async () => {
    const f = await fixture("overlap attend");
    using _ = f.kivi;
    using q = f.kivi.upload(f.q);
    using out = f.cache.attend(0, f.seqs, q);
    const first = out.readSync();
    const pending = out.read();
    assert.equal(out.reading, true);
    // Meanwhile: a decode step on the sequence, and a second attention into the same output.
    f.seqs[0].append(kvRows(f.rng, 1, H, D, L), kvRows(f.rng, 1, H, D, L));
    expectCases(f, snapshot, [
      [
        "attend into out",
        () => f.cache.attend(0, f.seqs, q, { out }),
        "KIVI_ERR_STATE",
        /attend: out has a read\(\) in flight; await it before writing into the tensor/,
      ],
      [
        "write into out",
        () => out.write(new Float32Array(out.length).fill(1)),
        "KIVI_ERR_STATE",
        /write: the tensor has a read\(\) in flight/,
      ],
    ]);
    assert.deepEqual(await pending, first, "the read returns the result it was started on");
    assert.equal(out.reading, false);
    f.cache.attend(0, f.seqs, q, { out }); // allowed again once the read settled
    assert.notDeepEqual(out.readSync(), first, "the decode step changed the attention");
  });

  it("a quantize into tensors whose read() is in flight is KIVI_ERR_STATE naming the output", async () => {
    const f = await fixture("overlap quantize");
    using _ = f.kivi;
    using x = f.kivi.upload(kvRows(f.rng, 64, 1, D), { shape: [64, D] });
    using codes = f.kivi.alloc([64 * D / 16], "u32"),
      scale = f.kivi.alloc([2 * D], "f16"),
      zero = f.kivi.alloc([2 * D], "f16");
    const fmt = { kind: "uniform", bits: 2 } as const;
    f.kivi.quantize(x, { axis: "token", format: fmt, out: { codes, scale, zero } });
    const before = [codes.readSync(), scale.readSync(), zero.readSync()];
    const pending = scale.read();
    using y = f.kivi.upload(kvRows(f.rng, 64, 1, D), { shape: [64, D] });
    throwsNaming(
      () => f.kivi.quantize(y, { axis: "token", format: fmt, out: { codes, scale, zero } }),
      "KIVI_ERR_STATE",
      /out\.scale has a read\(\) in flight/,
      "quantize",
    );
    assert.deepEqual(
      [codes.readSync(), await pending, zero.readSync()],
      before,
      "outputs untouched",
    );
  });

  it("disposing a tensor or its backend while a read() is in flight frees it once the copy is done", async () => {
    const rng = new Rng("overlap dispose");
    const kivi = await openCpu();
    const data = kvRows(rng, 64, 2, D);
    const t = kivi.upload(data), u = kivi.upload(data.map((x) => x * 2));
    const p = t.read();
    t.dispose();
    assert.equal(t.disposed, true);
    throwsNaming(
      () => t.readSync(),
      "KIVI_ERR_STATE",
      /readSync: the tensor was disposed/,
      "readSync after dispose",
    );
    // backend + u + the disposed t that the read holds (+ 1 on Deno while it waits off-thread)
    assert.ok(
      kivi._nativeRefs >= 3,
      `the read keeps the memory and the context (refs ${kivi._nativeRefs})`,
    );
    assert.deepEqual(await p, data, "the read completes with the tensor's data");
    assert.equal(kivi._nativeRefs, 2, "freed once the read settled");
    const r = u.read();
    kivi.dispose();
    assert.deepEqual(await r, data.map((x) => x * 2), "a read survives its backend's dispose");
    assert.equal(kivi._nativeRefs, 0);
  });
});
