/**
 * Errors: kivi.h returns status codes; the TypeScript side turns a failed status into a
 * `KiviError` carrying the code, the op and the library's message. Mistakes in arguments are
 * caught before any native call, as `TypeError` (wrong type or shape) or `RangeError` (a value
 * out of range).
 *
 * @module
 */

/**
 * Status codes of kivi.h, by name.
 *
 * @example
 * ```ts
 * import { Status } from "./mod.ts";
 * console.log(Status.KIVI_ERR_CAPACITY); // -10
 * ```
 */
export const Status = {
  KIVI_OK: 0,
  KIVI_ERR_ARG: -1,
  KIVI_ERR_SHAPE: -2,
  KIVI_ERR_NONFINITE: -3,
  KIVI_ERR_NOMEM: -4,
  KIVI_ERR_CUDA: -5,
  KIVI_ERR_CUDA_STICKY: -6,
  KIVI_ERR_NO_DEVICE: -7,
  KIVI_ERR_STATE: -8,
  KIVI_ERR_UNSUPPORTED: -9,
  KIVI_ERR_CAPACITY: -10,
} as const;

/** The name of a kivi.h status code, such as `"KIVI_ERR_SHAPE"`. */
export type StatusName = keyof typeof Status;

const names = new Map<number, StatusName>(
  Object.entries(Status).map(([k, v]) => [v, k as StatusName]),
);

/**
 * An error reported by the native library (or a use of a disposed object).
 *
 * @example
 * ```ts
 * import { KiviError } from "./mod.ts";
 * try {
 *   throw new KiviError(-3, "kivi_uniform_quantize", "x holds a NaN at index 7");
 * } catch (e) {
 *   if (e instanceof KiviError && e.code === "KIVI_ERR_NONFINITE") console.log(e.op);
 * }
 * ```
 */
export class KiviError extends Error {
  /** The status name, e.g. `"KIVI_ERR_NONFINITE"`. */
  readonly code: StatusName | "KIVI_ERR_UNKNOWN";
  /** The numeric kivi_status. */
  readonly status: number;
  /** The C export or API method that failed. */
  readonly op: string;

  constructor(status: number, op: string, message: string) {
    const code = names.get(status) ?? "KIVI_ERR_UNKNOWN";
    super(message.length > 0 ? message : `${op} failed with ${code}`);
    this.name = "KiviError";
    this.status = status;
    this.code = code;
    this.op = op;
  }

  /** True when the device context is unusable after this error (a sticky CUDA fault). */
  get fatal(): boolean {
    return this.status === Status.KIVI_ERR_CUDA_STICKY;
  }
}
