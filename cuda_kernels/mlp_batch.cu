// Minibatch kernels of the MLP: the three products of a layer as tiled matrix-matrix kernels.
// Reference: gpumlp/reference.py (layer_forward_ref, layer_forward_gemm_gather_ref,
// backprop_delta_ref, sgd_update_ref).
// Layout: W (n_out, n_in) row-major; a batch is (B, n) row-major.
//
// All three share one tiled GEMM, C (M, N) = A (M, K) B (K, N), with 64 x 64 output tiles, 16-deep
// K slices staged in shared memory, and 256 threads that each keep a 4 x 4 block of C in
// registers (each shared value loaded feeds 4 fmas instead of 1). A and B may be stored with K
// contiguous or with M (resp. N) contiguous; the staging loop maps consecutive threads to the
// contiguous direction so global loads stay coalesced for every layout.
//
// Determinism: no atomics; each C element is one thread's fmaf chain over k = 0, 1, ..., K-1, so
// the bits depend only on the inputs. Epilogue steps that the reference rounds separately use
// __fmul_rn/__fadd_rn/__fsub_rn/__fdiv_rn (no contraction).

#include "mlp_common.cuh"

#define TILE_M 64
#define TILE_N 64
#define TILE_K 16
#define THREADS 256      // 16 x 16 threads, blockDim = (256, 1, 1); ops_mlp.py mirrors these
#define THREAD_M 4       // TILE_M / 16
#define THREAD_N 4       // TILE_N / 16
#define PAD 1            // tile rows of 65 floats: the K-contiguous staging stores hit distinct banks

// Stage the K slice [k0, k0 + TILE_K) of rows [r0, r0 + TILE) of an operand into S[k][r] (zero
// outside the matrix, so the product loop needs no bounds checks). The operand element (r, k) is
// P[r * ld + k] when K_CONTIGUOUS, else P[k * ld + r].
template <bool K_CONTIGUOUS, int TILE>
__device__ __forceinline__ void stage_tile(const float* __restrict__ P, int ld, int rows, int K,
                                           int r0, int k0, float (*S)[TILE + PAD])
{
    for (int e = threadIdx.x; e < TILE * TILE_K; e += THREADS) {
        const int kk = K_CONTIGUOUS ? e % TILE_K : e / TILE;
        const int r = K_CONTIGUOUS ? e / TILE_K : e % TILE;
        const int gr = r0 + r, gk = k0 + kk;
        float value = 0.0f;
        if (gr < rows && gk < K)
            value = P[K_CONTIGUOUS ? (size_t)gr * ld + gk : (size_t)gk * ld + gr];
        S[kk][r] = value;
    }
}

// Stage the K slice [k0, k0 + TILE_K) of rows [r0, r0 + TILE_M) of the gathered batch into S[k][r]
// as stage_tile<true, TILE_M> stages a K-contiguous operand: row r is images[order[start + r]]
// (K = n_in contiguous), zero outside the batch or past the end of the epoch. When copy_out, each
// staged element inside the batch is also written to X[r * K + k] (the batch, for the layer's
// update), so one column tile of blocks leaves the whole gathered batch in X.
__device__ __forceinline__ void stage_gathered_tile(const float* __restrict__ images,
                                                    const int* __restrict__ order, int start, int n_samples,
                                                    int rows, int K, int r0, int k0,
                                                    float (*S)[TILE_M + PAD], float* __restrict__ X,
                                                    bool copy_out)
{
    for (int e = threadIdx.x; e < TILE_M * TILE_K; e += THREADS) {
        const int kk = e % TILE_K, r = e / TILE_K;
        const int gr = r0 + r, gk = k0 + kk;
        float value = 0.0f;
        if (gr < rows && gk < K && start + gr < n_samples) {
            value = images[(size_t)order[start + gr] * K + gk];
            if (copy_out)
                X[(size_t)gr * K + gk] = value;
        }
        S[kk][r] = value;
    }
}

// acc[i][j] = sum_k A(m0 + ty + 16 i, k) B(k, n0 + tx + 16 j) for this thread (tx, ty) =
// (tid % 16, tid / 16), k = 0, 1, ..., K-1 in order. stage_a(k0) leaves A's slice in As,
// As[k - k0][m - m0] = A(m, k) (stage_tile of A, or stage_gathered_tile for a gathered batch: the
// same values, so the same bits); B(k, n) = Bm[n ldb + k] if B_K_CONTIGUOUS else Bm[k ldb + n].
// Strided (ty + 16 i) rather than blocked ownership: a warp's reads of As are two broadcast
// addresses and its reads of Bs are 16 consecutive floats, and its stores of C are 16-float
// contiguous runs.
template <bool B_K_CONTIGUOUS, typename StageA>
__device__ __forceinline__ void gemm_tile(StageA stage_a, const float* __restrict__ Bm, int ldb,
                                          int N, int K, int n0,
                                          float (*As)[TILE_M + PAD], float (*Bs)[TILE_N + PAD],
                                          float (&acc)[THREAD_M][THREAD_N])
{
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
    for (int i = 0; i < THREAD_M; ++i)
#pragma unroll
        for (int j = 0; j < THREAD_N; ++j)
            acc[i][j] = 0.0f;
    for (int k0 = 0; k0 < K; k0 += TILE_K) {
        stage_a(k0);
        stage_tile<B_K_CONTIGUOUS, TILE_N>(Bm, ldb, N, K, n0, k0, Bs);
        __syncthreads();   // the slice is complete before anyone multiplies
        const int k_len = min(TILE_K, K - k0);   // stop at K: padding zeros would still add +0
        for (int kk = 0; kk < k_len; ++kk) {
            float a[THREAD_M], bv[THREAD_N];
#pragma unroll
            for (int i = 0; i < THREAD_M; ++i)
                a[i] = As[kk][ty + 16 * i];
#pragma unroll
            for (int j = 0; j < THREAD_N; ++j)
                bv[j] = Bs[kk][tx + 16 * j];
#pragma unroll
            for (int i = 0; i < THREAD_M; ++i)
#pragma unroll
                for (int j = 0; j < THREAD_N; ++j)
                    acc[i][j] = fmaf(a[i], bv[j], acc[i][j]);
        }
        __syncthreads();   // everyone is done with the slice before it is overwritten
    }
}

// Hands each element of this thread's 4 x 4 block of C that lies inside the M x N matrix to
// store(m, n, value): the kernels differ only in what they do with a finished product.
template <typename Store>
__device__ __forceinline__ void for_each_result(const float (&acc)[THREAD_M][THREAD_N], int m0, int n0,
                                                int M, int N, Store store)
{
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
    for (int i = 0; i < THREAD_M; ++i) {
        const int m = m0 + ty + 16 * i;
#pragma unroll
        for (int j = 0; j < THREAD_N; ++j) {
            const int n = n0 + tx + 16 * j;
            if (m < M && n < N)
                store(m, n, acc[i][j]);
        }
    }
}

// layer_forward_gemm: Y (B, n_out) = act(X (B, n_in) W^T + b); activate != 0: scaled tanh.
//   X (B, n_in), W (n_out, n_in), b (n_out,). Both operands have K = n_in contiguous.
//   Grid (ceil(n_out / 64), ceil(B / 64)), block 256. Used for training minibatches and for
//   evaluating batches of test images.
extern "C" __global__ void layer_forward_gemm(const float* __restrict__ X,
                                              const float* __restrict__ W,
                                              const float* __restrict__ b,
                                              float* __restrict__ Y,
                                              int batch, int n_out, int n_in, int activate)
{
    __shared__ float As[TILE_K][TILE_M + PAD];
    __shared__ float Bs[TILE_K][TILE_N + PAD];
    float acc[THREAD_M][THREAD_N];
    const int m0 = blockIdx.y * TILE_M, n0 = blockIdx.x * TILE_N;
    gemm_tile<true>([&](int k0) { stage_tile<true, TILE_M>(X, n_in, batch, n_in, m0, k0, As); },
                    W, n_in, n_out, n_in, n0, As, Bs, acc);
    for_each_result(acc, m0, n0, batch, n_out, [&](int m, int n, float product) {
        const float a = __fadd_rn(product, b[n]);
        Y[(size_t)m * n_out + n] = activate ? scaled_tanh(a) : a;
    });
}

// layer_forward_gemm_gather: the first layer of a minibatch step with the gather of its batch
// fused in (so the step needs no gather launch): row r of the batch is sample order[*cursor + r],
// Y (B, n_out) = act(X W^T + b) exactly as layer_forward_gemm computes it on that batch, and the
// blocks of column tile 0 also copy the batch to X (B, n_in) and its labels to labels_out (B,)
// (for the first layer's update and for softmax_xent).
//   W (n_out, n_in), b (n_out,), images (n_samples, n_in), labels (n_samples,) int, order
//   (n_samples,) int this epoch's permutation, cursor (1,) int the position in the epoch (advanced
//   by softmax_xent, later in the step). Rows past the end of the epoch read as zeros and leave
//   X and labels_out untouched (the trainer sizes its last step so that never happens).
//   Grid (ceil(n_out / 64), ceil(B / 64)), block 256.
extern "C" __global__ void layer_forward_gemm_gather(const float* __restrict__ W,
                                                     const float* __restrict__ b,
                                                     const float* __restrict__ images,
                                                     const int* __restrict__ labels,
                                                     const int* __restrict__ order,
                                                     const int* __restrict__ cursor,
                                                     float* __restrict__ X,
                                                     int* __restrict__ labels_out,
                                                     float* __restrict__ Y,
                                                     int batch, int n_out, int n_in, int activate,
                                                     int n_samples)
{
    __shared__ float As[TILE_K][TILE_M + PAD];
    __shared__ float Bs[TILE_K][TILE_N + PAD];
    float acc[THREAD_M][THREAD_N];
    const int m0 = blockIdx.y * TILE_M, n0 = blockIdx.x * TILE_N;
    const int start = cursor[0];
    const bool copy_out = blockIdx.x == 0;
    gemm_tile<true>([&](int k0) {
                        stage_gathered_tile(images, order, start, n_samples, batch, n_in, m0, k0, As, X, copy_out);
                    },
                    W, n_in, n_out, n_in, n0, As, Bs, acc);
    for_each_result(acc, m0, n0, batch, n_out, [&](int m, int n, float product) {
        const float a = __fadd_rn(product, b[n]);
        Y[(size_t)m * n_out + n] = activate ? scaled_tanh(a) : a;
    });
    const int r = m0 + threadIdx.x;
    if (copy_out && threadIdx.x < TILE_M && r < batch && start + r < n_samples)
        labels_out[r] = labels[order[start + r]];
}

// backprop_delta_gemm: delta_in (B, n_in) = (delta_out (B, n_out) W) * f'(y_in).
//   W (n_out, n_in) must still hold the weights used in the forward pass: launch this BEFORE
//   sgd_update_gemm of the same layer. y_in (B, n_in) the scaled-tanh outputs of the layer below.
//   K = n_out: contiguous in delta_out, strided in W (whose n_in direction is contiguous).
//   Grid (ceil(n_in / 64), ceil(B / 64)), block 256.
extern "C" __global__ void backprop_delta_gemm(const float* __restrict__ delta_out,
                                               const float* __restrict__ W,
                                               const float* __restrict__ y_in,
                                               float* __restrict__ delta_in,
                                               int batch, int n_out, int n_in)
{
    __shared__ float As[TILE_K][TILE_M + PAD];
    __shared__ float Bs[TILE_K][TILE_N + PAD];
    float acc[THREAD_M][THREAD_N];
    const int m0 = blockIdx.y * TILE_M, n0 = blockIdx.x * TILE_N;
    gemm_tile<false>([&](int k0) { stage_tile<true, TILE_M>(delta_out, n_out, batch, n_out, m0, k0, As); },
                     W, n_in, n_in, n_out, n0, As, Bs, acc);
    for_each_result(acc, m0, n0, batch, n_in, [&](int m, int n, float product) {
        const size_t idx = (size_t)m * n_in + n;
        delta_in[idx] = __fmul_rn(product, scaled_tanh_derivative(y_in[idx]));
    });
}

// sgd_update_gemm: one SGD step on the batch-mean gradient, in place.
//   grad_W (n_out, n_in) = delta_out^T (n_out, B) X (B, n_in) / B; grad_b = column sums / B.
//   Without momentum W -= lr grad; with momentum mu: v = mu v - lr grad, W += v (vW (n_out, n_in),
//   vb (n_out,) used only when momentum != 0; pass any float arrays otherwise). hyper (2,) =
//   {lr, momentum} in device memory, so a captured graph replays with each epoch's lr.
//   K = B, strided in both operands (their contiguous directions are n_out and n_in).
//   Grid (ceil(n_in / 64), ceil(n_out / 64)), block 256. Each weight is read and written by the
//   one thread that computed its gradient. Blocks of column tile 0 also update the biases of
//   their 64 rows: thread t < 64 adds delta_out[r, m0 + t] over r = 0 .. B-1 in order.
extern "C" __global__ void sgd_update_gemm(const float* __restrict__ delta_out,
                                           const float* __restrict__ X,
                                           float* __restrict__ W,
                                           float* __restrict__ b,
                                           float* __restrict__ vW,
                                           float* __restrict__ vb,
                                           const float* __restrict__ hyper,
                                           int batch, int n_out, int n_in)
{
    __shared__ float As[TILE_K][TILE_M + PAD];
    __shared__ float Bs[TILE_K][TILE_N + PAD];
    float acc[THREAD_M][THREAD_N];
    const int m0 = blockIdx.y * TILE_M, n0 = blockIdx.x * TILE_N;
    gemm_tile<false>([&](int k0) { stage_tile<false, TILE_M>(delta_out, n_out, n_out, batch, m0, k0, As); },
                     X, n_in, n_in, batch, n0, As, Bs, acc);
    const float lr = hyper[0], momentum = hyper[1];   // read after the product: not live through it
    const bool use_momentum = momentum != 0.0f;
    const float scale = (float)batch;
    for_each_result(acc, m0, n0, n_out, n_in, [&](int m, int n, float product) {
        const size_t idx = (size_t)m * n_in + n;
        sgd_step(W + idx, vW + idx, __fmul_rn(lr, __fdiv_rn(product, scale)), momentum, use_momentum);
    });
    const int m = m0 + threadIdx.x;
    if (blockIdx.x == 0 && threadIdx.x < TILE_M && m < n_out) {
        float sum = 0.0f;
        for (int r = 0; r < batch; ++r)
            sum = __fadd_rn(sum, delta_out[(size_t)r * n_out + m]);
        sgd_step(b + m, vb + m, __fmul_rn(lr, __fdiv_rn(sum, scale)), momentum, use_momentum);
    }
}
