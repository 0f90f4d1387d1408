/**
 * Private: the decode attention path of KVCache.attend (arguments read once, sequence ids in a
 * scratch array, q and the output bound, the bound export run), apart from cache.ts so that it stays a
 * file one can read; the cache passes what it uses of it (AttendHost). benchAttend and read
 * (_cache_io.ts) take their arguments through it too.
 *
 * @module
 */
import type { DeviceTensor } from "./tensor.ts";
import { type ArgsOf, type NativeLib, type Pointer, scratchArray } from "./ffi/_native.ts";
import { dtypeCode, hostArray } from "./_dtype.ts";
import { Staging } from "./_staging.ts";
import { dataPtr } from "./_input.ts";
import { type AttendArgs, attendArgs } from "./_cache_io.ts";
import type { MultiHost, MultiSeq } from "./_multi.ts";

/** What decode attention uses of its cache. */
export type AttendHost<S extends MultiSeq> = Pick<
  MultiHost<S>,
  "config" | "backend" | "live" | "check" | "own" | "usableId"
>;

/** The attention arguments of one call, with the layer. */
export type LayerAttendArgs<S> = AttendArgs<S> & { layer: number };

/** The decode attention of one cache: KVCache.attend without `lse`. */
export class DecodeAttend<S extends MultiSeq> {
  #h: AttendHost<S>;
  /** Scratch of the sequences' slot ids, with its address taken once (under Deno each typed array
   * made costs about 0.45 µs and each address taken 0.35-0.6 µs). Filled right before the native
   * call that reads it, with no user code in between. */
  #ids = scratchArray(Int32Array, 8);
  #idsPtr: Pointer;
  /** The hot export, bound once (no name lookup or argument spreading a call). */
  #attendFn: (...a: ArgsOf<"kivi_cache_attend">) => number;

  constructor(h: AttendHost<S>, lib: NativeLib) {
    this.#h = h;
    this.#idsPtr = lib.ptr(this.#ids);
    this.#attendFn = lib.fn("kivi_cache_attend");
  }

  /** Reads and checks attention arguments once; no native handle is taken here. */
  args(
    layerArg: unknown,
    seqsArg: unknown,
    q: unknown,
    o: { scale?: unknown; dtype?: unknown; qDtype?: unknown; out?: unknown; trusted?: unknown },
  ): LayerAttendArgs<S> {
    const h = this.#h;
    return attendArgs(h.config, h.backend, (n, x) => h.own(n, x), layerArg, seqsArg, q, o);
  }

  /** Attention of one layer (see KVCache.attend), `o` read once by the caller. */
  attend(
    layer: unknown,
    seqs: unknown,
    q: unknown,
    o: { scale?: unknown; dtype?: unknown; qDtype?: unknown; out?: unknown; trusted?: unknown },
  ): unknown {
    const a = this.args(layer, seqs, q, o);
    const { handle } = this.#h.live("attend");
    if (a.q.tensor && a.out?.host === undefined) return this.#attendTensors("attend", a, handle);
    using stage = new Staging(this.#h.backend, "attend");
    const b = this.bind("attend", a, stage);
    this.#run(handle, a, b.ids, b.pq, b.po, b.made);
    stage.finish();
    return b.out;
  }

  /** The address of the sequences' slot ids (each usable: KIVI_ERR_STATE once freed), in the
   * scratch array. */
  #fillIds(seqs: readonly S[], op: string): Pointer {
    if (this.#ids.length < seqs.length) {
      this.#ids = scratchArray(Int32Array, Math.max(seqs.length, 2 * this.#ids.length));
      this.#idsPtr = this.#h.live(op).state.lib.ptr(this.#ids);
    }
    for (let i = 0; i < seqs.length; i++) this.#ids[i] = this.#h.usableId(seqs[i], op);
    return this.#idsPtr;
  }

  /** Attention on tensors only (q, and out when given): no staging, the bound export. */
  #attendTensors(op: string, a: LayerAttendArgs<S>, handle: Pointer): unknown {
    const ids = this.#fillIds(a.seqs, op);
    const pq = a.q.tensor!.pointer(op);
    const { backend, config: c } = this.#h;
    let made: DeviceTensor | undefined, po: Pointer;
    if (a.out !== undefined) po = a.out.tensor!.writePointer(op, "out");
    else {
      made = backend.alloc([a.seqs.length, c.queryHeads, c.headDim], a.dtype);
      po = backend._tensor(made)!.pointer(op);
    }
    this.#run(handle, a, ids, pq, po, made);
    return a.out !== undefined ? a.out.buf : made;
  }

  /** Runs the bound attention export; on failure frees the output it made and throws. */
  #run(
    handle: Pointer,
    a: LayerAttendArgs<S>,
    ids: Pointer,
    pq: Pointer,
    po: Pointer,
    made: DeviceTensor | undefined,
  ): void {
    const st = this.#attendFn(
      handle,
      a.layer,
      ids,
      a.seqs.length,
      pq,
      dtypeCode[a.q.dtype],
      a.scale,
      a.trusted ? 1 : 0,
      po,
      dtypeCode[a.dtype],
    );
    if (st !== 0) {
      made?.dispose();
      this.#h.check("kivi_cache_attend", st);
    }
  }

  /** Takes the native handles of attention arguments: live sequence ids, q's address and the
   * output (the caller's, or one allocated where q lives). */
  bind(op: string, a: AttendArgs<S>, stage: Staging) {
    const ids = this.#fillIds(a.seqs, op);
    const pq = dataPtr(a.q, op, stage);
    if (a.out !== undefined) {
      return { ids, pq, out: a.out.buf, po: dataPtr(a.out, op, stage, "out"), made: undefined };
    }
    const { backend, config: c } = this.#h;
    if (a.q.tensor) {
      const made = backend.alloc([a.seqs.length, c.queryHeads, c.headDim], a.dtype);
      return { ids, pq, out: made as unknown, po: backend._tensor(made)!.pointer(op), made };
    }
    const out = hostArray(a.dtype, a.n);
    return { ids, pq, out: out as unknown, po: stage.output(out, a.dtype), made: undefined };
  }
}
