/**
 * Argument checks run before any native call: a wrong type or shape is a TypeError, a value out of
 * range a RangeError. Messages name the argument, quote the value and say what is expected.
 *
 * @module
 */
import type { DeviceTensor } from "./backend.ts";

/** Quotes a value for an error message. */
export function show(v: unknown): string {
  if (typeof v === "string") return JSON.stringify(v);
  if (typeof v === "bigint") return `${v}n`;
  if (Array.isArray(v)) return `[${v.map(show).join(", ")}]`;
  if (v !== null && typeof v === "object") return v.constructor?.name ?? "object";
  return String(v);
}

/** An integer in [min, max]. */
export function checkInt(name: string, v: unknown, min: number, max = Number.MAX_SAFE_INTEGER): number {
  if (typeof v !== "number") throw new TypeError(`${name} must be a number, got ${show(v)}`);
  if (!Number.isInteger(v)) throw new RangeError(`${name} must be an integer, got ${show(v)}`);
  if (v < min || v > max) {
    throw new RangeError(`${name} must be between ${min} and ${max}, got ${show(v)}`);
  }
  return v;
}

/** One of a fixed set of values. */
export function checkOneOf<T extends string | number>(name: string, v: unknown, allowed: readonly T[]): T {
  if (!allowed.includes(v as T)) {
    const list = allowed.map(show).join(", ");
    const err = typeof v === typeof allowed[0] ? RangeError : TypeError;
    throw new err(`${name} must be one of ${list}, got ${show(v)}`);
  }
  return v as T;
}

/** A [rows, cols] shape of positive integers. */
export function checkShape(name: string, v: unknown): [number, number] {
  if (!Array.isArray(v) || v.length !== 2) {
    throw new TypeError(`${name} must be [rows, cols], got ${show(v)}`);
  }
  return [checkInt(`${name}[0] (rows)`, v[0], 1, 2 ** 40), checkInt(`${name}[1] (cols)`, v[1], 1, 2 ** 40)];
}

/** True for a DeviceTensor (checked by shape, so that modules need not import the class at run time). */
export function isTensor(x: unknown): x is DeviceTensor {
  return x !== null && typeof x === "object" && "pointer" in x && "backend" in x;
}
