/*
 * cublas_api.h — the few cuBLAS entry points the model ops use, declared from the public cuBLAS API
 * documentation (docs.nvidia.com/cuda/cublas: cublasCreate, cublasDestroy, cublasSetStream,
 * cublasSgemm, cublasGemmEx; the _v2 names are the exported symbols; the enum values are those of
 * cudaDataType_t, cublasComputeType_t and cublasGemmAlgo_t), so that the CUDA build needs neither
 * cuBLAS's headers nor its library at build time: model.cu loads libcublas.so.13 with dlopen on first
 * use and reports KIVI_ERR_UNSUPPORTED, saying what is missing, where it cannot.
 */
#ifndef KIVI_CUBLAS_API_H
#define KIVI_CUBLAS_API_H

#include <cuda_runtime.h>

typedef struct kv_cublas_context *kv_cublas_handle; /* cublasHandle_t */
typedef int kv_cublas_status;                       /* cublasStatus_t: 0 is CUBLAS_STATUS_SUCCESS */
typedef int kv_cublas_op;                           /* cublasOperation_t */

enum { KV_CUBLAS_OP_N = 0, KV_CUBLAS_OP_T = 1 };
typedef int kv_cuda_data_type;   /* cudaDataType_t */
typedef int kv_cublas_compute;   /* cublasComputeType_t */
typedef int kv_cublas_gemm_algo; /* cublasGemmAlgo_t */
enum { KV_CUDA_R_32F = 0, KV_CUDA_R_16F = 2 };
enum { KV_CUBLAS_COMPUTE_32F = 68 };
enum { KV_CUBLAS_GEMM_DEFAULT = -1 };

typedef kv_cublas_status (*kv_cublas_create_fn)(kv_cublas_handle *handle);
typedef kv_cublas_status (*kv_cublas_destroy_fn)(kv_cublas_handle handle);
typedef kv_cublas_status (*kv_cublas_set_stream_fn)(kv_cublas_handle handle, cudaStream_t stream);
/* C = alpha op(A) op(B) + beta C, column-major: op(A) m x k, op(B) k x n, C m x n. */
typedef kv_cublas_status (*kv_cublas_sgemm_fn)(kv_cublas_handle handle, kv_cublas_op transa, kv_cublas_op transb, int m,
                                               int n, int k, const float *alpha, const float *A, int lda,
                                               const float *B, int ldb, const float *beta, float *C, int ldc);

/* cublasGemmEx: as Sgemm with typed A, B and C; alpha and beta of the compute type's scale (float for
   CUBLAS_COMPUTE_32F). */
typedef kv_cublas_status (*kv_cublas_gemm_ex_fn)(kv_cublas_handle handle, kv_cublas_op transa, kv_cublas_op transb,
                                                 int m, int n, int k, const void *alpha, const void *A,
                                                 kv_cuda_data_type Atype, int lda, const void *B,
                                                 kv_cuda_data_type Btype, int ldb, const void *beta, void *C,
                                                 kv_cuda_data_type Ctype, int ldc, kv_cublas_compute computeType,
                                                 kv_cublas_gemm_algo algo);

/** The library names tried, in order (the loader path first, then the toolkit's usual folder). */
#define KV_CUBLAS_LIBS \
  { "libcublas.so.13", "/usr/local/cuda/lib64/libcublas.so.13" }

/** The entry points, resolved once per process. */
typedef struct kv_cublas_api {
  kv_cublas_create_fn create;         /* cublasCreate_v2 */
  kv_cublas_destroy_fn destroy;       /* cublasDestroy_v2 */
  kv_cublas_set_stream_fn set_stream; /* cublasSetStream_v2 */
  kv_cublas_sgemm_fn sgemm;           /* cublasSgemm_v2 */
  kv_cublas_gemm_ex_fn gemm_ex;       /* cublasGemmEx */
} kv_cublas_api;

#endif /* KIVI_CUBLAS_API_H */
