/**
 * Several query tokens a sequence over the packed cache, on the CPU reference build: truncate
 * (speculative rollback), fork (shared prefix pages, reference counted), multi-token causal
 * attention with a ragged qlen against the float64 oracle, the log-sum-exp and mergeAttention, and
 * every error row of docs/errors.md that these add (each with the cache unchanged).
 */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import type { Backend, KVCache, Sequence } from "../src/mod.ts";
import { KiviError } from "../src/mod.ts";
import { expectCases, kvRows, openCpu, Rng, throwsNaming } from "./_helpers.ts";
import { causalOracle, maxDiff, multiOptions } from "./_multitoken.ts";

const H = 2, QH = 8, D = 64, ROW = H * D;

/** Appends n seeded tokens to every layer of seq in chunks of `chunk`, returning the K and V rows
 * given (layer-major, [layers][n][H][D]) so that a twin can replay them. */
function feed(
  seq: Sequence,
  rng: Rng,
  n: number,
  layers: number,
  chunk = n,
): [Float32Array, Float32Array][] {
  const given: [Float32Array, Float32Array][] = [];
  for (let a = 0; a < n; a += chunk) {
    const m = Math.min(chunk, n - a);
    const k = kvRows(rng, m, H, D, layers), v = kvRows(rng, m, H, D, layers);
    seq.append(k, v);
    given.push([k, v]);
  }
  return given;
}

/** What a sequence holds: lengths, pages and dequantized K/V of every layer. */
function state(cache: KVCache, s: Sequence) {
  const L = cache.config.layers;
  return Array.from({ length: L }, (_, l) => ({
    len: s.length(l),
    q: s.quantizedLength(l),
    ...cache.read(s, l),
  }));
}

function replay(seq: Sequence, chunks: [Float32Array, Float32Array][]): void {
  for (const [k, v] of chunks) seq.append(k, v);
}

describe("truncate", () => {
  it("drops window tokens of every layer; the rest reads as before and appends continue", async () => {
    using kivi = await openCpu();
    const rng = new Rng("truncate");
    using cache = kivi.createCache(multiOptions());
    using seq = cache.createSequence();
    feed(seq, rng, 150, 2, 50); // quantized 96 (page 1 half full), 54 in the window
    const before = state(cache, seq);
    assert.equal(before[0].q, 96);
    const pages = [...seq.pages()];
    for (const length of [140, 97, 96]) {
      seq.truncate(length);
      const after = state(cache, seq);
      for (let l = 0; l < 2; l++) {
        assert.equal(after[l].len, length);
        assert.equal(after[l].q, 96);
        assert.deepEqual(after[l].keys, (before[l].keys as Float32Array).subarray(0, length * ROW));
        assert.deepEqual(
          after[l].values,
          (before[l].values as Float32Array).subarray(0, length * ROW),
        );
      }
      assert.deepEqual([...seq.pages()], pages, "pages under the quantized length stay");
    }
    // appends after a truncate: the same state as in a copy made at the truncated length
    using copy = seq.fork();
    const more = feed(seq, rng, 70, 2, 7);
    replay(copy, more);
    assert.deepEqual(state(cache, copy), state(cache, seq), rng.tag);
  });

  it("to 0 in a sequence with no page, and to the window's edge; pages return to the pool", async () => {
    using kivi = await openCpu();
    const rng = new Rng("truncate to 0");
    using cache = kivi.createCache(multiOptions(1));
    using s = cache.createSequence();
    feed(s, rng, 40, 1); // 40 tokens: none quantized yet (the window holds up to 63)
    assert.equal(s.quantizedLength(0), 0);
    s.truncate(0);
    assert.equal(s.length(0), 0);
    assert.equal(cache.memory().pagesUsed, 0);
    feed(s, rng, 200, 1, 13);
    const q = s.quantizedLength(0);
    s.truncate(q); // the window's edge: every window token dropped
    assert.equal(s.length(0), q);
    assert.equal(cache.memory().pagesUsed, Math.ceil(q / 64));
    const qv = kvRows(rng, 1, QH, D);
    const { keys, values } = cache.read(s, 0);
    const want = causalOracle(
      keys as Float32Array,
      values as Float32Array,
      qv,
      q,
      1,
      cache.config,
      1 / 8,
    );
    const got = cache.attend(0, [s], qv) as Float32Array;
    assert.ok(maxDiff(got, want.out) < 1e-5, rng.tag);
  });
});

describe("fork", () => {
  it("n forks of one prompt cost the prompt's pages plus one page each; no sequence sees another's tokens", async () => {
    using kivi = await openCpu();
    const rng = new Rng("fork");
    const L = 2;
    using cache = kivi.createCache(multiOptions(L, 64, 12));
    const prompt = cache.createSequence();
    const history = feed(prompt, rng, 150, L, 37); // quantized 96: page 0 full, page 1 half
    assert.equal(cache.memory().pagesUsed, 2);
    const forks = [prompt.fork(), prompt.fork(), prompt.fork()];
    assert.equal(cache.memory().pagesUsed, 2 + 3, "the full page is shared, the half one copied");
    for (const f of forks) assert.equal(f.pages()[0], prompt.pages()[0]);
    for (const f of forks) assert.notEqual(f.pages()[1], prompt.pages()[1]);
    // each appends its own tokens; a twin fed the same history from scratch holds the same
    const own = [prompt, ...forks].map((s, i) => feed(s, rng, 40 + 30 * i, L, 9 + i));
    const grand = forks[1].fork(); // a fork of a fork, after its own appends
    const grandOwn = feed(grand, rng, 80, L, 16);
    for (const [i, s] of [prompt, ...forks].entries()) {
      using twin = cache.createSequence();
      replay(twin, history);
      replay(twin, own[i]);
      assert.deepEqual(state(cache, s), state(cache, twin), `sequence ${i} ${rng.tag}`);
    }
    {
      using twin = cache.createSequence();
      replay(twin, history);
      replay(twin, own[2]);
      replay(twin, grandOwn);
      assert.deepEqual(state(cache, grand), state(cache, twin), `grandchild ${rng.tag}`);
    }
    // a page goes back when its last owner frees it
    const shared = prompt.pages()[0];
    prompt.free();
    for (const f of forks) assert.equal(f.pages()[0], shared);
    const used = cache.memory().pagesUsed;
    forks[0].free();
    assert.ok(cache.memory().pagesUsed < used);
    for (const s of [...forks, grand]) s.free();
    assert.equal(cache.memory().pagesUsed, 0);
    assert.equal(cache.memory().tokens, 0);
  });

  it("memory() counts a shared page once; a fork's attention matches its parent's until they differ", async () => {
    using kivi = await openCpu();
    const rng = new Rng("fork memory");
    using cache = kivi.createCache(multiOptions(1, 16, 4));
    using a = cache.createSequence();
    feed(a, rng, 300, 1, 100); // quantized 256: 4 full pages, none partly filled
    using b = a.fork();
    assert.equal(cache.memory().pagesUsed, 4, "all pages full: a fork costs no page");
    const q1 = kvRows(rng, 1, QH, D), q = new Float32Array(2 * QH * D);
    q.set(q1);
    q.set(q1, QH * D);
    const out = cache.attend(0, [a, b], q) as Float32Array;
    assert.deepEqual(out.subarray(0, QH * D), out.subarray(QH * D));
  });
});

describe("multi-token attention", () => {
  it("ragged qlen (1, 2, 7, 16, 513) matches the float64 causal oracle, with the log-sum-exp", async () => {
    using kivi = await openCpu();
    const rng = new Rng("multi ragged");
    using cache = kivi.createCache(multiOptions(1, 64, 8));
    const lens = [5, 40, 7, 300, 600];
    const qlens = [1, 2, 7, 16, 513]; // the third: the whole sequence; the last: mostly quantized
    const seqs = lens.map((n) => {
      const s = cache.createSequence();
      feed(s, rng, n, 1, 23);
      return s;
    });
    const tokens = qlens.reduce((a, b) => a + b);
    const q = kvRows(rng, tokens, QH, D);
    const lse = new Float32Array(tokens * QH);
    const scale = Math.fround(0.7 / 8);
    const out = cache.attendMulti(0, seqs, qlens, q, { lse, scale }) as Float32Array;
    let t0 = 0;
    for (const [b, s] of seqs.entries()) {
      const { keys, values } = cache.read(s, 0);
      const n = qlens[b];
      const want = causalOracle(
        keys as Float32Array,
        values as Float32Array,
        q.subarray(t0 * QH * D, (t0 + n) * QH * D),
        lens[b],
        n,
        cache.config,
        scale,
      );
      assert.ok(
        maxDiff(out.subarray(t0 * QH * D, (t0 + n) * QH * D), want.out) < 2e-6,
        `seq ${b} ${rng.tag}`,
      );
      assert.ok(
        maxDiff(lse.subarray(t0 * QH, (t0 + n) * QH), want.lse) < 2e-5,
        `lse ${b} ${rng.tag}`,
      );
      t0 += n;
    }
    for (const s of seqs) s.free();
  });

  it("qlens all 1 gives attend's result; attend's lse option is the same log-sum-exp", async () => {
    using kivi = await openCpu();
    const rng = new Rng("multi ones");
    using cache = kivi.createCache(multiOptions(2, 32, 4));
    const seqs = [cache.createSequence(), cache.createSequence(), cache.createSequence()];
    seqs.forEach((s, i) => feed(s, rng, 30 + 70 * i, 2, 11));
    const q = kvRows(rng, 3, QH, D);
    const want = cache.attend(1, seqs, q) as Float32Array;
    const lse1 = new Float32Array(3 * QH), lse2 = new Float32Array(3 * QH);
    const got = cache.attendMulti(1, seqs, [1, 1, 1], q, { lse: lse1 }) as Float32Array;
    const viaAttend = cache.attend(1, seqs, q, { lse: lse2 }) as Float32Array;
    assert.ok(maxDiff(got, want) < 1e-6, rng.tag);
    assert.deepEqual(viaAttend, got);
    assert.deepEqual(lse1, lse2);
    for (const s of seqs) s.free();
  });
});

describe("decode batch log-sum-exp", () => {
  it("a batch made with lse writes attend's log-sum-exp at every step; lse without q is a TypeError", async () => {
    using kivi = await openCpu();
    const rng = new Rng("batch lse");
    using cache = kivi.createCache(multiOptions(2, 32, 4));
    const seqs = [cache.createSequence(), cache.createSequence()];
    seqs.forEach((s, i) => feed(s, rng, 50 + 90 * i, 2, 17));
    const qh = kvRows(rng, 2, QH, D);
    using q = kivi.upload(qh),
      out = kivi.alloc([2, QH, D], "f32"),
      lse = kivi.alloc([2 * QH], "f32");
    using batch = cache.batch(seqs, { q, out, lse });
    for (const layer of [0, 1]) {
      batch.attend(layer);
      const want = new Float32Array(2 * QH);
      const o = cache.attend(layer, seqs, qh, { lse: want }) as Float32Array;
      assert.deepEqual(out.readSync(), o, rng.tag);
      assert.deepEqual(lse.readSync(), want, rng.tag);
    }
    using k = kivi.upload(kvRows(rng, 2, H, D));
    throwsNaming(
      () => cache.batch(seqs, { k, v: k, lse }),
      TypeError,
      /lse must be an f32 tensor of batch \(2\) x queryHeads \(8\) = 16 values, given with q and out/,
      "lse without q",
    );
    for (const s of seqs) s.free();
  });
});

describe("per-layer formats", () => {
  it("forks copy each layer's page parts and multi-token attention reads each layer in its own format", async () => {
    using kivi = await openCpu();
    const rng = new Rng("multi per layer");
    using cache = kivi.createCache({
      ...multiOptions(3, 32, 6),
      perLayer: [{ layer: 1, keys: { kind: "uniform", bits: 4, group: 32 } }, {
        layer: 2,
        keys: { bits: 16 },
        values: { bits: 16 },
      }],
    });
    using a = cache.createSequence();
    feed(a, rng, 150, 3, 41);
    using b = a.fork();
    feed(b, rng, 30, 3);
    using twin = cache.createSequence();
    // the twin replays a's tokens and then b's, drawn again from a fresh Rng of the same label
    const r2 = new Rng("multi per layer");
    feed(twin, r2, 150, 3, 41);
    feed(twin, r2, 30, 3);
    assert.deepEqual(state(cache, b), state(cache, twin), rng.tag);
    for (const layer of [0, 1, 2]) {
      const q = kvRows(rng, 12, QH, D);
      const out = cache.attendMulti(layer, [b], [12], q) as Float32Array;
      const { keys, values } = cache.read(b, layer);
      const want = causalOracle(
        keys as Float32Array,
        values as Float32Array,
        q,
        180,
        12,
        cache.config,
        1 / 8,
      );
      assert.ok(maxDiff(out, want.out) < 2e-6, `layer ${layer} ${rng.tag}`);
    }
  });
});

describe("mergeAttention", () => {
  it("merges the attention of disjoint key ranges into the attention of their union, exactly", async () => {
    using kivi = await openCpu();
    const rng = new Rng("merge");
    using cache = kivi.createCache(multiOptions(1, 16, 2));
    const cfg = { kvHeads: 1, headDim: D, queryHeads: 1 };
    const n = 90, rows = 5, cuts = [0, 17, 60, 90];
    const k = kvRows(rng, n, 1, D), v = kvRows(rng, n, 1, D);
    const outs: Float32Array[] = [], lses: Float32Array[] = [];
    const full = new Float64Array(rows * D), fullLse = new Float64Array(rows);
    for (let p = 0; p + 1 < cuts.length; p++) {
      outs.push(new Float32Array(rows * D));
      lses.push(new Float32Array(rows));
    }
    for (let r = 0; r < rows; r++) {
      const q = kvRows(rng, 1, 1, D);
      const all = causalOracle(k, v, q, n, 1, cfg, 0.1);
      full.set(all.out, r * D);
      fullLse[r] = all.lse[0];
      for (let p = 0; p + 1 < cuts.length; p++) {
        const [a, b] = [cuts[p], cuts[p + 1]];
        const part = causalOracle(
          k.subarray(a * D, b * D),
          v.subarray(a * D, b * D),
          q,
          b - a,
          1,
          cfg,
          0.1,
        );
        outs[p].set(part.out, r * D);
        lses[p][r] = part.lse[0];
      }
    }
    const m = cache.mergeAttention(outs, lses);
    // the parts cross in f32: each lse off by up to |lse| 2^-24 moves its weight by as much, relatively
    const big = (xs: Float32Array[]) => Math.max(...xs.map((x) => Math.max(...x.map(Math.abs))));
    const eps = (big(lses) + 1) * 2 ** -23;
    assert.ok(maxDiff(m.out, full) < 4 * eps * big(outs), `${maxDiff(m.out, full)} ${rng.tag}`);
    assert.ok(maxDiff(m.lse, fullLse) < 4 * eps, `${maxDiff(m.lse, fullLse)} ${rng.tag}`);
    // an empty part (lse -inf) adds nothing
    const m2 = cache.mergeAttention([...outs, new Float32Array(rows * D).fill(7)], [
      ...lses,
      new Float32Array(rows).fill(-Infinity),
    ]);
    assert.deepEqual(m2.out, m.out);
  });
});

describe("chunked prefill", () => {
  it("each chunk sees the earlier chunks as the cache holds them and itself exactly at fp16, causal", async () => {
    using kivi = await openCpu();
    const rng = new Rng("prefill");
    using cache = kivi.createCache(multiOptions(1, 32, 2));
    using seq = cache.createSequence();
    const scale = Math.fround(0.9 / 8);
    for (const n of [100, 77, 128, 1]) {
      const before = cache.read(seq, 0);
      const len = seq.length(0);
      const q = kvRows(rng, n, QH, D), k = kvRows(rng, n, H, D), v = kvRows(rng, n, H, D);
      const out = cache.prefill(0, seq, q, k, v, { scale });
      assert.equal(seq.length(0), len + n);
      const kk = new Float32Array((len + n) * ROW), vv = new Float32Array((len + n) * ROW);
      kk.set(before.keys as Float32Array);
      vv.set(before.values as Float32Array);
      kk.set(k.map(Math.f16round), len * ROW);
      vv.set(v.map(Math.f16round), len * ROW);
      const want = causalOracle(kk, vv, q, len + n, n, cache.config, scale);
      // the two parts cross in f32 (outputs and log-sum-exps): a weight moves by |lse| 2^-24
      const big = (x: ArrayLike<number>) => Math.max(...Array.from(x, Math.abs));
      const tol = 4 * (big(want.lse) + 1) * 2 ** -23 * big(want.out) + 1e-6;
      assert.ok(
        maxDiff(out, want.out) < tol,
        `chunk of ${n} after ${len}: ${maxDiff(out, want.out)} ${rng.tag}`,
      );
    }
  });
});

/* ------------------------------------------------------------------ errors --------------- */

interface Fixture {
  kivi: Backend;
  cache: KVCache;
  seqs: Sequence[];
  rng: Rng;
}

async function fixture(label: string, maxPages = 8, maxSequences = 4): Promise<Fixture> {
  const rng = new Rng(`multitoken errors ${label}`);
  const kivi = await openCpu();
  const cache = kivi.createCache(multiOptions(2, maxPages, maxSequences));
  const a = cache.createSequence(), b = cache.createSequence();
  feed(a, rng, 150, 2, 50); // quantized 96: 2 pages (one half full), 54 in the window
  feed(b, rng, 20, 2); // no page
  return { kivi, cache, seqs: [a, b], rng };
}

function snapshot(f: Fixture) {
  const q = kvRows(new Rng("snapshot q"), f.seqs.length, QH, D);
  return {
    outs: [0, 1].map((l) => f.cache.attend(l, f.seqs, q)),
    mem: f.cache.memory(),
    seqs: f.seqs.map((s) => ({ pages: [...s.pages()], st: state(f.cache, s) })),
    live: f.cache.sequences.length,
    tensors: f.kivi.liveTensors,
  };
}

describe("multi-token errors", () => {
  it("truncate below 0, past the window or above the length changes nothing", async () => {
    const f = await fixture("truncate");
    using _ = f.kivi;
    const [a] = f.seqs;
    expectCases(f, snapshot, [
      ["negative", () => a.truncate(-1), RangeError, /length must be between 0 and \d+, got -1/],
      ["fractional", () => a.truncate(1.5), RangeError, /length must be an integer, got 1\.5/],
      [
        "past the window",
        () => a.truncate(95),
        "KIVI_ERR_ARG",
        /kivi_cache_seq_truncate: length must be >= 96, the tokens of sequence 0 already quantized into pages in layer 0 \(only tokens in the fp16 residual window can be dropped\), got 95/,
      ],
      [
        "above the length",
        () => a.truncate(151),
        "KIVI_ERR_ARG",
        /length must be at most the length of sequence 0 in every layer \(150 in layer 0\), got 151/,
      ],
    ]);
  });

  it("fork of a freed sequence, with every slot taken or the pool exhausted changes nothing", async () => {
    const f = await fixture("fork", 2, 4);
    using _ = f.kivi;
    const [a, b] = f.seqs;
    const dead = f.cache.createSequence();
    dead.free();
    expectCases(f, snapshot, [
      ["a freed sequence", () => dead.fork(), "KIVI_ERR_STATE", /fork: the sequence was freed/],
      [
        "the pool exhausted",
        () => a.fork(),
        "KIVI_ERR_CAPACITY",
        /kivi_cache_seq_fork: the page pool is full: forking sequence 0 needs 1 page\(s\) for its partly filled page, 0 of 2 are free/,
      ],
    ]);
    const c = b.fork(), d = b.fork(); // no page needed: 4 slots taken
    f.seqs.push(c, d);
    expectCases(f, snapshot, [
      [
        "every slot taken",
        () => b.fork(),
        "KIVI_ERR_CAPACITY",
        /kivi_cache_seq_fork: all 4 sequence slots are taken/,
      ],
    ]);
  });

  it("attendMulti with q not matching the qlen list, qlen over a length or a bad lse changes nothing", async () => {
    const f = await fixture("attendMulti");
    using _ = f.kivi;
    const c = f.cache, [a, b] = f.seqs;
    const q = (t: number) => kvRows(f.rng, t, QH, D);
    expectCases(f, snapshot, [
      [
        "q too short",
        () => c.attendMulti(0, [a, b], [3, 2], q(4)),
        TypeError,
        /q must hold tokens \(5, the sum of qlens\) x queryHeads \(8\) x headDim \(64\) = 2560 values, got 2048/,
      ],
      [
        "qlens shorter than seqs",
        () => c.attendMulti(0, [a, b], [3], q(3)),
        TypeError,
        /qlens must be an array of 2 numbers \(one per sequence\), got/,
      ],
      [
        "qlen 0",
        () => c.attendMulti(0, [a], [0], q(0)),
        RangeError,
        /qlens\[0\] must be between 1 and/,
      ],
      [
        "qlen over the length",
        () => c.attendMulti(0, [a, b], [1, 21], q(22)),
        "KIVI_ERR_ARG",
        /kivi_cache_attend_multi: qlens\[1\] must be at most the length of sequence 1 in layer 0 \(20\): its queries are its newest tokens, append them first; got 21/,
      ],
      [
        "lse of the wrong length",
        () => c.attendMulti(0, [a], [2], q(2), { lse: new Float32Array(15) }),
        TypeError,
        /lse must be a Float32Array of 16 values \(tokens x queryHeads\) like q/,
      ],
      [
        "mergeAttention parts that disagree",
        () =>
          c.mergeAttention([new Float32Array(128), new Float32Array(64)], [
            new Float32Array(2),
            new Float32Array(1),
          ]),
        TypeError,
        /outs\[1\]\.length must equal outs\[0\]\.length \(128\), got 64/,
      ],
    ]);
    assert.ok(KiviError);
  });
});
