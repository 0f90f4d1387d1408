/**
 * Element types shared by tensors, host arrays and the quantizers.
 *
 * @module
 */
/** Element types of tensors. f32/f16/bf16 hold data; u32 packed codes, u8 raw codes, i32 counts. */
export type TensorDType = "f32" | "f16" | "bf16" | "u32" | "u16" | "u8" | "i32";
/** Element types of quantizer inputs and dequantized outputs. */
export type DType = "f32" | "f16" | "bf16";

/** The host typed array that holds each tensor dtype (bf16 travels as raw Uint16Array bits). */
export interface HostOf {
  f32: Float32Array;
  f16: Float16Array;
  bf16: Uint16Array;
  u32: Uint32Array;
  u16: Uint16Array;
  u8: Uint8Array;
  i32: Int32Array;
}

/** Byte size of one element of each tensor dtype. */
export const dtypeBytes: Record<TensorDType, number> = {
  f32: 4,
  f16: 2,
  bf16: 2,
  u32: 4,
  u16: 2,
  u8: 1,
  i32: 4,
};
/** kivi_dtype codes of the data dtypes. */
export const dtypeCode: Record<DType, number> = { f32: 0, f16: 1, bf16: 2 };

const hostCtor = {
  f32: Float32Array,
  f16: Float16Array,
  bf16: Uint16Array,
  u32: Uint32Array,
  u16: Uint16Array,
  u8: Uint8Array,
  i32: Int32Array,
} as const;

/** A new host array of `n` elements of `dtype`. */
export function hostArray<D extends TensorDType>(dtype: D, n: number): HostOf[D] {
  return new hostCtor[dtype](n) as HostOf[D];
}

/** Typed arrays accepted as host data. */
export type HostArray = HostOf[TensorDType];

const kindDtype: Record<string, TensorDType> = {
  Float32Array: "f32",
  Float16Array: "f16",
  Uint16Array: "f16",
  Uint32Array: "u32",
  Uint8Array: "u8",
  Int32Array: "i32",
};

/** The dtype a typed array of class `kind` (its intrinsic tag) stands for: a Uint16Array is f16
 * bits unless `hint` says bf16 or u16; a hint that does not fit the class is ignored here (see
 * {@link checkHint}). */
export function dtypeOfKind(kind: string, hint?: unknown): TensorDType | undefined {
  if (kind === "Uint16Array" && (hint === "bf16" || hint === "u16")) return hint;
  return kindDtype[kind];
}

/** A dtype hint must fit the array: any of f16, bf16, u16 for a Uint16Array, else the array's own. */
export function checkHint(
  hintName: string,
  hint: DType | TensorDType | undefined,
  name: string,
  kind: string,
): void {
  if (hint === undefined) return;
  const own = kindDtype[kind];
  const fits = kind === "Uint16Array"
    ? hint === "f16" || hint === "bf16" || hint === "u16"
    : hint === own;
  if (!fits) {
    throw new TypeError(
      `${hintName} ${JSON.stringify(hint)} does not match ${name}, a ${kind}${
        own ? ` (${own})` : ""
      }`,
    );
  }
}

/** fp16's largest finite value rounds up from 65520 on: such a value would become Inf in fp16. */
export const F16_LIMIT = 65520;

/** Index of the first finite f32 or bf16 value (bits) that fp16 cannot hold, or -1. NaN and Inf
 * are left to the library's scan, which reports them as KIVI_ERR_NONFINITE. */
export function firstBeyondFp16(a: Float32Array | Uint16Array, dtype: "f32" | "bf16"): number {
  if (dtype === "f32") {
    for (let i = 0; i < a.length; i++) {
      const m = Math.abs(a[i]);
      if (m >= F16_LIMIT && m !== Infinity) return i;
    }
    return -1;
  }
  // bf16 bits: finite magnitudes from 65536 (0x4780) up to the largest finite (0x7f7f).
  for (let i = 0; i < a.length; i++) {
    const m = a[i] & 0x7fff;
    if (m >= 0x4780 && m < 0x7f80) return i;
  }
  return -1;
}

/** The value of element i of an f32 array or of bf16 bits. */
export function valueAt(a: Float32Array | Uint16Array, dtype: "f32" | "bf16", i: number): number {
  return dtype === "f32" ? a[i] : new Float32Array(new Uint32Array([a[i] << 16]).buffer)[0];
}
