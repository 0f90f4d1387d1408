/**
 * Host typed arrays on a CUDA backend: the library's kernels read and write device memory, so a host
 * array given for one native call goes through a temporary tensor. An input is uploaded when its
 * address is taken; an output is written to a temporary and copied into the host array by
 * `finish()`; the temporaries are freed when the staging is disposed (also when an argument check
 * throws after an upload). On the CPU backend the library works on host memory, and the arrays'
 * own addresses are used.
 *
 * The cost on CUDA: each array is copied once (inputs up, outputs down) through pageable memory,
 * and the call waits for the device (the uploads and the download are synchronous), so host arrays
 * suit setup and tests; a loop that keeps data on the device uses `DeviceTensor`s.
 *
 * @module
 */
import type { Pointer } from "./ffi/_native.ts";
import type { BackendCore as Backend, DeviceTensor } from "./tensor.ts";
import type { HostArray, TensorDType } from "./_dtype.ts";

/** @internal tests set `always` to stage host arrays on the CPU backend too (its tensors are host
 * memory), so that the CUDA path runs where there is no GPU. */
export const stagingMode = { always: false };

/** The host arrays of one native call, staged through temporary tensors where the backend needs it. */
export class Staging {
  #temps: DeviceTensor[] = [];
  #outputs: [HostArray, DeviceTensor][] = [];
  readonly #direct: boolean;

  constructor(readonly kivi: Backend, readonly op: string) {
    this.#direct = kivi.kind === "cpu" && !stagingMode.always;
  }

  /** The address the library reads host array `x` (of `dtype`) from. */
  input(x: HostArray, dtype: TensorDType): Pointer {
    if (this.#direct || x.length === 0) return this.kivi._native(this.op).lib.ptr(x);
    const t = this.kivi.upload(x, { dtype });
    this.#temps.push(t);
    return t.pointer(this.op);
  }

  /** The address the library writes host array `x` (of `dtype`) through; `finish()` fills `x`. */
  output(x: HostArray, dtype: TensorDType): Pointer {
    if (this.#direct) return this.kivi._native(this.op).lib.ptr(x);
    const t = this.kivi.alloc([x.length], dtype);
    this.#temps.push(t);
    this.#outputs.push([x, t]);
    return t.pointer(this.op);
  }

  /** After a successful call: copies each staged output into its host array, waiting for the device. */
  finish(): void {
    for (const [x, t] of this.#outputs) this.kivi._download(x, t.pointer(this.op), t.bytes, false);
  }

  /** Frees the temporaries. */
  [Symbol.dispose](): void {
    for (const t of this.#temps) t.dispose();
    this.#temps = [];
    this.#outputs = [];
  }
}
