/**
 * The shared model and text of the model tests (../shared, beside the repository, as on CI), and a
 * safetensors writer for checkpoints made on purpose: other dtypes, a single file, corrupted copies.
 *
 * @module
 */
import { closeSync, copyFileSync, mkdtempSync, openSync, readFileSync, readSync } from "node:fs";
import { writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { checkpointTensors } from "../src/model/safetensors.ts";
import { modelMain } from "../src/cli_model.ts";

/** byte-llama-9m: a trained byte-level Llama (config.json, two fp16 shards and their index). */
export const MODEL_DIR = fileURLToPath(
  new URL("../../shared/models/byte-llama-9m", import.meta.url),
);
/** Held-out English text the model never saw. */
export const HELDOUT = readFileSync(
  fileURLToPath(new URL("../../shared/text/heldout.txt", import.meta.url)),
);
export const SHARD2 = "model-00002-of-00002.safetensors";

/** A temporary copy of the model folder (files copied, so they can be changed). */
export function copyModel(): string {
  const dir = mkdtempSync(join(tmpdir(), "kivi-model-"));
  for (
    const f of [
      "config.json",
      "model.safetensors.index.json",
      "model-00001-of-00002.safetensors",
      SHARD2,
    ]
  ) {
    copyFileSync(join(MODEL_DIR, f), join(dir, f));
  }
  return dir;
}

export interface RawTensor {
  name: string;
  dtype: string;
  shape: number[];
  data: Uint8Array;
}

/** The model's tensors as raw fp16 bytes, read straight from the shards. */
export function rawTensors(): RawTensor[] {
  const out: RawTensor[] = [];
  for (const t of checkpointTensors(MODEL_DIR).values()) {
    const fd = openSync(t.file, "r");
    const data = new Uint8Array(t.bytes);
    readSync(fd, data, 0, t.bytes, t.offset);
    closeSync(fd);
    out.push({ name: t.name, dtype: t.dtype, shape: t.shape, data });
  }
  return out;
}

/** fp16 bytes as f32 or bf16 (round to nearest even) bytes. */
export function convert(t: RawTensor, dtype: "F32" | "BF16"): RawTensor {
  const f32 = new Float32Array(
    new Float16Array(t.data.buffer, t.data.byteOffset, t.data.byteLength / 2),
  );
  if (dtype === "F32") return { ...t, dtype, data: new Uint8Array(f32.buffer) };
  const u = new Uint32Array(f32.buffer), b = new Uint16Array(u.length);
  for (let i = 0; i < u.length; i++) b[i] = (u[i] + 0x7fff + ((u[i] >> 16) & 1)) >>> 16;
  return { ...t, dtype, data: new Uint8Array(b.buffer) };
}

/** Writes a safetensors file: the 8-byte header length, the JSON header, the tensors in order. */
export function writeSafetensors(path: string, tensors: readonly RawTensor[]): void {
  const header: Record<string, unknown> = { __metadata__: { format: "pt" } };
  let off = 0;
  for (const t of tensors) {
    header[t.name] = {
      dtype: t.dtype,
      shape: t.shape,
      data_offsets: [off, off + t.data.byteLength],
    };
    off += t.data.byteLength;
  }
  const json = new TextEncoder().encode(JSON.stringify(header));
  const out = new Uint8Array(8 + json.length + off);
  new DataView(out.buffer).setBigUint64(0, BigInt(json.length), true);
  out.set(json, 8);
  let at = 8 + json.length;
  for (const t of tensors) {
    out.set(t.data, at);
    at += t.data.byteLength;
  }
  writeFileSync(path, out);
}

/** A folder holding a single-file checkpoint of `tensors` and the model's config.json changed by `edit`. */
export function singleFile(
  tensors: readonly RawTensor[],
  edit: (c: Record<string, unknown>) => void = () => {},
): string {
  const dir = mkdtempSync(join(tmpdir(), "kivi-model-"));
  const config = JSON.parse(readFileSync(join(MODEL_DIR, "config.json"), "utf8"));
  edit(config);
  writeFileSync(join(dir, "config.json"), JSON.stringify(config));
  writeSafetensors(join(dir, "model.safetensors"), tensors);
  return dir;
}

/** Edits a folder's config.json. */
export function editConfig(dir: string, edit: (c: Record<string, unknown>) => void): void {
  const c = JSON.parse(readFileSync(join(dir, "config.json"), "utf8"));
  edit(c);
  writeFileSync(join(dir, "config.json"), JSON.stringify(c));
}

/** A `kivi` model command (generate, perplexity, calibrate) run in-process: its exit code, stdout,
 * stderr and what it wrote to files. */
export async function runModelCli(
  ...argv: string[]
): Promise<{ code: number; out: string; err: string; written: string }> {
  const out: string[] = [], err: string[] = [], written: string[] = [];
  const code = await modelMain(
    argv,
    (s) => out.push(s),
    (s) => err.push(s),
    "usage: kivi <command>",
    (s) => written.push(s),
  );
  return { code, out: out.join("\n"), err: err.join("\n"), written: written.join("") };
}
