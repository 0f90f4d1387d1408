/**
 * Quantize+pack throughput of both formats, for keys (axis "token") and values (axis "channel").
 *
 *   bun bench/quant.ts [--backend auto|cpu|cuda] [--reps 10] [--out bench/results] [--json file]
 *                      [--tensor keys] [--format 2-bit] [--check trusted]   (only rows containing these: profiling)
 *
 * CPU: 64 MiB of fp32 per tensor, GB/s of input read. CUDA: 8 sequences x 32768 tokens x 32 heads x
 * 128 dims of fp16 per tensor (the size), timed with CUDA events inside the library and
 * reported as GB/s of bytes read and written and as a fraction of the copy bandwidth measured in
 * the same run. Inputs are seeded synthetic KV blocks (synthKV) tiled to size.
 *
 * @module
 */
import process from "node:process";
import { writeFileSync } from "node:fs";
import {
  type Backend,
  bitsPerValue,
  type DeviceTensor,
  type Format,
  groupCount,
  type HostArray,
  openBackend,
  synthKV,
  wordCount,
} from "../src/mod.ts";
import { gbps, median, parseArgs, type Row, section, writeSection } from "./_report.ts";

const args = parseArgs(process.argv.slice(2), [
  "backend",
  "reps",
  "seed",
  "tensor",
  "format",
  "check",
  "out",
  "json",
]);
const prefer = (args.get("backend") ?? "auto") as "auto" | "cpu" | "cuda";
const reps = Number(args.get("reps") ?? 10);
const seed = Number(args.get("seed") ?? 1234);

using kivi = await openBackend({ prefer });
const onGpu = kivi.kind === "cuda";
// CPU: 64 MiB of fp32 = [4096 x 4096]; CUDA: [8 * 32768 tokens, 32 heads * 128 dims] of fp16.
const rows = onGpu ? 8 * 32768 : 4096;
const cols = onGpu ? 32 * 128 : 4096;
const dtype = onGpu ? "f16" : "f32";
const elemBytes = onGpu ? 2 : 4;

console.log(
  `kivi bench/quant: ${kivi.deviceName} (${kivi.kind}, ${kivi.runtime}); [${rows} x ${cols}] ${dtype}, seed ${seed}`,
);
const copy = kivi.copyBandwidth(onGpu ? 1 << 30 : 64 << 20, onGpu ? 20 : 5);
console.log(`copy bandwidth: ${copy.toFixed(1)} GB/s`);

/** A seeded synthetic block tiled to [rows, cols] (generating 10^9 values in JS would take minutes). */
function tiled(which: "keys" | "values"): HostArray {
  const blockRows = 256;
  const kv = synthKV({ seed, tokens: blockRows, kvHeads: cols / 128, headDim: 128 });
  const block = kv[which];
  const out = onGpu ? new Float16Array(rows * cols) : new Float32Array(rows * cols);
  const src = onGpu ? Float16Array.from(block) : block;
  for (let r = 0; r < rows; r += blockRows) {
    out.set(src.subarray(0, Math.min(blockRows, rows - r) * cols), r * cols);
  }
  return out;
}

const formats: { name: string; format: Format }[] = [
  { name: "uniform 2-bit G32", format: { kind: "uniform", bits: 2, group: 32 } },
  { name: "uniform 4-bit G32", format: { kind: "uniform", bits: 4, group: 32 } },
  {
    name: "codebook 2-bit G64 free",
    format: { kind: "codebook", bits: 2, group: 64, fit: "free" },
  },
  {
    name: "codebook 2-bit G32 pinned",
    format: { kind: "codebook", bits: 2, group: 32, fit: "pinned" },
  },
];

function measure(
  k: Backend,
  x: HostArray | DeviceTensor,
  axis: "token" | "channel",
  format: Format,
  trusted: boolean,
) {
  const shape = [rows, cols] as [number, number];
  const f = format as Required<Format>;
  const groups = groupCount(shape, axis, f.group);
  const paramCount = f.kind === "uniform" ? 2 * groups : groups << f.bits;
  // Preallocated outputs, so allocation is not timed: only the format's own (options are strict:
  // centroids are not an output of "uniform").
  const uniform = f.kind === "uniform";
  const buf = (n: number, dtype: "u32" | "f16") =>
    onGpu ? k.alloc([n], dtype) : dtype === "u32" ? new Uint32Array(n) : new Float16Array(n);
  const out: Record<string, unknown> = uniform
    ? {
      codes: buf(wordCount(shape, f.bits), "u32"),
      scale: buf(groups, "f16"),
      zero: buf(groups, "f16"),
    }
    : { codes: buf(wordCount(shape, f.bits), "u32"), centroids: buf(groups << f.bits, "f16") };
  // deno-lint-ignore no-explicit-any
  const run = () => k.quantize(x as any, { shape, axis, format, trusted, out: out as any });
  run();
  k.synchronizeSync();
  const times: number[] = [];
  for (let i = 0; i < reps; i++) times.push(k.time(run));
  for (const t of Object.values(out)) if (!ArrayBuffer.isView(t)) (t as DeviceTensor).dispose();
  const ms = median(times);
  const read = rows * cols * elemBytes;
  const written = wordCount(shape, f.bits) * 4 + paramCount * 2;
  return { ms, read, written };
}

const only = { tensor: args.get("tensor"), format: args.get("format"), check: args.get("check") };
const rowsOut: Row[] = [];
for (const which of ["keys", "values"] as const) {
  if (only.tensor && !which.includes(only.tensor)) continue;
  const axis = which === "keys" ? "token" : "channel";
  const host = tiled(which);
  const x = onGpu ? kivi.upload(host, { shape: [rows, cols] }) : host;
  for (const { name, format } of formats) {
    if (only.format && !name.includes(only.format)) continue;
    for (const trusted of onGpu ? [true, false] : [false]) {
      if (only.check && !(trusted ? "trusted" : "scan").includes(only.check)) continue;
      const { ms, read, written } = measure(kivi, x, axis, format, trusted);
      const row: Row = {
        tensor: which,
        format: name,
        "bits/value": bitsPerValue(format),
        check: trusted ? "trusted (one pass)" : "NaN scan + pass",
        "ms": ms,
        "GB/s in": gbps(read, ms),
        "GB/s in+out": gbps(read + written, ms),
        "of copy": gbps(read + written, ms) / copy,
      };
      rowsOut.push(row);
      console.log(
        `${which.padEnd(6)} ${name.padEnd(26)} ${String(row.check).padEnd(18)} ${
          ms.toFixed(3).padStart(9)
        } ms  ${(row["GB/s in"] as number).toFixed(1).padStart(7)} GB/s in  ${
          (row["GB/s in+out"] as number).toFixed(1).padStart(7)
        } GB/s in+out  ${((row["of copy"] as number) * 100).toFixed(1)}% of copy`,
      );
    }
  }
  if (!ArrayBuffer.isView(x)) (x as DeviceTensor).dispose();
}

const notes =
  `quantize+pack of [${rows} x ${cols}] ${dtype} (${
    onGpu ? "8 seq x 32768 tok x 32 heads x 128 dims" : "64 MiB"
  }), ` +
  `median of ${reps} runs after a warm-up; "of copy" = (bytes read + written) / time / copy bandwidth.`;
const result = section(kivi, copy, notes, rowsOut);
const path = writeSection("quant", result, args.get("out"));
if (args.has("json")) writeFileSync(args.get("json")!, JSON.stringify(result, null, 2));
console.log(`wrote ${path}`);
