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

/**
 * Exact causal attention of a chunk of n tokens over itself, in float64, with k and v rounded to fp16
 * (what the cache stores) and q as given: out [n][queryHeads][headDim] and the natural log-sum-exp
 * [n][queryHeads] (f32). Query i sees the chunk's tokens 0..i.
 */
export function chunkAttention(
  q: ArrayLike<number>,
  k: ArrayLike<number>,
  v: ArrayLike<number>,
  n: number,
  c: { readonly kvHeads: number; readonly queryHeads: number; readonly headDim: number },
  scale: number,
): { out: Float32Array; lse: Float32Array } {
  const { kvHeads: H, queryHeads: QH, headDim: D } = c;
  const ratio = QH / H, f16 = Math.f16round;
  const kh16 = Float64Array.from(k, f16), vh16 = Float64Array.from(v, f16);
  const out = new Float32Array(n * QH * D), lse = new Float32Array(n * QH);
  const s = new Float64Array(n), acc = new Float64Array(D);
  for (let i = 0; i < n; i++) {
    for (let h = 0; h < QH; h++) {
      const kh = Math.floor(h / ratio), qo = (i * QH + h) * D;
      let m = -Infinity;
      for (let t = 0; t <= i; t++) {
        let dot = 0;
        const ko = (t * H + kh) * D;
        for (let d = 0; d < D; d++) dot += q[qo + d] * kh16[ko + d];
        s[t] = dot * scale;
        if (s[t] > m) m = s[t];
      }
      let sum = 0;
      acc.fill(0);
      for (let t = 0; t <= i; t++) {
        const w = Math.exp(s[t] - m), vo = (t * H + kh) * D;
        sum += w;
        for (let d = 0; d < D; d++) acc[d] += w * vh16[vo + d];
      }
      for (let d = 0; d < D; d++) out[qo + d] = acc[d] / sum;
      lse[i * QH + h] = m + Math.log(sum);
    }
  }
  return { out, lse };
}
