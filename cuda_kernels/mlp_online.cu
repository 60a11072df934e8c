// Online (batch size 1) kernels of the MLP: matrix-vector forward, and the backward pass fused with
// the SGD update so that each weight matrix is streamed through the GPU once per sample.
// Reference: gpumlp/reference.py (layer_forward_ref, backward_update_partial_ref,
// backward_reduce_ref). Layout everywhere: W is (n_out, n_in) row-major, vectors are contiguous.
//
// Determinism: no atomics; every sum runs in an order fixed by the launch shape only, so the same
// inputs give the same bits on every run. Sums use explicit fmaf; the single-rounding steps that
// the reference does as separate float32 operations (the update W - lr*(d*x), the tanh scaling,
// f'(y)) use __fmul_rn/__fadd_rn/__fsub_rn so NVRTC cannot contract them into an fma: the weight
// update is then bit-identical to sgd_update_ref, and only the dot products differ (order).

#define TANH_A 0x1.b74538p+0f        // float32(1.7159)
#define TANH_B 0x1.554c98p-1f        // float32(0.6666)
#define TANH_B_OVER_A 0x1.8dceccp-2f // float32(TANH_B) / float32(TANH_A), rounded once as numpy does
#define TANH_A_SQUARED 0x1.78df3cp+1f // float32(TANH_A) * float32(TANH_A)

#define FULL_MASK 0xffffffffu

// Rows of W per chunk, and columns per block, of backward_update_partial (ops_mlp.py mirrors
// these). 128 columns x 32 rows: a 2000 x 2500 layer is 20 x 63 = 1260 blocks, enough to fill a
// GPU several times over, while each thread still streams 32 weights (amortising its x[j] load
// and the one partial-sum store).
#define BU_ROWS 32
#define BU_COLS 128

__device__ __forceinline__ float scaled_tanh(float a)
{
    return __fmul_rn(TANH_A, tanhf(__fmul_rn(TANH_B, a)));
}

// dy/da of the scaled tanh written through its output y: (B/A)(A^2 - y^2), same roundings as
// scaled_tanh_derivative_from_output.
__device__ __forceinline__ float scaled_tanh_derivative(float y)
{
    return __fmul_rn(TANH_B_OVER_A, __fsub_rn(TANH_A_SQUARED, __fmul_rn(y, y)));
}

// layer_forward_mv: y = act(W x + b) for ONE sample.
//   W (n_out, n_in), b (n_out,), x (n_in,), y (n_out,); activate != 0: scaled tanh, else linear.
// One warp per output row (blockDim.x a multiple of 32; rows = blockIdx.x * warps + warp). Lane l
// reads W[row, l], W[row, l+32], ...: a warp touches 128 contiguous bytes per step, so W, the
// dominant traffic, is read fully coalesced. The 32 lane sums are combined by an xor butterfly
// whose pairing is fixed (and whose a+b / b+a pairs round identically, so every lane ends with the
// same value).
extern "C" __global__ void layer_forward_mv(const float* __restrict__ W,
                                            const float* __restrict__ b,
                                            const float* __restrict__ x,
                                            float* __restrict__ y,
                                            int n_out, int n_in, int activate)
{
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= n_out)
        return;   // row is the same for the whole warp, so no shuffle below loses a partner
    const float* w = W + (size_t)row * n_in;
    float sum = 0.0f;
    for (int j = lane; j < n_in; j += 32)
        sum = fmaf(w[j], x[j], sum);
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1)
        sum = __fadd_rn(sum, __shfl_xor_sync(FULL_MASK, sum, offset));
    if (lane == 0) {
        const float a = __fadd_rn(sum, b[row]);
        y[row] = activate ? scaled_tanh(a) : a;
    }
}

// The streaming loop of backward_update_partial; MOMENTUM is a template flag so the plain-SGD
// path neither branches per weight nor touches a velocity array.
template <bool MOMENTUM>
__device__ __forceinline__ float update_column(float* __restrict__ W, float* __restrict__ vW,
                                               const float* __restrict__ delta_out, float xj,
                                               int j, int n_in, int row_begin, int row_end,
                                               float lr, float momentum)
{
    float acc = 0.0f;
    for (int i = row_begin; i < row_end; ++i) {
        const float d = delta_out[i];                // same address for the block: a broadcast
        const size_t idx = (size_t)i * n_in + j;
        const float old = W[idx];
        acc = fmaf(old, d, acc);                     // backward product uses the OLD weight
        const float step = __fmul_rn(lr, __fmul_rn(d, xj));   // lr * grad, grad = d x (B = 1)
        if (MOMENTUM) {
            const float v = __fsub_rn(__fmul_rn(momentum, vW[idx]), step);
            vW[idx] = v;
            W[idx] = __fadd_rn(old, v);
        } else {
            W[idx] = __fsub_rn(old, step);
        }
    }
    return acc;
}

// backward_update_partial: the backward product delta_out W and the SGD step of W in ONE pass.
//   W (n_out, n_in), b (n_out,), delta_out (n_out,), x (n_in,) the layer's input,
//   partial (n_chunks, n_in) with n_chunks = ceil(n_out / BU_ROWS), written if want_partial,
//   vW (n_out, n_in) and vb (n_out,) velocities, used only when momentum != 0 (any array of the
//   right type may be passed otherwise; it is not touched).
// Grid (ceil(n_in / blockDim.x), n_chunks), blockDim.x = BU_COLS (any multiple of 32 works).
// Thread (tile, chunk, t) owns column j = tile * blockDim.x + t for rows chunk*BU_ROWS ... +BU_ROWS:
// reads each W[i, j] once, adds W[i, j] * delta_out[i] to its partial sum and writes the updated
// weight; consecutive threads touch consecutive j, so every row segment is coalesced. The partial
// sums of all chunks are added by backward_reduce in chunk order (no atomics). Each weight has
// exactly one owner, so reading the old value and writing the new one cannot race.
// Blocks of column tile 0 also update the biases of their chunk's rows.
extern "C" __global__ void backward_update_partial(float* __restrict__ W,
                                                   float* __restrict__ b,
                                                   const float* __restrict__ delta_out,
                                                   const float* __restrict__ x,
                                                   float* __restrict__ partial,
                                                   float* __restrict__ vW,
                                                   float* __restrict__ vb,
                                                   int n_out, int n_in,
                                                   float lr, float momentum, int want_partial)
{
    const int chunk = blockIdx.y;
    const int row_begin = chunk * BU_ROWS;
    const int row_end = min(row_begin + BU_ROWS, n_out);
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    const bool use_momentum = momentum != 0.0f;

    if (j < n_in) {
        const float xj = x[j];
        const float acc = use_momentum
            ? update_column<true>(W, vW, delta_out, xj, j, n_in, row_begin, row_end, lr, momentum)
            : update_column<false>(W, vW, delta_out, xj, j, n_in, row_begin, row_end, lr, momentum);
        if (want_partial)
            partial[(size_t)chunk * n_in + j] = acc;
    }

    // grad_b = delta_out (B = 1): one thread per bias row of the chunk, in tile 0 only.
    const int i = row_begin + threadIdx.x;
    if (blockIdx.x == 0 && threadIdx.x < BU_ROWS && i < row_end) {
        const float step = __fmul_rn(lr, delta_out[i]);
        if (use_momentum) {
            const float v = __fsub_rn(__fmul_rn(momentum, vb[i]), step);
            vb[i] = v;
            b[i] = __fadd_rn(b[i], v);
        } else {
            b[i] = __fsub_rn(b[i], step);
        }
    }
}

// backward_reduce: delta_in = (sum over chunks of partial) * f'(y_in), finishing delta_out W.
//   partial (n_chunks, n_in), y_in (n_in,) the scaled-tanh outputs of the layer below,
//   delta_in (n_in,). One thread per j (grid ceil(n_in / blockDim.x)); the chunks are added in
//   increasing order, and consecutive threads read consecutive j of each chunk row (coalesced).
//   Not launched for the first layer (its input is the image, which has no delta).
extern "C" __global__ void backward_reduce(const float* __restrict__ partial,
                                           const float* __restrict__ y_in,
                                           float* __restrict__ delta_in,
                                           int n_chunks, int n_in)
{
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= n_in)
        return;
    float sum = partial[j];
    for (int c = 1; c < n_chunks; ++c)
        sum = __fadd_rn(sum, partial[(size_t)c * n_in + j]);
    delta_in[j] = __fmul_rn(sum, scaled_tanh_derivative(y_in[j]));
}
