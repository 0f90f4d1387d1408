/**
 * A small seeded generator (mulberry32) with normal and Student-t draws, so demos, benchmarks and
 * tests reproduce exactly from a printed seed.
 *
 * @module
 */

/**
 * Seeded pseudo-random numbers.
 *
 * @example
 * ```ts
 * import { Rng } from "./mod.ts";
 * const rng = new Rng(42);
 * console.log(rng.next(), rng.normal(), rng.int(10)); // the same numbers on every run
 * ```
 */
export class Rng {
  #s: number;
  #spare: number | undefined;
  constructor(readonly seed: number) {
    this.#s = seed >>> 0;
  }
  /** Uniform in [0, 1). */
  next(): number {
    let t = (this.#s = (this.#s + 0x6d2b79f5) >>> 0);
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  }
  /** Uniform integer in [0, n). */
  int(n: number): number {
    return Math.floor(this.next() * n);
  }
  /** Uniform in [lo, hi). */
  uniform(lo: number, hi: number): number {
    return lo + (hi - lo) * this.next();
  }
  /** Standard normal (Box-Muller, both halves used). */
  normal(): number {
    if (this.#spare !== undefined) {
      const s = this.#spare;
      this.#spare = undefined;
      return s;
    }
    const u = 1 - this.next(), v = this.next();
    const r = Math.sqrt(-2 * Math.log(u));
    this.#spare = r * Math.sin(2 * Math.PI * v);
    return r * Math.cos(2 * Math.PI * v);
  }
  /** Student-t with `nu` degrees of freedom (heavy tails for small nu). */
  studentT(nu: number): number {
    let chi = 0;
    for (let i = 0; i < nu; i++) chi += this.normal() ** 2;
    return this.normal() / Math.sqrt(chi / nu);
  }
  /** A Float32Array of n standard normals. */
  normals(n: number, scale = 1): Float32Array {
    const a = new Float32Array(n);
    for (let i = 0; i < n; i++) a[i] = scale * this.normal();
    return a;
  }
}
