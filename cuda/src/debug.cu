/*
 * debug.cu — kivi_debug_fault, a test-only export: a kernel that writes to an illegal address, so
 * that tests can provoke a sticky CUDA fault and check that the context then refuses every call.
 */
#include <stdint.h>

#include "common.cuh"

/* One store per thread through a pointer no allocation owns. The address comes from the host, so
   the compiler cannot turn the store into a trap (which would be another error than the one wanted). */
static __global__ void k_fault(volatile uint32_t *p) { p[threadIdx.x] = 0xdeadbeefu; }

extern "C" {

KIVI_API kivi_status kivi_debug_fault(kivi_ctx_t ctx) {
  static const char *op = "kivi_debug_fault";
  kivi_status st = kv_enter(ctx, op);
  if (st) return st;
  /* 2^40 words past the context's scratch buffer: mapped by nothing, an illegal address. */
  volatile uint32_t *bad = (volatile uint32_t *)ctx->d_scratch + ((uint64_t)1 << 40);
  k_fault<<<1, 32, 0, ctx->stream>>>(bad);
  if ((st = kv_launched(ctx, op, "k_fault"))) return st;
  if ((st = kv_cuda(ctx, cudaStreamSynchronize(ctx->stream), op, "k_fault (an illegal-address write, on purpose)")))
    return st;
  return kv_fail(ctx, KIVI_ERR_CUDA, "%s: the illegal-address write did not fault", op);
}

} /* extern "C" */
