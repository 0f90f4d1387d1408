/**
 * Private helpers of multi-token attention (KVCache.attendMulti, the `lse` option of attend).
 *
 * @module
 */
import type { BackendCore as Backend } from "./tensor.ts";
import { hostView, overlaps, show } from "./_checks.ts";
import { type Data } from "./_input.ts";

/** The caller's `lse` buffer, checked against q: `n` f32 values where q lives (a Float32Array for a
 * host q, an f32 DeviceTensor of the same backend for a tensor q), sharing no memory with q. */
export function describeLse(
  backend: Backend,
  given: unknown,
  n: number,
  qd: Data,
): Data & { buf: unknown } {
  const t = backend._tensor(given);
  const v = t === undefined ? hostView("lse", given) : undefined;
  const ok = qd.tensor
    ? t !== undefined && t.dtype === "f32" && t.length === n && t.backend === backend
    : v !== undefined && v.kind === "Float32Array" && v.length === n;
  if (!ok) {
    throw new TypeError(
      `lse must be ${
        qd.tensor ? "an f32 DeviceTensor" : "a Float32Array"
      } of ${n} values (tokens x queryHeads) like q, got ${show(given)}`,
    );
  }
  if ((v && qd.host && overlaps(v, qd.host)) || (t && t.tensor === qd.tensor?.tensor)) {
    throw new TypeError(`lse must not share memory with q`);
  }
  return { dtype: "f32", length: n, host: v, tensor: t, buf: given };
}
