// The spread online (batch size 1) engine: ONE cooperative launch trains `steps` consecutive
// images of the epoch, every hidden layer spread over the whole grid so that each phase keeps
// every SM busy. It sums in ANOTHER order than the graph and persistent engines (its own
// tolerance test, tests/test_spread.py); its result is still the same bits in every block order
// and wherever the weights are kept. Python mirror of the plan: gpumlp/spread_plan.py.
//
// Ownership. Hidden layer l (W_l is (n_out, n_in)) is cut into G = gridDim.x ranges of rows:
// block b owns rows [b n_out / G, (b + 1) n_out / G) (integer division; a block may own none when
// n_out < G). The output layer (<= 32 rows) belongs to block 0 alone. The owner does everything to
// its rows, for every image of the launch: their forward outputs, their deltas, their partial sums
// of delta W and their SGD steps.
//
// Storage of a block's rows of each layer, in row order (spread_plan.block_storage):
// - layer `register_layer` (-1: none): its first min(rows, SP_REG_ROWS) rows are held in a
//   register tile wreg[SP_REG_ROWS][SP_REG_COLS], thread t holding columns t + SP_THREADS k of each
//   (n_in <= SP_THREADS SP_REG_COLS); every index of wreg is a compile-time constant after unrolling
//   (rows and columns beyond the real ones are masked), so that the tile stays in registers;
// - the next rows of every layer, layer 0 first, fill the weight part of dynamic shared memory
//   densely ((rows, n_in) per layer) while a whole row still fits in shared_weight_floats;
// - the rest are read and written in place in W (global memory, L2).
// Register and shared rows are loaded from W at the start of the launch and written back at its
// end. Biases and velocities stay in global memory. lr and momentum are read from device memory.
//
// Exchanges. Only activations y_l and partial sums cross between blocks, through global memory,
// with a grid-wide barrier between the writes and the reads:
//   forward:  owners write y_l[rows]               -> grid barrier -> every block reads all of y_l
//   backward: owners write partial_l[block, :]     -> grid barrier -> the owner of row i of layer
//             l-1 sums partial_l[b', i] over the owners b' of layer l and applies f'(y_{l-1}[i])
// i.e. 2 (L - 1) grid barriers per image for L layers. The output layer needs none: block 0 does
// the softmax after a __syncthreads.
// Why no barrier between images: the next image's first writes (y_0) come after the barrier that
// follows the last reads of y_0 by other blocks (layer 1's backward pass); every later buffer is
// likewise rewritten only after a barrier that follows its last read by another block.
//
// The order of every sum (fixed: independent of the block order and of where weights are kept):
//   forward, register rows: thread t adds w[r][t + 256 k] x[t + 256 k] in increasing k in one fmaf
//     chain per row; the chain of each warp's lanes is added by an xor butterfly; then the 8 warps'
//     sums in warp order, then the bias;
//   forward, other rows: one warp per row, row_forward (row_forward.cuh: layer_forward_mv's order);
//   delta of row i of hidden layer l: lane m of a warp adds partial_{l+1}[b', i] for the owners
//     b' = m + 32 k of layer l + 1, in increasing k, then an xor butterfly, then times f'(y_l[i]);
//   partial_l[b, j] (and the step of W[i, j]): thread t takes columns j = t + 256 k in increasing k
//     and walks the block's rows of column j in row order with ONE fmaf chain of the OLD weight
//     times delta, taking each weight's step as sgd_step does (step = lr (delta_i x_j)).
// No floating-point atomics.

#include "mlp_common.cuh"
#include "softmax_row.cuh"
#include "grid_sync.cuh"
#include "row_forward.cuh"

#define SP_THREADS 256      // 8 warps; spread_plan.THREADS mirrors it
#define SP_WARPS (SP_THREADS / 32)
#define SP_REG_ROWS 16      // spread_plan.REGISTER_ROWS
#define SP_REG_COLS 10      // spread_plan.REGISTER_COLUMNS: the tile covers n_in <= 2560
#define SP_MAX_LAYERS 12    // spread_plan.MAX_LAYERS
#define SP_LAYER_ARRAYS 5   // per layer in `layers`: W, b, vW, vb, y

// Where a block finds its part of each layer, computed once per launch by thread 0.
struct SpreadLayer {
    float *W, *b, *vW, *vb, *y;
    int n_out, n_in;
    int row_begin, rows;    // the block's rows [row_begin, row_begin + rows)
    int register_rows;      // the first register_rows of them in the register tile,
    int shared_rows;        // the next shared_rows in `shared` ((shared_rows, n_in)), the rest in W
    float* shared;
    float* partial;         // (gridDim.x, n_in) partial sums of this layer (layer 0: none)
};

// [begin, end) of the rows of a layer that `block` owns: the whole output layer on block 0.
__device__ __forceinline__ int first_row(int n_out, int block, int blocks, bool output_layer)
{
    if (output_layer)
        return block == 0 ? 0 : n_out;
    return (int)((long long)block * n_out / blocks);
}

__device__ __forceinline__ bool owns_rows(int n_out, int block, int blocks, bool output_layer)
{
    if (output_layer)
        return block == 0;
    return (long long)(block + 1) * n_out / blocks > (long long)block * n_out / blocks;
}

// Row r of the block's rows (r >= register_rows): in shared memory or in W.
__device__ __forceinline__ float* memory_row(const SpreadLayer& p, int r)
{
    const int s = r - p.register_rows;
    return s < p.shared_rows ? p.shared + (size_t)s * p.n_in : p.W + (size_t)(p.row_begin + r) * p.n_in;
}

// Copies the block's shared rows of every layer between W (global) and shared memory.
__device__ __forceinline__ void copy_shared_rows(const SpreadLayer* plan, int n_layers, bool to_shared)
{
    for (int l = 0; l < n_layers; ++l) {
        const SpreadLayer& p = plan[l];
        float* global_rows = p.W + (size_t)(p.row_begin + p.register_rows) * p.n_in;
        for (int e = threadIdx.x; e < p.shared_rows * p.n_in; e += blockDim.x) {
            if (to_shared)
                p.shared[e] = global_rows[e];
            else
                global_rows[e] = p.shared[e];
        }
    }
}

// Forward of the register rows: y[row_begin + r] = act(w_r . x + b) for r < register_rows.
// x (n_in,) in shared memory; reduce (SP_WARPS, SP_REG_ROWS) shared scratch. Every thread calls it.
__device__ __forceinline__ void register_forward(const float (&wreg)[SP_REG_ROWS][SP_REG_COLS], const SpreadLayer& p,
                                                 const float* x, float* reduce, bool activate)
{
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float acc[SP_REG_ROWS];
#pragma unroll
    for (int r = 0; r < SP_REG_ROWS; ++r)
        acc[r] = 0.0f;
#pragma unroll
    for (int k = 0; k < SP_REG_COLS; ++k) {
        const int j = threadIdx.x + SP_THREADS * k;
        if (j < p.n_in) {
            const float xj = x[j];
#pragma unroll
            for (int r = 0; r < SP_REG_ROWS; ++r)
                acc[r] = fmaf(wreg[r][k], xj, acc[r]);
        }
    }
#pragma unroll
    for (int r = 0; r < SP_REG_ROWS; ++r) {
        float sum = acc[r];
#pragma unroll
        for (int offset = 16; offset > 0; offset >>= 1)
            sum = __fadd_rn(sum, __shfl_xor_sync(FULL_MASK, sum, offset));
        if (lane == 0)
            reduce[warp * SP_REG_ROWS + r] = sum;
    }
    __syncthreads();
    if (threadIdx.x < p.register_rows) {
        float sum = reduce[threadIdx.x];
        for (int w = 1; w < SP_WARPS; ++w)
            sum = __fadd_rn(sum, reduce[w * SP_REG_ROWS + threadIdx.x]);
        const int row = p.row_begin + threadIdx.x;
        const float a = __fadd_rn(sum, p.b[row]);
        p.y[row] = activate ? scaled_tanh(a) : a;
    }
}

// Column j of the block's rows in memory (register_rows .. rows - 1): continues the fmaf chain
// `acc` of the column's OLD weights times delta and takes every weight's step. Returns the chain.
__device__ __forceinline__ float memory_column_update(const SpreadLayer& p, int j, float xj, const float* delta,
                                                      float acc, float lr, float momentum, bool use_momentum)
{
    for (int r = p.register_rows; r < p.rows; ++r) {
        float* w = memory_row(p, r) + j;
        float* v = p.vW + (size_t)(p.row_begin + r) * p.n_in + j;
        const float d = delta[r];
        acc = fmaf(*w, d, acc);   // the OLD weight
        sgd_step(w, v, __fmul_rn(lr, __fmul_rn(d, xj)), momentum, use_momentum);
    }
    return acc;
}

// train_online_spread: `steps` online SGD steps on images order[cursor ...], one after another.
//   layers (n_layers, 5) device addresses of W_l (n_out, n_in), b_l (n_out,), vW_l, vb_l (the
//     velocities; used only when momentum != 0) and y_l (n_out,) the activations;
//   sizes (n_layers + 1,) = n_in of layer 0, then n_out of every layer; the last <= 32;
//   partial: for every layer l >= 1 in turn, (gridDim.x, n_in_l) floats (row b: block b's sums);
//   images (n_samples, sizes[0]), labels (n_samples,), order (n_samples,) the epoch's permutation,
//   cursor (1,) the position in the epoch, advanced by `steps`; loss_total (1,) double and
//   wrong_total (1,) take every image's loss and error, in image order; hyper (2,) = [lr, momentum];
//   barrier (1,) the grid barrier's counter (zero before the first launch; stays valid after);
//   register_layer: the hidden layer of the register tile (spread_plan.register_layer; its n_in
//     <= SP_THREADS SP_REG_COLS), -1 for none; shared_weight_floats: the capacity of the weight
//     part of dynamic shared memory.
// Grid: 1-D, at most the resident blocks (a cooperative launch); blockDim.x = SP_THREADS; dynamic
// shared memory (floats): x (max n_in), delta (max rows per block), the register tile's reduction
// (SP_WARPS x SP_REG_ROWS) (= spread_plan.scratch_floats), then shared_weight_floats.
extern "C" __global__ void __launch_bounds__(SP_THREADS, 1)
train_online_spread(const unsigned long long* __restrict__ layers, const int* __restrict__ sizes,
                    float* __restrict__ partial, const float* __restrict__ images,
                    const int* __restrict__ labels, const int* __restrict__ order,
                    int* __restrict__ cursor, double* __restrict__ loss_total,
                    int* __restrict__ wrong_total, const float* __restrict__ hyper,
                    unsigned int* __restrict__ barrier, int n_layers, int steps, int n_samples,
                    int register_layer, int shared_weight_floats)
{
    extern __shared__ float shared_memory[];
    __shared__ SpreadLayer plan[SP_MAX_LAYERS];
    __shared__ int start, scratch_offsets[2];   // of delta and of the reduction in shared_memory

    const int grid = (int)gridDim.x, last = n_layers - 1;
    if (threadIdx.x == 0) {
        int max_in = 0, max_rows = 0;
        for (int l = 0; l < n_layers; ++l) {
            max_in = max(max_in, sizes[l]);
            const int n_out = sizes[l + 1];
            max_rows = max(max_rows, l == last ? n_out : (n_out + grid - 1) / grid);
        }
        scratch_offsets[0] = max_in;
        scratch_offsets[1] = max_in + max_rows;
        float* weights = shared_memory + max_in + max_rows + SP_WARPS * SP_REG_ROWS;
        int free = shared_weight_floats;
        size_t partial_offset = 0;
        for (int l = 0; l < n_layers; ++l) {
            SpreadLayer& p = plan[l];
            p.W = reinterpret_cast<float*>(layers[SP_LAYER_ARRAYS * l + 0]);
            p.b = reinterpret_cast<float*>(layers[SP_LAYER_ARRAYS * l + 1]);
            p.vW = reinterpret_cast<float*>(layers[SP_LAYER_ARRAYS * l + 2]);
            p.vb = reinterpret_cast<float*>(layers[SP_LAYER_ARRAYS * l + 3]);
            p.y = reinterpret_cast<float*>(layers[SP_LAYER_ARRAYS * l + 4]);
            p.n_in = sizes[l];
            p.n_out = sizes[l + 1];
            p.row_begin = first_row(p.n_out, blockIdx.x, grid, l == last);
            p.rows = (l == last ? p.n_out : first_row(p.n_out, blockIdx.x + 1, grid, false)) - p.row_begin;
            const bool tiled = l == register_layer && p.n_in <= SP_THREADS * SP_REG_COLS;
            p.register_rows = tiled ? min(p.rows, SP_REG_ROWS) : 0;
            p.shared_rows = free > 0 ? min(p.rows - p.register_rows, free / p.n_in) : 0;
            free -= p.shared_rows * p.n_in;
            p.shared = weights;
            weights += (size_t)p.shared_rows * p.n_in;
            p.partial = l ? partial + partial_offset : nullptr;
            if (l)
                partial_offset += (size_t)grid * p.n_in;
        }
        start = cursor[0];
    }
    __syncthreads();
    float* const x_shared = shared_memory;
    float* const delta = shared_memory + scratch_offsets[0];
    float* const reduce = shared_memory + scratch_offsets[1];
    copy_shared_rows(plan, n_layers, true);

    // The register tile: rows row_begin + r, columns threadIdx.x + SP_THREADS k of register_layer.
    float wreg[SP_REG_ROWS][SP_REG_COLS];
    const SpreadLayer* const tile = register_layer >= 0 ? &plan[register_layer] : nullptr;
#pragma unroll
    for (int r = 0; r < SP_REG_ROWS; ++r)
#pragma unroll
        for (int k = 0; k < SP_REG_COLS; ++k) {
            const int j = threadIdx.x + SP_THREADS * k;
            const bool held = tile != nullptr && r < tile->register_rows && j < tile->n_in;
            wreg[r][k] = held ? tile->W[(size_t)(tile->row_begin + r) * tile->n_in + j] : 0.0f;
        }

    const float lr = hyper[0], momentum = hyper[1];
    const bool use_momentum = momentum != 0.0f;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    __syncthreads();

    for (int step = 0; step < steps; ++step) {
        const int position = start + step;
        if (position < 0 || position >= n_samples)
            break;   // the same for every block: the trainer never asks for it
        const int sample = order[position];
        const float* image = images + (size_t)sample * sizes[0];

        // ---- forward: the register rows by the whole block, then warp w takes the block's
        // other rows register_rows + w, + 8, ...
        for (int l = 0; l < n_layers; ++l) {
            const SpreadLayer& p = plan[l];
            if (p.rows > 0) {
                const float* x = l ? plan[l - 1].y : image;
                for (int j = threadIdx.x; j < p.n_in; j += blockDim.x)
                    x_shared[j] = __ldcg(x + j);
                __syncthreads();
                if (l == register_layer)
                    register_forward(wreg, p, x_shared, reduce, l < last);
                for (int r = p.register_rows + warp; r < p.rows; r += SP_WARPS) {
                    const int row = p.row_begin + r;
                    const float y = row_forward(memory_row(p, r), x_shared, p.n_in, p.b[row], l < last);
                    if (lane == 0)
                        p.y[row] = y;
                }
            }
            if (l < last)
                grid_sync(barrier);
            else
                __syncthreads();
        }

        // ---- backward and update, top layer first
        for (int l = last; l >= 0; --l) {
            const SpreadLayer& p = plan[l];
            if (p.rows > 0) {
                if (l == last) {
                    if (warp == 0)
                        softmax_row(p.y, labels[sample], p.n_out, delta, loss_total, wrong_total);
                } else {
                    // delta of row i: the owners' partials of layer l + 1 (a fixed tree, see the
                    // top; -0 is the identity of the sum), times f'(y_l[i])
                    const SpreadLayer& above = plan[l + 1];
                    const bool above_is_output = l + 1 == last;
                    for (int r = warp; r < p.rows; r += SP_WARPS) {
                        const int i = p.row_begin + r;
                        float sum = -0.0f;
                        for (int owner = lane; owner < grid; owner += 32)
                            if (owns_rows(above.n_out, owner, grid, above_is_output))
                                sum = __fadd_rn(sum, __ldcg(above.partial + (size_t)owner * above.n_in + i));
#pragma unroll
                        for (int offset = 16; offset > 0; offset >>= 1)
                            sum = __fadd_rn(sum, __shfl_xor_sync(FULL_MASK, sum, offset));
                        if (lane == 0)
                            delta[r] = __fmul_rn(sum, scaled_tanh_derivative(p.y[i]));
                    }
                }
                __syncthreads();

                // thread t: columns t + 256 k, each down the block's rows in row order
                const float* x = l ? plan[l - 1].y : image;
                float* const block_partial = l ? p.partial + (size_t)blockIdx.x * p.n_in : nullptr;
                if (l == register_layer) {
#pragma unroll
                    for (int k = 0; k < SP_REG_COLS; ++k) {
                        const int j = threadIdx.x + SP_THREADS * k;
                        if (j < p.n_in) {
                            const float xj = __ldcg(x + j);
                            float acc = 0.0f;
#pragma unroll
                            for (int r = 0; r < SP_REG_ROWS; ++r)
                                if (r < p.register_rows) {
                                    const float d = delta[r];
                                    float* v = p.vW + (size_t)(p.row_begin + r) * p.n_in + j;
                                    acc = fmaf(wreg[r][k], d, acc);   // the OLD weight
                                    wreg[r][k] = sgd_stepped(wreg[r][k], v, __fmul_rn(lr, __fmul_rn(d, xj)),
                                                             momentum, use_momentum);
                                }
                            acc = memory_column_update(p, j, xj, delta, acc, lr, momentum, use_momentum);
                            if (l)
                                block_partial[j] = acc;
                        }
                    }
                } else {
                    for (int j = threadIdx.x; j < p.n_in; j += blockDim.x) {
                        const float xj = __ldcg(x + j);
                        const float acc = memory_column_update(p, j, xj, delta, 0.0f, lr, momentum, use_momentum);
                        if (l)
                            block_partial[j] = acc;
                    }
                }
                for (int r = threadIdx.x; r < p.rows; r += blockDim.x) {
                    const int i = p.row_begin + r;
                    sgd_step(p.b + i, p.vb + i, __fmul_rn(lr, delta[r]), momentum, use_momentum);
                }
            }
            if (l > 0)
                grid_sync(barrier);   // the partials of layer l are read by the owners of layer l - 1
            else
                __syncthreads();      // delta is rewritten by the next image
        }
    }

    grid_sync(barrier);   // every block has read the cursor and finished its last image
    copy_shared_rows(plan, n_layers, false);
#pragma unroll
    for (int r = 0; r < SP_REG_ROWS; ++r)
#pragma unroll
        for (int k = 0; k < SP_REG_COLS; ++k) {
            const int j = threadIdx.x + SP_THREADS * k;
            if (tile != nullptr && r < tile->register_rows && j < tile->n_in)
                tile->W[(size_t)(tile->row_begin + r) * tile->n_in + j] = wreg[r][k];
        }
    if (blockIdx.x == 0 && threadIdx.x == 0)
        cursor[0] = start + min(steps, max(n_samples - start, 0));
}
