// Online (batch size 1) kernels of the MLP: matrix-vector forward, and the backward pass fused with
// the SGD update so that each weight matrix is streamed through the GPU once per sample.
// Reference: gpumlp/reference.py (layer_forward_ref, layer_forward_mv_gather_ref,
// backward_update_partial_ref, backward_reduce_ref). Layout everywhere: W is (n_out, n_in)
// row-major, vectors are contiguous.
//
// Determinism: no atomics; every sum runs in an order fixed by the launch shape only, so the same
// inputs give the same bits on every run. Sums use explicit fmaf; the single-rounding steps that
// the reference does as separate float32 operations (the update W - lr*(d*x), the tanh scaling,
// f'(y)) use __fmul_rn/__fadd_rn/__fsub_rn so NVRTC cannot contract them into an fma: the weight
// update is then bit-identical to sgd_update_ref, and only the dot products differ (order).

#include "mlp_common.cuh"

#define FULL_MASK 0xffffffffu

// Rows of W per chunk, and columns per block, of backward_update_partial (ops_mlp.py mirrors
// these). 128 columns x 32 rows: a 2000 x 2500 layer is 20 x 63 = 1260 blocks, enough to fill a
// GPU several times over, while each thread still streams 32 weights (amortising its x[j] load
// and the one partial-sum store).
#define BU_ROWS 32
#define BU_COLS 128

// Memory-level parallelism. Online SGD is bound by DRAM bandwidth, and by Little's law an H100
// (3.35 TB/s, ~0.8 us loaded latency) needs ~2.7 MB of loads in flight, ~20 KB per SM of 132.
// Every grid below is less than one wave, so the loads each thread keeps outstanding are what
// sets the bandwidth:
//   backward_update_partial: a thread loads BU_UNROLL rows of its column (and as many velocities)
//     before it computes and stores any of them. 2000 x 2500 layer: 1260 blocks, ~9.5 per SM,
//     ~1220 threads x 8 x 4 B = ~39 KB per SM in flight (was one 4-byte load per thread, ~5 KB:
//     the next row's load waited behind this row's store). 2500 x 841: 553 blocks, ~17 KB per SM.
//     The chunk stays 32 rows: halving it would double both the grid and the partial-sum traffic
//     (63 -> 125 chunk rows of n_in floats, written here and read by backward_reduce: 3% -> 6% of
//     the W traffic) and the reduce's serial chain. Registers must stay <= 48 so that all ~10
//     blocks of 128 threads fit an SM's 64K registers (the whole grid then runs in one wave):
//     sm_90 takes 39. (sm_80 takes 64, i.e. ~8 blocks per SM; __launch_bounds__(BU_COLS, 10)
//     would cap it at 48 but makes sm_100 spill.)
//   layer_forward_mv: a lane loads MV_UNROLL elements of its row (and of x) per iteration, into
//     4 accumulators. 2000 x 2500: 2000 warps, ~15 per SM, x 16 x 128 B = ~31 KB per SM (was
//     ~7 loads per lane as ptxas pipelined the old loop, ~14 KB); 2500 x 841: ~19 warps per SM,
//     ~39 KB (but only 2 iterations per lane). The grids are below one wave (313 and 250 blocks
//     of 256), so the extra registers cost no occupancy.
//   backward_reduce: BR_LOADERS threads per column share the loads of its chunk partials (below).
#define BU_UNROLL 8
#define MV_UNROLL 16

// Threads per block of layer_forward_mv (ops_mlp.MV_THREADS), also its __launch_bounds__: the
// bound (<= 64 registers, 4 blocks per SM; the grids need at most ~2.8, net 4's 1500 x 2000
// layer on 375 blocks with 2 warps per row; sm_90 takes 56) is what lets ptxas issue
// all 2 x MV_UNROLL loads of an iteration before the first fmaf. Without it ptxas keeps ~30
// registers and starts the fmafs after ~6 loads of W, which is no better than the old
// one-load-per-step loop that it software-pipelined to ~7 loads in flight.
#define MV_THREADS 256

// Warps that share one output row of layer_forward_mv (its warps_per_row argument: 1, 2 or 4,
// dividing MV_THREADS / 32; ops_mlp.mv_warps_per_row picks it). A short layer (10 x 500, 500 x
// 1000 of net 4) has too few rows for one warp each to keep enough loads in flight; sharing a row
// among 2 or 4 warps multiplies its warps (10 x 500: 10 -> 40 warps, 2 -> 5 blocks) WITHOUT
// changing a single bit of the result, because the warps split the lane's four accumulators
// between them rather than the terms of one sum (see mv_row_sums).
#define MV_ACCUMULATORS 4

// The per-row dot products of layer_forward_mv and layer_forward_mv_gather, and their epilogue:
// y[row] = act(W[row] . x + b[row]) for the block's rows. W (n_out, n_in), b (n_out,), x (n_in,),
// y (n_out,); activate != 0: scaled tanh, else linear.
// Warp w of the block works on row blockIdx.x * (warps / warps_per_row) + w / warps_per_row, as
// part p = w % warps_per_row of it. Lane l of the row reads W[row, l], W[row, l+32], ...: a warp
// touches 128 contiguous bytes per step, so W, the dominant traffic, is read fully coalesced.
// The summation order, which is what fixes the bits (the same for every warps_per_row):
//   * each iteration covers j = j0 + 32 k, k < MV_UNROLL (j0 = lane, lane + 32 MV_UNROLL, ...);
//     element k goes into accumulator k % 4 by fmaf, in increasing k (past n_in a load is skipped
//     and reads as 0; fmaf(0, 0, s) is s, but for -0, and each accumulator runs these same
//     operations for any split);
//   * accumulator m belongs to part m / (4 / warps_per_row): a part loads only the elements of
//     its accumulators and runs exactly the fmaf chain those accumulators run with one warp;
//   * the parts leave their accumulators in shared memory; part 0 combines the four as
//     (a0 + a1) + (a2 + a3), then the 32 lane sums by an xor butterfly whose pairing is fixed
//     (and whose a+b / b+a pairs round identically, so every lane ends with the same value).
// All loads of an iteration are issued before the first fmaf: MV_UNROLL / warps_per_row in flight
// per lane. x is read through the read-only path: every warp of the GPU reads the same n_in
// floats, which stay in L1/L2. Every thread of the block must call this (it has a barrier).
__device__ __forceinline__ void mv_row_sums(const float* __restrict__ W, const float* __restrict__ b,
                                            const float* __restrict__ x, float* __restrict__ y,
                                            int n_out, int n_in, int activate, int warps_per_row)
{
    __shared__ float accumulators[MV_THREADS / 32][MV_ACCUMULATORS][32];   // [row of block][m][lane]
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int group = warp / warps_per_row;        // the row's place in the block
    const int part = warp % warps_per_row;
    const int per_part = MV_ACCUMULATORS / warps_per_row;
    const unsigned mine = ((1u << per_part) - 1u) << (part * per_part);   // bit m: accumulator m is this part's
    const int row = blockIdx.x * ((blockDim.x >> 5) / warps_per_row) + group;
    if (row < n_out) {   // row and part are the same for the whole warp
        const float* w = W + (size_t)row * n_in;
        float acc[MV_ACCUMULATORS] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (int j0 = lane; j0 < n_in; j0 += 32 * MV_UNROLL) {
            float wv[MV_UNROLL], xv[MV_UNROLL];
#pragma unroll
            for (int k = 0; k < MV_UNROLL; ++k) {       // all loads first
                const int j = j0 + 32 * k;
                const bool load = (mine >> (k & 3) & 1u) && j < n_in;
                wv[k] = load ? w[j] : 0.0f;
                xv[k] = load ? x[j] : 0.0f;
            }
#pragma unroll
            for (int k = 0; k < MV_UNROLL; ++k)
                acc[k & 3] = fmaf(wv[k], xv[k], acc[k & 3]);
        }
#pragma unroll
        for (int m = 0; m < MV_ACCUMULATORS; ++m)
            if (mine >> m & 1u)
                accumulators[group][m][lane] = acc[m];
    }
    __syncthreads();   // every part's accumulators are in shared memory
    if (row < n_out && part == 0) {
        const float (*a)[32] = accumulators[group];
        float sum = __fadd_rn(__fadd_rn(a[0][lane], a[1][lane]), __fadd_rn(a[2][lane], a[3][lane]));
#pragma unroll
        for (int offset = 16; offset > 0; offset >>= 1)
            sum = __fadd_rn(sum, __shfl_xor_sync(FULL_MASK, sum, offset));
        if (lane == 0) {
            const float pre = __fadd_rn(sum, b[row]);
            y[row] = activate ? scaled_tanh(pre) : pre;
        }
    }
}

// layer_forward_mv: y = act(W x + b) for ONE sample.
//   W (n_out, n_in), b (n_out,), x (n_in,), y (n_out,); activate != 0: scaled tanh, else linear.
// Grid ceil(n_out / (MV_THREADS / 32 / warps_per_row)), block MV_THREADS; see mv_row_sums.
extern "C" __launch_bounds__(MV_THREADS, 4)
__global__ void layer_forward_mv(const float* __restrict__ W, const float* __restrict__ b,
                                 const float* __restrict__ x, float* __restrict__ y,
                                 int n_out, int n_in, int activate, int warps_per_row);   // (declared for the bound)

extern "C" __global__ void layer_forward_mv(const float* __restrict__ W,
                                            const float* __restrict__ b,
                                            const float* __restrict__ x,
                                            float* __restrict__ y,
                                            int n_out, int n_in, int activate, int warps_per_row)
{
    mv_row_sums(W, b, x, y, n_out, n_in, activate, warps_per_row);
}

// layer_forward_mv_gather: the first layer of an online step, with the gather of its sample fused
// in (so the step needs no gather launch): sample = order[*cursor], y = act(W images[sample] + b)
// exactly as layer_forward_mv computes it, and block 0 also copies images[sample] to X and
// labels[sample] to label_out (for the first layer's update and for softmax_xent).
//   W (n_out, n_in), b (n_out,), images (n_samples, n_in), labels (n_samples,) int, order
//   (n_samples,) int this epoch's permutation, cursor (1,) int the position in the epoch (advanced
//   by softmax_xent, later in the step), X (n_in,), label_out (1,) int, y (n_out,).
// A cursor past the end of the epoch leaves every output untouched (the same for the whole grid;
// the trainer never launches one). Grid and block as layer_forward_mv.
extern "C" __launch_bounds__(MV_THREADS, 4)
__global__ void layer_forward_mv_gather(const float* __restrict__ W, const float* __restrict__ b,
                                        const float* __restrict__ images, const int* __restrict__ labels,
                                        const int* __restrict__ order, const int* __restrict__ cursor,
                                        float* __restrict__ X, int* __restrict__ label_out,
                                        float* __restrict__ y, int n_out, int n_in, int activate,
                                        int warps_per_row, int n_samples);   // (declared for the bound)

extern "C" __global__ void layer_forward_mv_gather(const float* __restrict__ W,
                                                   const float* __restrict__ b,
                                                   const float* __restrict__ images,
                                                   const int* __restrict__ labels,
                                                   const int* __restrict__ order,
                                                   const int* __restrict__ cursor,
                                                   float* __restrict__ X,
                                                   int* __restrict__ label_out,
                                                   float* __restrict__ y,
                                                   int n_out, int n_in, int activate,
                                                   int warps_per_row, int n_samples)
{
    const int position = cursor[0];
    if (position < 0 || position >= n_samples)
        return;   // the same for every thread of the grid
    const int sample = order[position];
    const float* x = images + (size_t)sample * n_in;
    if (blockIdx.x == 0) {
        for (int j = threadIdx.x; j < n_in; j += blockDim.x)
            X[j] = x[j];
        if (threadIdx.x == 0)
            label_out[0] = labels[sample];
    }
    mv_row_sums(W, b, x, y, n_out, n_in, activate, warps_per_row);
}

// The streaming loop of backward_update_partial; MOMENTUM is a template flag so the plain-SGD
// path neither branches per weight nor touches a velocity array. The thread walks its column over
// the `rows` rows of its chunk, BU_UNROLL at a time: it loads the old weights (and velocities) of
// the group first, so BU_UNROLL loads are in flight at once, then for each row in order adds
// old * delta into the partial sum (the same fmaf chain, in the same row order, as one row at a
// time) and stores the updated weight. delta is the chunk's slice of delta_out in shared memory.
template <bool MOMENTUM>
__device__ __forceinline__ float update_column(float* __restrict__ W, float* __restrict__ vW,
                                               const float* __restrict__ delta, float xj,
                                               int j, int n_in, int row_begin, int rows,
                                               float lr, float momentum)
{
    const size_t stride = (size_t)n_in;
    float* __restrict__ w = W + (size_t)row_begin * stride + j;
    float* __restrict__ v = vW + (size_t)row_begin * stride + j;
    float acc = 0.0f;
    for (int r0 = 0; r0 < rows; r0 += BU_UNROLL) {
        float old[BU_UNROLL], vel[BU_UNROLL];
#pragma unroll
        for (int k = 0; k < BU_UNROLL; ++k) {       // all loads of the group first
            const bool inside = r0 + k < rows;     // the same for the whole block
            old[k] = inside ? w[(r0 + k) * stride] : 0.0f;
            if (MOMENTUM)
                vel[k] = inside ? v[(r0 + k) * stride] : 0.0f;
        }
#pragma unroll
        for (int k = 0; k < BU_UNROLL; ++k) {
            if (r0 + k < rows) {
                const float d = delta[r0 + k];         // shared memory, a broadcast
                acc = fmaf(old[k], d, acc);            // backward product uses the OLD weight
                const float step = __fmul_rn(lr, __fmul_rn(d, xj));   // lr * grad, grad = d x (B = 1)
                if (MOMENTUM) {
                    const float vk = __fsub_rn(__fmul_rn(momentum, vel[k]), step);
                    v[(r0 + k) * stride] = vk;
                    w[(r0 + k) * stride] = __fadd_rn(old[k], vk);
                } else {
                    w[(r0 + k) * stride] = __fsub_rn(old[k], step);
                }
            }
        }
    }
    return acc;
}

// backward_update_partial: the backward product delta_out W and the SGD step of W in ONE pass.
//   W (n_out, n_in), b (n_out,), delta_out (n_out,), x (n_in,) the layer's input,
//   partial (n_chunks, n_in) with n_chunks = ceil(n_out / BU_ROWS), written if want_partial,
//   vW (n_out, n_in) and vb (n_out,) velocities, used only when momentum != 0 (any array of the
//   right type may be passed otherwise; it is not touched).
//   hyper (2,) = {lr, momentum}, read from device memory rather than passed by value, so that a
//   CUDA graph captured once replays with each epoch's learning rate (ops_mlp.Hyperparameters).
// Grid (ceil(n_in / blockDim.x), n_chunks), blockDim.x = BU_COLS (any multiple of 32 >= BU_ROWS).
// Thread (tile, chunk, t) owns column j = tile * blockDim.x + t for rows chunk*BU_ROWS ... +BU_ROWS:
// reads each W[i, j] once, adds W[i, j] * delta_out[i] to its partial sum and writes the updated
// weight; consecutive threads touch consecutive j, so every row segment is coalesced. The partial
// sums of all chunks are added by backward_reduce in chunk order (no atomics). Each weight has
// exactly one owner, so reading the old value and writing the new one cannot race.
// Blocks of column tile 0 also update the biases of their chunk's rows.
extern "C" __global__ void backward_update_partial(float* __restrict__ W, float* __restrict__ b,
                                                   const float* __restrict__ delta_out,
                                                   const float* __restrict__ x,
                                                   float* __restrict__ partial,
                                                   float* __restrict__ vW, float* __restrict__ vb,
                                                   const float* __restrict__ hyper,
                                                   int n_out, int n_in, int want_partial)
{
    const int chunk = blockIdx.y;
    const int row_begin = chunk * BU_ROWS;
    const int row_end = min(row_begin + BU_ROWS, n_out);
    const int rows = row_end - row_begin;
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    const float lr = hyper[0], momentum = hyper[1];   // the same two floats for every thread
    const bool use_momentum = momentum != 0.0f;

    // The chunk's deltas, shared by every thread of the block (blockDim.x >= BU_ROWS).
    __shared__ float delta[BU_ROWS];
    if (threadIdx.x < rows)
        delta[threadIdx.x] = delta_out[row_begin + threadIdx.x];
    __syncthreads();

    if (j < n_in) {
        const float xj = x[j];
        const float acc = use_momentum
            ? update_column<true>(W, vW, delta, xj, j, n_in, row_begin, rows, lr, momentum)
            : update_column<false>(W, vW, delta, xj, j, n_in, row_begin, rows, lr, momentum);
        if (want_partial)
            partial[(size_t)chunk * n_in + j] = acc;
    }

    // grad_b = delta_out (B = 1): one thread per bias row of the chunk, in tile 0 only.
    const int i = row_begin + threadIdx.x;
    if (blockIdx.x == 0 && threadIdx.x < BU_ROWS && i < row_end) {
        // Written out rather than through sgd_step: the same arithmetic, but with the call ptxas
        // allocates ~30 more registers on sm_107/120/121 (RESOURCES.md).
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
//   delta_in (n_in,). Block (BR_COLUMNS, BR_LOADERS) = 32 x 8, grid ceil(n_in / BR_COLUMNS):
//   a block owns 32 consecutive j (net 4's 500-wide layer gets 16 blocks, the 2500-wide 79).
//   The sum of column j is one serial chain in increasing chunk order,
//   ((p[0] + p[1]) + p[2]) + ...: the order (and so the bits) of one thread adding the chunks.
//   Only the loads are spread: for each group of BR_GROUP chunks, thread (tx, ty) loads chunks
//   ty, ty + BR_LOADERS, ... of the group for column tx into shared memory (all independent, so
//   ~BR_GROUP / BR_LOADERS loads in flight per thread; consecutive tx read consecutive j:
//   coalesced), then the tx-th thread of row ty = 0 adds the group's values in chunk order.
//   Not launched for the first layer (its input is the image, which has no delta).
#define BR_COLUMNS 32
#define BR_LOADERS 8
#define BR_GROUP 64
extern "C" __global__ void backward_reduce(const float* __restrict__ partial,
                                           const float* __restrict__ y_in,
                                           float* __restrict__ delta_in,
                                           int n_chunks, int n_in)
{
    __shared__ float group[BR_GROUP][BR_COLUMNS];   // [chunk within the group][column of the block]
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int j = blockIdx.x * BR_COLUMNS + tx;
    const size_t stride = (size_t)n_in;
    float sum = 0.0f;
    for (int c0 = 0; c0 < n_chunks; c0 += BR_GROUP) {
        const int count = min(BR_GROUP, n_chunks - c0);
        if (j < n_in)
            for (int c = ty; c < count; c += BR_LOADERS)
                group[c][tx] = partial[(c0 + c) * stride + j];
        __syncthreads();   // the group is loaded
        if (ty == 0 && j < n_in)
            for (int c = 0; c < count; ++c)
                sum = c0 + c == 0 ? group[0][tx] : __fadd_rn(sum, group[c][tx]);   // p[0] itself starts the chain
        __syncthreads();   // the group is summed before the next one overwrites it
    }
    if (ty == 0 && j < n_in)
        delta_in[j] = __fmul_rn(sum, scaled_tanh_derivative(y_in[j]));
}
