/**
 * Calibration on the CPU build with the real byte-llama-9m: the knapsack against a brute-force
 * search, a calibrated plan on a short text (within its budget, its KL prediction the sum of its
 * parts' measured KL), the plan's JSON round trip into a cache and a model run, `kivi calibrate`
 * and `--plan`, and the bad input rows of docs/errors.md (nothing run, nothing created).
 */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import {
  calibrate,
  CALIBRATION_BYTES,
  measureSensitivity,
  openBackend,
  planCache,
  planFromSensitivity,
  readPlan,
  type Sensitivity,
  splitHeldout,
} from "../src/mod.ts";
import { HELDOUT, MODEL_DIR, runModelCli } from "./_model.ts";
import { Rng } from "./_helpers.ts";

const TEXT = join(MODEL_DIR, "../../text/heldout.txt");
const U2 = { kind: "uniform", bits: 2, group: 32 } as const;
const U4 = { kind: "uniform", bits: 4, group: 32 } as const;
const U2_64 = { kind: "uniform", bits: 2, group: 64 } as const;
/** A short calibration protocol: one window of 300 tokens, 256 prefilled, 8 decoded. */
const SHORT = { windows: 1, window: 300, prefill: 256, steps: 8 } as const;

/** A synthetic sensitivity: `layers` layers, each part with the given bit costs and seeded KLs. */
function synthetic(rng: Rng, layers: number): Sensitivity {
  const entries: Sensitivity["entries"] = [];
  for (let layer = 0; layer < layers; layer++) {
    for (const part of ["keys", "values"] as const) {
      entries.push({ layer, part, format: { bits: 16 }, bits: 16, kl: 0 });
      const costs = part === "keys" ? [3, 5] : [2.5, 3, 4.5];
      for (const bits of costs) {
        entries.push({ layer, part, format: U2, bits, kl: rng.uniform(0, 1) * 1e-3 / bits });
      }
    }
  }
  return {
    layers,
    residual: 32,
    pageTokens: 64,
    headDim: 64,
    protocol: SHORT,
    entries,
  };
}

describe("the calibration plan", () => {
  it("is the least summed KL within the budget, as a brute-force search over every choice finds", () => {
    for (const seed of [1, 2, 3]) {
      const rng = new Rng("knapsack", seed);
      const s = synthetic(rng, 3);
      const parts = Array.from(
        { length: 6 },
        (_, i) =>
          s.entries.filter((e) => e.layer === i >> 1 && e.part === (i & 1 ? "values" : "keys")),
      );
      for (const budget of [2.75, 3.0, 3.3, 3.5, 5, 16]) {
        const best = bruteForce(parts, budget);
        const plan = planFromSensitivity(s, budget);
        assert.ok(plan.bitsPerValue <= budget + 1e-12, `${rng.tag} budget ${budget}`);
        assert.ok(
          Math.abs(plan.predictedKl - best) <= 1e-15,
          `${rng.tag} budget ${budget}: ${plan.predictedKl} vs brute force ${best}`,
        );
      }
      assert.equal(planFromSensitivity(s, 16).predictedKl, 0);
    }
  });

  it("shares one key group across layers: solved a group at a time, as the brute force over one-group choices finds", () => {
    const rng = new Rng("knapsack groups");
    const s = synthetic(rng, 3);
    for (let layer = 0; layer < 3; layer++) { // keys in groups of 64: cheaper, a little worse
      for (const bits of [2.5, 4.5]) {
        s.entries.push({
          layer,
          part: "keys",
          format: { ...U2_64, bits: bits === 2.5 ? 2 : 4 },
          bits,
          kl: rng.uniform(0, 1) * 2e-3 / bits,
        });
      }
    }
    const keysOf = (l: number, g: number) =>
      s.entries.filter((e) =>
        e.layer === l && e.part === "keys" && (e.format.bits === 16 || (e.format.group ?? 32) === g)
      );
    for (const budget of [2.5, 2.75, 3.0, 3.3]) {
      let best = Infinity;
      for (const g of [32, 64]) {
        const parts = [0, 1, 2].flatMap((l) => [
          keysOf(l, g),
          s.entries.filter((e) => e.layer === l && e.part === "values"),
        ]);
        best = Math.min(best, bruteForce(parts, budget));
      }
      const plan = planFromSensitivity(s, budget);
      assert.ok(Math.abs(plan.predictedKl - best) <= 1e-15, `${rng.tag} budget ${budget}`);
      const groups = new Set(plan.perLayer.map((l) => l.keys.group ?? 32));
      assert.equal(groups.size, 1, `one key group: ${[...groups]}`);
      assert.equal(plan.keys.group ?? 32, [...groups][0]);
    }
  });

  it("calibrates byte-llama-9m on a short text: within the budget, every layer named, KL the sum of its parts", async () => {
    using kivi = await openBackend({ prefer: "cpu" });
    using model = kivi.loadModel(MODEL_DIR);
    const { calibration } = splitHeldout(HELDOUT);
    const s = measureSensitivity(model, calibration.subarray(0, 4096), {
      ...SHORT,
      residual: 32,
      keyCandidates: [U2, U4],
      valueCandidates: [U2_64, U2],
    });
    assert.equal(s.entries.length, 6 * 2 * 3); // bits 16 and two candidates a part
    for (const e of s.entries) {
      assert.ok(e.kl >= 0 && Number.isFinite(e.kl), `${JSON.stringify(e)}`);
      if (e.format.bits !== 16) assert.ok(e.kl > 0, `quantizing changes something: ${e.layer}`);
    }
    // a 4-bit part is closer to bits 16 than a 2-bit one of the same layer
    for (let l = 0; l < 6; l++) {
      const k = s.entries.filter((e) => e.layer === l && e.part === "keys");
      assert.ok(k[2].kl < k[1].kl, `layer ${l}: 4-bit keys ${k[2].kl} vs 2-bit ${k[1].kl}`);
    }
    for (const budget of [2.75, 3.0, 3.3]) {
      const plan = planFromSensitivity(s, budget);
      assert.ok(plan.bitsPerValue <= budget);
      assert.deepEqual(plan.perLayer.map((l) => l.layer), [0, 1, 2, 3, 4, 5]);
      const chosen = plan.perLayer.flatMap((l) =>
        (["keys", "values"] as const).map((part) =>
          s.entries.find((e) =>
            e.layer === l.layer && e.part === part &&
            JSON.stringify(e.format) === JSON.stringify(l[part])
          )!.kl
        )
      );
      assert.ok(Math.abs(chosen.reduce((a, b) => a + b, 0) - plan.predictedKl) < 1e-15);
      // the JSON round trip gives a cache of the plan's formats, and a model run takes it
      const back = readPlan(JSON.stringify(plan));
      assert.deepEqual(back, JSON.parse(JSON.stringify(plan)));
      using cache = kivi.createCache({
        layers: 6,
        kvHeads: 2,
        headDim: 64,
        maxPages: 4,
        ...planCache(back),
      });
      assert.ok(Math.abs(cache.memory().formatBitsPerValue - plan.bitsPerValue) < 1e-12);
      const r = model.perplexity(calibration.subarray(4096, 8192), {
        ...SHORT,
        cache: planCache(back),
      });
      assert.ok(r.bpb > 0 && r.bpb < 8);
    }
  });

  it("calibrate() refuses a bad budget or a text shorter than one window, running nothing and making nothing", async () => {
    using kivi = await openBackend({ prefer: "cpu" });
    using model = kivi.loadModel(MODEL_DIR);
    const refs = kivi._nativeRefs, tensors = kivi.liveTensors;
    const text = HELDOUT.subarray(0, 4096);
    const cases: [unknown, RegExp, typeof RangeError | typeof TypeError][] = [
      [1.5, /budget must be in 2\.\.16 bits per value, got 1\.5/, RangeError],
      [17, /budget must be in 2\.\.16 bits per value, got 17/, RangeError],
      [NaN, /budget must be in 2\.\.16 bits per value, got NaN/, RangeError],
      ["3", /budget must be a number of bits per value, got "3"/, TypeError],
    ];
    for (const [budget, msg, kind] of cases) {
      assert.throws(
        () => calibrate(model, text, { ...SHORT, budget: budget as number }),
        (e: unknown) => e instanceof kind && msg.test((e as Error).message),
      );
    }
    assert.throws(
      () => calibrate(model, HELDOUT.subarray(0, 200), { ...SHORT, budget: 3 }),
      /text must hold at least one calibration window \+ 1 \(301 tokens\), got 200/,
    );
    assert.throws(
      () => planFromSensitivity(synthetic(new Rng("cheap"), 2), 2.5),
      /budget must be at least the cheapest plan's 2\.750 bits per value, got 2\.5/,
    );
    assert.equal(kivi._nativeRefs, refs);
    assert.equal(kivi.liveTensors, tensors);
  });

  it("splits the held-out text into a calibration part and an evaluation part", () => {
    const { calibration, evaluation } = splitHeldout(HELDOUT);
    assert.equal(calibration.length, CALIBRATION_BYTES);
    assert.equal(calibration.length + evaluation.length, HELDOUT.length);
    assert.equal(evaluation.byteOffset - calibration.byteOffset, CALIBRATION_BYTES);
    assert.throws(() => splitHeldout(HELDOUT.subarray(0, 1000)), /text must hold more than 65536/);
  });
});

const cli = runModelCli;

/** The least summed KL over one choice from each of the parts (3 layers x keys, values) within the
 * budget in bits per value: every combination tried. */
function bruteForce(parts: { bits: number; kl: number }[][], budget: number): number {
  let best = Infinity;
  const walk = (i: number, bits: number, kl: number) => {
    if (bits > budget * parts.length + 1e-9) return;
    if (i === parts.length) return void (best = Math.min(best, kl));
    for (const e of parts[i]) walk(i + 1, bits + e.bits, kl + e.kl);
  };
  walk(0, 0, 0);
  return best;
}

describe("kivi calibrate and --plan", () => {
  it("kivi calibrate writes a plan that kivi perplexity and kivi generate take with --plan", async () => {
    const dir = mkdtempSync(join(tmpdir(), "kivi-plan-"));
    const file = join(dir, "plan.json");
    const r = await cli(
      "calibrate",
      ...`--backend cpu --model ${MODEL_DIR} --text ${TEXT} --budget 3.3 --residual 32 --bytes 0:4096 --windows 1 --window 300 --prefill 256 --steps 2 --out ${file}`
        .split(" "),
    );
    assert.equal(r.code, 0, r.err);
    assert.match(r.out, /^plan for 3\.3 bits per value at residual 32: 3\.\d+ bits per value/);
    assert.match(r.out, /layer 5: keys uniform:\d:32, values \w+:\d:\d+/);
    const plan = readPlan(readFileSync(file, "utf8"));
    assert.ok(plan.bitsPerValue <= 3.3);
    assert.equal(plan.residual, 32);
    const p = await cli(
      "perplexity",
      ...`--backend cpu --model ${MODEL_DIR} --text ${TEXT} --bytes 32768:40000 --windows 1 --steps 4 --plan ${file}`
        .split(" "),
    );
    assert.equal(p.code, 0, p.err);
    assert.match(p.out, new RegExp(`plan ${file.replace(/[.]/g, "\\.")} +32 +3\\.\\d{3} `));
    const g = await cli(
      "generate",
      ...`--backend cpu --model ${MODEL_DIR} --max-tokens 4 --plan ${file} --prompt The`.split(" "),
    );
    assert.equal(g.code, 0, g.err);
    assert.match(g.written, /^The/);
  });

  it("bad command lines exit 2 naming the option; nothing runs", async () => {
    const dir = mkdtempSync(join(tmpdir(), "kivi-plan-"));
    const notPlan = join(dir, "x.json");
    writeFileSync(notPlan, `{"hello": 1}`);
    const base = ["--backend", "cpu", "--model", MODEL_DIR, "--text", TEXT];
    const cases: [string[], RegExp][] = [
      [
        ["calibrate", ...base, "--budget", "1.5"],
        /--budget must be a number of bits per value in 2\.\.16, got "1\.5"/,
      ],
      [
        ["calibrate", ...base, "--budget", "17"],
        /--budget must be a number of bits per value in 2\.\.16, got "17"/,
      ],
      [["calibrate", ...base], /calibrate needs --budget/],
      [["calibrate", ...base, "--budget", "3", "--bytes", "10:5"], /--bytes must be FROM:TO/],
      [
        ["calibrate", ...base, "--budget", "3", "--keys", "16"],
        /--keys is not an option of calibrate/,
      ],
      [
        ["perplexity", ...base, "--plan", notPlan],
        /--plan ".*x\.json": plan must be an object with kivi: "plan"/,
      ],
      [["perplexity", ...base, "--plan", join(dir, "none.json")], /--plan: cannot read/],
      [
        ["generate", "--model", MODEL_DIR, "--prompt", "a", "--plan", notPlan, "--keys", "16"],
        /--plan gives the formats/,
      ],
    ];
    for (const [argv, msg] of cases) {
      const r = await cli(...argv);
      assert.equal(r.code, 2, `${argv.join(" ")}: ${r.err}`);
      assert.match(r.err, msg);
    }
  });
});
