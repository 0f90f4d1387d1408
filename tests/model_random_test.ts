/**
 * The pieces of the end-to-end decode bench on the CPU build: the seeded fill op against a BigInt
 * model of its hash and against the statistics it promises, a model made from a config and a seed
 * (and the errors of a bad config), the fp16 matmul path against the f32 path, the deep copy of a
 * sequence against its source, and `bench/e2e.ts --quick` end to end.
 *
 * Tolerance of the fp16 matmul: the CPU's f16 path rounds x to fp16 (relative error at most 2^-11
 * per element) and runs the same f32 loops as the f32 path, so |y16 - y32| <= 2^-11 sum |x_i w_i|
 * plus the f32 sums' own error on both sides (k 2^-24 sum |x_i w_i| each).
 */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { mkdtempSync, readdirSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import process from "node:process";
import { KiviError, openBackend, type RandomModelConfig } from "../src/mod.ts";
import { ModelOps } from "../src/model/_ops.ts";
import { f16, f16Bits, Rng } from "./_helpers.ts";

const kivi = await openBackend({ prefer: "cpu" });
const ops = new ModelOps(kivi);
const TINY: RandomModelConfig = {
  vocab: 300,
  hidden: 96,
  layers: 2,
  heads: 6,
  kvHeads: 2,
  headDim: 64,
  intermediate: 200,
  context: 128,
};

/* The fill's element i, computed as kivi_model.h does (BigInt for the 64-bit hash); mean 0 so
 * that fmaf(std, z, 0) is the f32 rounding of the exact product. */
const M64 = (1n << 64n) - 1n;
function mix64(z: bigint): bigint {
  z = ((z ^ (z >> 30n)) * 0xbf58476d1ce4e5b9n) & M64;
  z = ((z ^ (z >> 27n)) * 0x94d049bb133111ebn) & M64;
  return z ^ (z >> 31n);
}
function fillOracle(seed: number, i: number, std: number): number {
  const base = (mix64((BigInt(seed) + 0x9e3779b97f4a7c15n) & M64) + 2n * BigInt(i)) & M64;
  const h0 = mix64(base), h1 = mix64((base + 1n) & M64);
  let s = 0;
  for (let j = 0n; j < 4n; j++) {
    s += Number((h0 >> (16n * j)) & 0xffffn) + Number((h1 >> (16n * j)) & 0xffffn);
  }
  const z = Math.fround(Math.fround(s - 262140) * Math.fround(1.8688124e-05));
  return f16(Math.fround(std * z));
}

function filled(n: number, seed: number, mean: number, std: number): Float16Array {
  using t = kivi.alloc([n], "f16");
  ops.fillNormal(t, n, seed, mean, std);
  return t.readSync() as Float16Array;
}

describe("kivi_model_fill_normal on the CPU build", () => {
  it("writes the hash of (seed, i) exactly as the BigInt model of kivi_model.h does", () => {
    for (const seed of [0, 1, 123456789, 2 ** 32 - 1]) {
      const x = filled(1000, seed, 0, 0.5);
      for (let i = 0; i < x.length; i++) {
        assert.equal(
          f16Bits(x[i]),
          f16Bits(fillOracle(seed, i, 0.5)),
          `seed ${seed}, element ${i}`,
        );
      }
    }
  });

  it("is a function of (seed, index): same seed same bits, a prefix is a prefix, seeds differ", () => {
    const a = filled(100003, 7, 1, 0.02), b = filled(100003, 7, 1, 0.02);
    assert.deepEqual(new Uint16Array(a.buffer), new Uint16Array(b.buffer));
    const p = filled(999, 7, 1, 0.02);
    assert.deepEqual(new Uint16Array(p.buffer), new Uint16Array(a.buffer, 0, 999));
    const c = filled(1000, 8, 1, 0.02);
    let same = 0;
    for (let i = 0; i < 1000; i++) same += a[i] === c[i] ? 1 : 0;
    assert.ok(same < 200, `${same} of 1000 elements equal across seeds 7 and 8`);
  });

  it("has the mean and std asked for, and no draw beyond 4.9 std", () => {
    const n = 400000;
    for (const [mean, std] of [[0, 1], [0, 0.02], [1, 0.02], [-3, 2]]) {
      const x = filled(n, 42, mean, std);
      let s = 0, s2 = 0, worst = 0;
      for (const v of x) {
        s += v;
        s2 += (v - mean) ** 2;
        worst = Math.max(worst, Math.abs(v - mean));
      }
      const m = s / n, sd = Math.sqrt(s2 / n);
      // the sample mean's std is std / sqrt(n); fp16 rounding adds at most 2^-11 |v| per draw
      const tol = 6 * std / Math.sqrt(n) + Math.abs(mean) * 2 ** -11;
      assert.ok(Math.abs(m - mean) < tol, `mean ${m} vs ${mean} (tol ${tol})`);
      assert.ok(Math.abs(sd / std - 1) < 0.01, `std ${sd} vs ${std}`);
      assert.ok(
        worst <= 4.9 * std * (1 + 2 ** -10) + Math.abs(mean) * 2 ** -11,
        `max |v - mean| ${worst}`,
      );
      assert.ok(worst > 3.5 * std, `no draw beyond 3.5 std in ${n}: ${worst / std}`);
    }
  });

  it("refuses a non-finite mean or a negative std, naming it", () => {
    using t = kivi.alloc([4], "f16");
    assert.throws(() => ops.fillNormal(t, 4, 0, NaN, 1), /mean must be finite, got nan/);
    assert.throws(() => ops.fillNormal(t, 4, 0, 0, -1), /std must be finite and >= 0, got -1/);
    assert.throws(() => ops.fillNormal(t, 0, 0, 0, 1), /n must be between 1 and \d+, got 0/);
  });
});

describe("the f16 matmul path on the CPU build", () => {
  it("equals the f32 path within the fp16 rounding of x, and is the f32 path on fp16-rounded x", () => {
    const rng = new Rng("linear f16");
    for (const [rows, n, k] of [[1, 7, 33], [5, 130, 257], [3, 64, 1000]]) {
      const x = Float32Array.from({ length: rows * k }, () => rng.normal() * 3);
      const w = Float16Array.from({ length: n * k }, () => rng.normal() * 0.05);
      using tx = kivi.upload(x, { shape: [rows, k] }), tw = kivi.upload(w, { shape: [n, k] });
      using y32 = kivi.alloc([rows, n], "f32"), y16 = kivi.alloc([rows, n], "f32");
      using tr = kivi.upload(x.map(f16), { shape: [rows, k] }), yr = kivi.alloc([rows, n], "f32");
      ops.linear(tx, tw, rows, n, k, y32);
      ops.linearF16(tx, tw, rows, n, k, y16);
      ops.linear(tr, tw, rows, n, k, yr);
      const a = y32.readSync() as Float32Array, b = y16.readSync() as Float32Array;
      assert.deepEqual(
        b,
        yr.readSync(),
        `${rows}x${n}x${k}: f16 path vs f32 on rounded x ${rng.tag}`,
      );
      for (let r = 0; r < rows; r++) {
        for (let j = 0; j < n; j++) {
          let mag = 0;
          for (let i = 0; i < k; i++) mag += Math.abs(x[r * k + i] * w[j * k + i]);
          const tol = (2 ** -11 + 2 * k * 2 ** -24) * mag;
          const d = Math.abs(a[r * n + j] - b[r * n + j]);
          assert.ok(
            d <= tol,
            `${rows}x${n}x${k} [${r}][${j}]: |${a[r * n + j]} - ${
              b[r * n + j]
            }| > ${tol} ${rng.tag}`,
          );
        }
      }
    }
  });

  it("accumulates into y like the f32 path", () => {
    const x = Float32Array.from({ length: 64 }, (_, i) => i / 64),
      w = new Float16Array(2 * 64).fill(0.5);
    using tx = kivi.upload(x, { shape: [1, 64] }), tw = kivi.upload(w, { shape: [2, 64] });
    using y = kivi.upload(new Float32Array([10, 20]), { shape: [1, 2] });
    ops.linearF16(tx, tw, 1, 2, 64, y, true);
    assert.deepEqual([...(y.readSync() as Float32Array)], [10 + 15.75, 20 + 15.75]);
  });
});

describe("a model from a config and a seed", () => {
  it("is the same model for the same seed, another for another seed, f16 matmul by default", () => {
    using a = kivi.randomModel(TINY, { seed: 3 }), b = kivi.randomModel(TINY, { seed: 3 });
    using c = kivi.randomModel(TINY, { seed: 4 });
    assert.equal(a.matmul, "f16");
    assert.equal(a.config.layers, 2);
    assert.match(a.dir, /random weights, seed 3/);
    const ids = [Int32Array.from({ length: 20 }, (_, i) => (i * 37) % TINY.vocab)];
    const la = a.teacherForced(ids), lb = b.teacherForced(ids), lc = c.teacherForced(ids);
    assert.deepEqual(la, lb);
    assert.notDeepEqual(la, lc);
    assert.ok(la.every(Number.isFinite));
    // weights of a trained model's scale: the next-token distribution is near uniform, not peaked
    const top = Math.max(...la.subarray(0, TINY.vocab));
    assert.ok(top < Math.log(10 / TINY.vocab), `top log-probability ${top}`);
    assert.equal(a.weightBytes, b.weightBytes);
  });

  it("runs the f32 matmul when asked, close to the f16 one", () => {
    using a = kivi.randomModel(TINY, { seed: 5 }),
      b = kivi.randomModel(TINY, { seed: 5, matmul: "f32" });
    assert.equal(b.matmul, "f32");
    const ids = [Int32Array.from({ length: 12 }, (_, i) => i * 11)];
    const x = a.teacherForced(ids), y = b.teacherForced(ids);
    let w = 0;
    for (let i = 0; i < x.length; i++) w = Math.max(w, Math.abs(x[i] - y[i]));
    assert.ok(w > 0 && w < 1e-2, `worst |f16 - f32| log-probability ${w}`);
  });

  it("decodes over a cache (one step of the lean loop, no logits read)", () => {
    using m = kivi.randomModel(TINY, { seed: 6 });
    using cache = m._createCache({}, 2, 100);
    const seqs = [cache.createSequence(), cache.createSequence()];
    for (const s of seqs) m._prefill(s, Int32Array.from([1, 2, 3]));
    const d = m._decoder(cache, seqs, { logits: false, skip: "gemm" });
    try {
      assert.equal(d.step(Int32Array.from([4, 5]), Int32Array.from([3, 3])).length, 0);
      d.step();
      d.finish();
    } finally {
      d.dispose();
    }
    assert.deepEqual(seqs.map((s) => s.length(1)), [5, 5]);
  });

  it("refuses a bad config or option, naming the field and the expected value", () => {
    const bad: [Record<string, unknown>, RegExp][] = [
      [{ hidden: 0 }, /^config\.hidden must be an integer between 1 and 65536, got 0$/],
      [{ vocab: 1.5 }, /^config\.vocab must be an integer between 1 and 1048576, got 1\.5$/],
      [
        { layers: undefined },
        /^config\.layers must be an integer between 1 and 1024, got undefined$/,
      ],
      [{ heads: 5 }, /^config\.heads must be a multiple of config\.kvHeads \(2\), got 5$/],
      [{ headDim: 63 }, /^config\.headDim must be even, got 63$/],
      [{ eps: -1 }, /^config\.eps must be a finite number > 0, got -1$/],
      [
        { heads: 1024, kvHeads: 2, headDim: 128 },
        /^config\.heads \* config\.headDim must be at most 65536, got 1024 \* 128$/,
      ],
    ];
    for (const [edit, re] of bad) {
      assert.throws(
        () => kivi.randomModel({ ...TINY, ...edit } as RandomModelConfig),
        (e: Error) => {
          assert.ok(e instanceof RangeError, `${JSON.stringify(edit)}: ${e}`);
          assert.match(e.message, re);
          return true;
        },
      );
    }
    assert.throws(() => kivi.randomModel(null as unknown as RandomModelConfig), TypeError);
    assert.throws(() => kivi.randomModel(TINY, { seed: -1 }), /opts\.seed/);
    assert.throws(() => kivi.randomModel(TINY, { matmul: "bf16" as "f16" }), /opts\.matmul/);
    assert.throws(() => kivi.randomModel(TINY, { sed: 1 } as never), /sed/);
  });
});

describe("the deep copy of a sequence (cache._copySequence)", () => {
  const formats = [
    { keys: { bits: 16 }, values: { bits: 16 } },
    {},
    {
      keys: { kind: "uniform", bits: 4, group: 64 },
      values: { kind: "uniform", bits: 2, group: 32 },
    },
  ] as const;
  for (const f of formats) {
    it(`attends exactly like its source, then diverges after an append (${JSON.stringify(f)})`, () => {
      const rng = new Rng(`copy ${JSON.stringify(f)}`);
      using cache = kivi.createCache({
        layers: 2,
        kvHeads: 2,
        queryHeads: 6,
        headDim: 64,
        maxPages: 32,
        residual: 64,
        ...f,
      });
      const row = 2 * 64, T = 203; // three pages, a partial one, and a residual window in use
      const kv = () =>
        Float32Array.from({ length: 2 * T * row }, (_, i) => rng.normal() * (i % 64 === 5 ? 6 : 1));
      const src = cache.createSequence();
      src.append(kv(), kv());
      const copy = cache._copySequence(src);
      assert.notEqual(copy.id, src.id);
      for (let l = 0; l < 2; l++) {
        assert.equal(copy.length(l), src.length(l));
        assert.equal(copy.quantizedLength(l), src.quantizedLength(l));
        const a = cache.read(src, l), b = cache.read(copy, l);
        assert.deepEqual(b.keys, a.keys);
        assert.deepEqual(b.values, a.values);
      }
      const pagesSrc = [...src.pages()], pagesCopy = [...copy.pages()];
      assert.equal(pagesCopy.length, pagesSrc.length);
      assert.ok(pagesCopy.every((p) => !pagesSrc.includes(p)), "the copy has pages of its own");
      const q = Float32Array.from({ length: 6 * 64 }, () => rng.normal());
      const q2 = Float32Array.from([...q, ...q]);
      const both = cache.attend(1, [src, copy], q2) as Float32Array;
      assert.deepEqual(both.subarray(6 * 64), both.subarray(0, 6 * 64), rng.tag);
      const before = cache.attend(0, [src], q) as Float32Array;
      const one = () => Float32Array.from({ length: 2 * row }, () => rng.normal());
      copy.append(one(), one());
      assert.equal(copy.length(0), T + 1);
      assert.equal(src.length(0), T);
      assert.deepEqual(
        cache.attend(0, [src], q),
        before,
        "the source is untouched by the copy's append",
      );
      assert.notDeepEqual(cache.attend(0, [copy], q), before, "the copy diverges after its append");
      src.free();
      assert.equal(cache.read(copy, 1).keys.length, (T + 1) * row, "the copy outlives its source");
    });
  }

  it("refuses a freed source, a full pool and a full slot table, changing nothing", () => {
    const row = 2 * 64;
    using cache = kivi.createCache({
      layers: 1,
      kvHeads: 2,
      headDim: 64,
      maxPages: 5,
      maxSequences: 3,
      residual: 32,
    });
    const a = cache.createSequence();
    a.append(new Float32Array(150 * row).fill(0.5), new Float32Array(150 * row).fill(1)); // 2 pages
    const freed = cache.createSequence();
    freed.free();
    assert.throws(() => cache._copySequence(freed), (e: Error) => {
      assert.ok(e instanceof KiviError && e.code === "KIVI_ERR_STATE", String(e));
      return true;
    });
    const b = cache._copySequence(a); // 4 of 5 pages in use
    assert.equal(cache.memory().pagesUsed, 4);
    assert.throws(() => cache._copySequence(a), (e: Error) => {
      assert.ok(e instanceof KiviError && e.code === "KIVI_ERR_CAPACITY", String(e));
      assert.match(
        e.message,
        /the page pool is full: copying sequence \d+ needs 2 pages of 64 tokens, 1 of 5 are free/,
      );
      return true;
    });
    assert.equal(cache.memory().pagesUsed, 4);
    assert.equal(cache.sequences.length, 2);
    b.free();
    const c = cache.createSequence(), d = cache.createSequence();
    assert.throws(() => cache._copySequence(c), /all 3 sequence slots are taken/);
    assert.equal(d.length(0), 0);
    assert.throws(() => cache._copySequence({} as never), TypeError);
  });
});

describe("bench/e2e.ts --quick", () => {
  it("runs on the CPU build and writes a valid report", { timeout: 120_000 }, () => {
    const dir = mkdtempSync(join(tmpdir(), "kivi-e2e-"));
    try {
      const script = fileURLToPath(new URL("../bench/e2e.ts", import.meta.url));
      const isDeno = (globalThis as { Deno?: unknown }).Deno !== undefined;
      const argv = [
        ...(isDeno ? ["run", "-A"] : []),
        script,
        "--quick",
        "--backend",
        "cpu",
        "--out",
        dir,
      ];
      const r = spawnSync(process.execPath, argv, { encoding: "utf8" });
      assert.equal(r.status, 0, r.stderr);
      assert.match(r.stderr, /e2e: .*tokens\/s/);
      const files = readdirSync(dir).sort();
      assert.equal(files.length, 2, files.join(", "));
      assert.match(files[0], /-e2e\.json$/);
      assert.match(files[1], /-e2e\.md$/);
      const rep = JSON.parse(readFileSync(join(dir, files[0]), "utf8"));
      assert.equal(rep.weights, "seeded random (timing only)");
      assert.match(rep.kvFill, /appended .* copies/);
      assert.ok(rep.copyGBps > 0);
      assert.equal(rep.config.layers, 2);
      const caches = new Set(rep.rows.map((x: { cache: string }) => x.cache));
      assert.equal(caches.size, 3);
      assert.equal(rep.rows.length, 6);
      for (const x of rep.rows) {
        assert.equal(x.context, 256);
        for (const k of ["tokensPerSecond", "msPerStep", "cacheGB", "bytesPerStep", "ofCopy"]) {
          assert.ok(Number.isFinite(x[k]) && x[k] > 0, `${k} = ${x[k]}`);
        }
        const sum = x.attentionShare + x.gemmShare + x.otherShare;
        assert.ok(sum >= 0.999, `shares sum to ${sum}`);
        assert.equal(x.maxBatch, x.batch === 4);
      }
      assert.match(readFileSync(join(dir, files[1]), "utf8"), /Timing only/);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe("kivi bench --e2e", () => {
  it("passes the bench's own options through and is refused on other commands", async () => {
    const { parseCli } = await import("../src/cli.ts");
    const p = parseCli(["bench", "--e2e", "--quick", "--layers", "2", "--backend", "cpu"]);
    assert.equal(p.flags.get("e2e"), "true");
    assert.deepEqual(p.rest, ["--quick", "--layers", "2"]);
    assert.throws(() => parseCli(["info", "--e2e"]), /unknown option "--e2e" for info/);
    assert.throws(
      () => parseCli(["bench", "--layers", "2"]),
      /unknown option "--layers" for bench/,
    );
  });
});
