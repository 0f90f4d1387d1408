/**
 * Safetensors files, read by hand: an 8-byte little-endian header length, a JSON header naming each
 * tensor's dtype, shape and byte range, then the raw tensors. Only the header is read up front; each
 * tensor is read on its own (one positioned read into a buffer of its size), so loading never holds
 * a second copy of the whole checkpoint. Every check names the file, the tensor and what was expected.
 *
 * @module
 */
import { closeSync, fstatSync, openSync, readFileSync, readSync } from "node:fs";
import { basename, join } from "node:path";

/**
 * A checkpoint that cannot be loaded: a missing or truncated file, a malformed header, an unknown
 * dtype, an unsupported architecture, a tensor whose shape contradicts config.json. `file` names the
 * file at fault and `tensor` the tensor, where there is one.
 *
 * @example
 * ```ts
 * import { ModelError } from "./mod.ts";
 * const e = new ModelError("model.safetensors: tensor x has dtype I64", "model.safetensors", "x");
 * console.log(e.name, e.file, e.tensor);
 * ```
 */
export class ModelError extends Error {
  constructor(message: string, readonly file: string, readonly tensor?: string) {
    super(message);
    this.name = "ModelError";
  }
}

/** The tensor dtypes kivi loads; every one is held as fp16. */
export type SafetensorsDType = "F16" | "BF16" | "F32";
const ELEM: Record<SafetensorsDType, number> = { F16: 2, BF16: 2, F32: 4 };

/** Where one tensor lies. */
export interface TensorEntry {
  name: string;
  dtype: SafetensorsDType;
  shape: number[];
  /** The file holding it. */
  file: string;
  /** Absolute byte offset of its data in the file, and its length in bytes. */
  offset: number;
  bytes: number;
}

/** The tensors of one safetensors file, by name, after checking the header against the file's size. */
export function readHeader(file: string): Map<string, TensorEntry> {
  const name = basename(file);
  let fd: number;
  try {
    fd = openSync(file, "r");
  } catch (e) {
    throw new ModelError(
      `${name}: cannot open ${file} (${(e as NodeJS.ErrnoException).code ?? (e as Error).message})`,
      file,
    );
  }
  try {
    const size = fstatSync(fd).size;
    if (size < 8) {
      throw new ModelError(
        `${name}: the file holds ${size} bytes, less than the 8-byte header length`,
        file,
      );
    }
    const lenBuf = new Uint8Array(8);
    readSync(fd, lenBuf, 0, 8, 0);
    const len = Number(new DataView(lenBuf.buffer).getBigUint64(0, true));
    if (8 + len > size) {
      throw new ModelError(
        `${name}: the header claims ${len} bytes, past the end of the file (${size} bytes, so at most ${
          size - 8
        })`,
        file,
      );
    }
    const headerBuf = new Uint8Array(len);
    readSync(fd, headerBuf, 0, len, 8);
    let header: Record<string, unknown>;
    try {
      header = JSON.parse(new TextDecoder().decode(headerBuf));
    } catch (e) {
      throw new ModelError(`${name}: the header is not JSON (${(e as Error).message})`, file);
    }
    if (header === null || typeof header !== "object" || Array.isArray(header)) {
      throw new ModelError(`${name}: the header must be a JSON object`, file);
    }
    const out = new Map<string, TensorEntry>();
    for (const [tname, raw] of Object.entries(header)) {
      if (tname === "__metadata__") continue;
      out.set(tname, entry(file, name, tname, raw, 8 + len, size));
    }
    return out;
  } finally {
    closeSync(fd);
  }
}

function entry(
  file: string,
  name: string,
  tname: string,
  raw: unknown,
  base: number,
  size: number,
): TensorEntry {
  const r = raw as { dtype?: unknown; shape?: unknown; data_offsets?: unknown };
  const where = `${name}: tensor ${tname}`;
  if (typeof r?.dtype !== "string" || !(r.dtype in ELEM)) {
    throw new ModelError(
      `${where} has dtype ${JSON.stringify(r?.dtype)}; expected F16, BF16 or F32`,
      file,
      tname,
    );
  }
  const dtype = r.dtype as SafetensorsDType;
  const shape = r.shape;
  if (!Array.isArray(shape) || !shape.every((d) => Number.isSafeInteger(d) && d >= 0)) {
    throw new ModelError(
      `${where} has shape ${JSON.stringify(shape)}; expected an array of sizes`,
      file,
      tname,
    );
  }
  const offs = r.data_offsets;
  if (
    !Array.isArray(offs) || offs.length !== 2 ||
    !offs.every((d) => Number.isSafeInteger(d) && d >= 0) || offs[1] < offs[0]
  ) {
    throw new ModelError(
      `${where} has data_offsets ${JSON.stringify(offs)}; expected [begin, end]`,
      file,
      tname,
    );
  }
  const need = shape.reduce((a: number, b: number) => a * b, 1) * ELEM[dtype];
  if (offs[1] - offs[0] !== need) {
    throw new ModelError(
      `${where}: data_offsets span ${offs[1] - offs[0]} bytes, but shape [${
        shape.join(", ")
      }] of ${dtype} needs ${need}`,
      file,
      tname,
    );
  }
  if (base + offs[1] > size) {
    throw new ModelError(
      `${where} runs past the end of the file: it needs bytes ${base + offs[0]}..${
        base + offs[1]
      }, the file holds ${size} (truncated?)`,
      file,
      tname,
    );
  }
  return {
    name: tname,
    dtype,
    shape: shape as number[],
    file,
    offset: base + offs[0],
    bytes: need,
  };
}

/** Reads one tensor as fp16 (bf16 and f32 converted; a value fp16 cannot hold is refused). */
export function readTensorF16(t: TensorEntry, fd: number): Float16Array {
  const buf = new Uint8Array(t.bytes);
  let got = 0;
  while (got < t.bytes) {
    const n = readSync(fd, buf, got, t.bytes - got, t.offset + got);
    if (n === 0) {
      throw new ModelError(
        `${
          basename(t.file)
        }: tensor ${t.name} ends early: read ${got} of ${t.bytes} bytes (truncated?)`,
        t.file,
        t.name,
      );
    }
    got += n;
  }
  if (t.dtype === "F16") return new Float16Array(buf.buffer);
  const f32 = t.dtype === "F32"
    ? new Float32Array(buf.buffer)
    : bf16ToF32(new Uint16Array(buf.buffer));
  for (let i = 0; i < f32.length; i++) {
    if (!(Math.abs(f32[i]) < 65520)) {
      throw new ModelError(
        `${basename(t.file)}: tensor ${t.name} holds ${
          f32[i]
        } at index ${i}, which fp16 cannot hold; kivi keeps weights in fp16`,
        t.file,
        t.name,
      );
    }
  }
  return new Float16Array(f32);
}

function bf16ToF32(bits: Uint16Array): Float32Array {
  const u = new Uint32Array(bits.length);
  for (let i = 0; i < bits.length; i++) u[i] = bits[i] << 16;
  return new Float32Array(u.buffer);
}

/** Every tensor of a checkpoint folder: `model.safetensors`, or the shards named by
 * `model.safetensors.index.json` (each shard's header read once; a tensor the index puts in a shard
 * that lacks it is an error). */
export function checkpointTensors(dir: string): Map<string, TensorEntry> {
  const indexFile = join(dir, "model.safetensors.index.json");
  let index: { weight_map?: Record<string, string> } | undefined;
  try {
    index = JSON.parse(readFileSync(indexFile, "utf8"));
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== "ENOENT") {
      throw new ModelError(`model.safetensors.index.json: ${(e as Error).message}`, indexFile);
    }
  }
  if (index === undefined) return readHeader(join(dir, "model.safetensors"));
  const map = index.weight_map;
  if (map === null || typeof map !== "object") {
    throw new ModelError(`model.safetensors.index.json: no weight_map object`, indexFile);
  }
  const shards = new Map<string, Map<string, TensorEntry>>();
  const out = new Map<string, TensorEntry>();
  for (const [tname, shard] of Object.entries(map)) {
    if (typeof shard !== "string" || shard.includes("/") || shard.includes("\\")) {
      throw new ModelError(
        `model.safetensors.index.json: tensor ${tname} names shard ${
          JSON.stringify(shard)
        }; expected a file name in ${dir}`,
        indexFile,
        tname,
      );
    }
    let tensors = shards.get(shard);
    if (tensors === undefined) {
      const path = join(dir, shard);
      try {
        tensors = readHeader(path);
      } catch (e) {
        if (e instanceof ModelError && e.message.startsWith(`${shard}: cannot open`)) {
          const why = e.message.slice(`${shard}: `.length);
          throw new ModelError(
            `${shard}: missing shard: ${why}; model.safetensors.index.json puts tensor ${tname} there`,
            path,
            tname,
          );
        }
        throw e;
      }
      shards.set(shard, tensors);
    }
    const t = tensors.get(tname);
    if (t === undefined) {
      throw new ModelError(
        `${shard}: has no tensor ${tname}, which model.safetensors.index.json puts there`,
        join(dir, shard),
        tname,
      );
    }
    out.set(tname, t);
  }
  return out;
}
