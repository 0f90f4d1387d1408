/*
 * batch.cuh — the device side of a decode batch's deferred checks, shared by batch.cu (the window and
 * table kernels of kivi_batch_append) and the attention kernels (which check q of kivi_batch_attend
 * as they load it): the device words and the end every checking kernel runs.
 */
#ifndef KIVI_BATCH_CUH
#define KIVI_BATCH_CUH

#include "kivi_batch.h"

/* Device words of a batch's checks. */
struct kv_batch_dev {
  unsigned long long pending; /* a call met a bad value that the host has not read: outs are NaN */
  unsigned long long first;   /* the lowest key of the running call (the last block resets it) */
  unsigned int done;          /* blocks of the running call past their scan (the last block resets it) */
};

/* The end of a checking kernel, called by every thread of every block: the block's lowest key joins
   the call's, and the last block to finish publishes the call's first bad element to the record (key
   and call only when none is recorded yet, then `any`) and marks the batch pending. True in the last
   block when outs must be poisoned: this call or an earlier unread one met a bad value. */
__device__ __forceinline__ bool kv_batch_finish(unsigned long long mine, kv_batch_dev *dev, kivi_batch_record *rec,
                                                int32_t op, int32_t layer) {
  /* No static shared memory: it would be added to every attention kernel's CTA (their dynamic shared
     memory is sized to fit a number of CTAs a SM). Each warp's lowest key goes to the call's by an
     atomic of its own (only where a warp met a bad value), and the block's answer comes back through
     __syncthreads_or. */
  for (int o = 16; o > 0; o >>= 1) {
    const unsigned long long w = __shfl_down_sync(0xffffffffu, mine, o);
    mine = w < mine ? w : mine;
  }
  if ((threadIdx.x & 31) == 0 && mine != KIVI_CHECK_NONE) {
    atomicMin(&dev->first, mine);
    __threadfence();
  }
  __syncthreads();
  bool out = false;
  if (threadIdx.x == 0) {
    __threadfence();
    if (atomicAdd(&dev->done, 1u) == gridDim.x - 1) {
      const unsigned long long key = atomicExch(&dev->first, (unsigned long long)KIVI_CHECK_NONE);
      dev->done = 0;
      if (key != KIVI_CHECK_NONE) {
        dev->pending = 1;
        if (rec->key == KIVI_CHECK_NONE) {
          rec->key = key;
          rec->op = op;
          rec->layer = layer;
        }
        __threadfence_system();
        rec->any = 1;
        __threadfence_system();
      }
      out = dev->pending != 0;
    }
  }
  return __syncthreads_or(out);
}

#endif /* KIVI_BATCH_CUH */
