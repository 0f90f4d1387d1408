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
export const dtypeBytes: Record<TensorDType, number> = { f32: 4, f16: 2, bf16: 2, u32: 4, u16: 2, u8: 1, i32: 4 };
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

/** The dtype a host array stands for (Uint16Array is f16 bits unless `hint` says bf16). */
export function dtypeOfHost(a: ArrayBufferView, hint?: TensorDType): TensorDType | undefined {
  if (a instanceof Float32Array) return "f32";
  if (a instanceof Float16Array) return "f16";
  if (a instanceof Uint16Array) return hint === "bf16" || hint === "u16" ? hint : "f16";
  if (a instanceof Uint32Array) return "u32";
  if (a instanceof Uint8Array) return "u8";
  if (a instanceof Int32Array) return "i32";
  return undefined;
}

