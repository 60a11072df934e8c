// The spread online (batch size 1) engine: ONE cooperative launch trains `steps` consecutive
// images of the epoch, every hidden layer spread over the whole grid so that each phase keeps
// every SM busy. It sums in ANOTHER order than the graph and persistent engines (its own
// tolerance test, tests/test_spread.py); its result is still the same bits in every block order
// and wherever the weights are kept. Python mirror of the plan: gpumlp/spread_plan.py.
//
// Ownership. Hidden layer l (W_l is (n_out, n_in)) is cut into G = gridDim.x ranges of rows:
// block b owns rows [b n_out / G, (b + 1) n_out / G) (integer division; a block may own none when
// n_out < G). The owner does everything to its rows, for every image of the launch: their forward
// outputs, their deltas, their partial sums of delta W and their SGD steps. The output layer (W_out
// (n_classes, n_in_last), b_out and, with momentum, their velocities) is replicated: every block
// keeps its own copy in shared memory and does the same operations on the same data in the same
// order, so all copies hold the same bits; block 0 writes its copy back at the end of the launch.
//
// Storage of a block's rows of each hidden layer, in row order (spread_plan.block_storage):
// - layer `register_layer` (-1: none): its first min(rows, SP_REG_ROWS) rows are held in a
//   register tile wreg[SP_REG_ROWS][SP_REG_COLS], thread t holding columns t + SP_THREADS k of each
//   (n_in <= SP_THREADS SP_REG_COLS); every index of wreg is a compile-time constant after unrolling
//   (rows and columns beyond the real ones are masked), so that the tile stays in registers;
// - the next rows of every hidden layer, layer 0 first, fill the weight part of dynamic shared
//   memory densely ((rows, n_in) per layer) while a whole row still fits in shared_weight_floats;
// - the rest are read and written in place in W (global memory, L2).
// Register and shared rows are loaded from W at the start of the launch and written back at its
// end. The biases of the block's rows of every hidden layer (and, with momentum, their velocities)
// live in the scratch for the whole launch, loaded at its start and written back at its end, so no
// phase waits on L2 for a bias. Hidden weight velocities stay in global memory. lr and momentum are
// read from device memory.
//
// Exchanges. Only activations y_l and partial sums cross between blocks, through global memory,
// with a grid-wide barrier between the writes and the reads:
//   forward:  owners write y_l[rows]               -> grid barrier -> every block reads all of y_l
//   output:   every block computes the logits, the softmax and delta_out from all of y_{L-2}, the
//             deltas of its own rows of layer L-2 from its copy of W_out, and (after the arrive)
//             its copy's step: no exchange;
//   backward: owners write partial_l[block, :]     -> grid barrier -> the owner of rows i0..i1 of
//             layer l-1 loads partial_l[b', i0..i1) of every owner b' of layer l (one contiguous
//             segment each) into shared memory, sums them and applies f'(y_{l-1}[i])
// i.e. 2 L - 3 grid barriers per image for L >= 3 layers (L - 1 forward, L - 2 backward: none
// after the output layer and none after layer 0). A net of L = 2 layers needs one after layer 0's
// backward pass (below): 2.
// Split barriers. A barrier that ends a backward phase (the output phase's, with the top hidden
// layer's, and those of layers L-3 .. 1) is split (grid_sync.cuh): the block computes its partial
// row from the weights not yet stepped (hidden_partials), ARRIVES, then takes the steps
// (output_step on its copy of the output layer, hidden_step on its rows), which touch only its own
// rows, copy and scratch, and WAITS. So the steps overlap the barrier's latency; the price is that
// the weights of those layers are read twice (partials, then step) instead of once. The sums and
// steps are the same operations as a fused walk: the bits do not change. Layer 0's step (no
// partials, no barrier after it) and the forward barriers are whole.
// L2 round trips a phase waits on (besides its grid barrier), per image, when every row of the
// block is in registers or shared memory and without momentum:
//   forward of layer 0: none (its image, sample, label and next sample are in shared memory:
//     prefetched by the previous image, see below; the launch's first image is loaded at the
//     launch start: cursor, then order[start], then labels[sample] and the image: 3 dependent
//     waits per launch, not per image);
//   forward of layer l >= 1: one (the load of y_{l-1} into s.x; the biases are in the scratch);
//   output phase (with the top hidden layer's step): one (y_{L-2} and layer L-2's input, with one
//     hidden layer also the next image, its label and the sample after it, in one pass; the loss
//     and error totals are added in block 0's shared memory);
//   backward of layer l < L-2: one (the partial segments, the rows' y, the step's input x and, in
//     layer 0's phase, the next image, its label (labels[next]) and the sample after it
//     (order[position + 2]), issued in one pass before one __syncthreads).
// What adds waits: rows kept in global memory (W): in the forward pass each warp's rows one after
// another (one wait per row of the warp, row_forward); in the partial pass each column j of a
// thread (ceil(n_in / 256) columns one after another) reads its memory rows with loads only; in
// the step each column walks the memory rows in groups of SP_COLUMN_GROUP = 4 rows, one wait per
// group that holds a global row (after the arrive: they overlap the barrier). With momentum the
// hidden weights' velocities (vW, global) are read in the step: every group of 4 memory rows waits
// once (shared rows too), and the register tile's rows read theirs row after row in each column (up
// to register_rows dependent waits per column: that walk is not grouped). The hidden biases'
// velocities are in the scratch: no wait.
// Why no barrier between images: every buffer another block reads is rewritten only after a grid
// barrier that follows its last read: y_l (l < L-2) and partial_l are last read in the backward
// phase of layer l + 1 or l - 1, which a barrier ends; y_{L-2} is last read by other blocks in the
// output phase, and its next write (the next image's forward pass of layer L-2) comes after the
// L - 2 >= 1 barriers of the backward passes of layers L-2 .. 1 — for L = 2 there are none, so the
// output phase ends with a barrier there too. The next image is prefetched into `image` (shared,
// the block's own; in x's buffer beside layer 0's input where it fits) in layer 0's backward pass
// (L = 2: in the output phase), after this image's forward pass of layer 0 (its only reader) has
// passed a __syncthreads; it is read in the next image's forward pass of layer 0, after the
// __syncthreads that ends the phase. The first image of a launch
// is loaded at its start. The next image's label and the sample after it are fetched by thread 0 in
// the same pass (`upcoming`, which only thread 0 touches) and moved into image_sample at the next
// image's start.
//
// The order of every sum (fixed: independent of the block order and of where weights are kept):
//   forward, register rows: thread t adds w[r][t + 256 k] x[t + 256 k] in increasing k in one fmaf
//     chain per row; the chain of each warp's lanes is added by an xor butterfly; then the 8 warps'
//     sums in warp order, then the bias;
//   forward, other rows and the logits: one warp per row, row_forward (row_forward.cuh:
//     layer_forward_mv's order);
//   delta of row i of layer L-2: one fmaf chain of W_out[c][i] delta_out[c] (the OLD W_out) in
//     increasing c from 0, times f'(y_{L-2}[i]);
//   delta of row i of hidden layer l < L-2: lane m of a warp adds partial_{l+1}[b', i] for the
//     owners b' = m + 32 k of layer l + 1, in increasing k, then an xor butterfly, then times
//     f'(y_l[i]);
//   partial_l[b, j] (and the step of W[i, j]): thread t takes columns j = t + 256 k in increasing k
//     and walks the block's rows of column j in row order with ONE fmaf chain of the OLD weight
//     times delta, taking each weight's step as sgd_step does (step = lr (delta_i x_j)).
// No floating-point atomics.

#include "mlp_common.cuh"
#include "softmax_row.cuh"
#include "grid_sync.cuh"
#include "layer_table.cuh"
#include "row_forward.cuh"

#define SP_THREADS 256      // 8 warps; spread_plan.THREADS mirrors it
#define SP_WARPS (SP_THREADS / 32)
#define SP_REG_ROWS 16      // spread_plan.REGISTER_ROWS
#define SP_REG_COLS 10      // spread_plan.REGISTER_COLUMNS: the tile covers n_in <= 2560
#define SP_MAX_LAYERS 12    // spread_plan.MAX_LAYERS

// Where a block finds its part of each layer, computed once per launch by thread 0.
struct SpreadLayer {
    float *W, *b, *vW, *vb, *y;
    int n_out, n_in;
    int row_begin, rows;    // the block's rows [row_begin, row_begin + rows) (the output layer: all)
    int register_rows;      // the first register_rows of them in the register tile,
    int shared_rows;        // the next shared_rows in `shared` ((shared_rows, n_in)), the rest in W
    float* shared;
    float *bias, *vbias;    // the block's rows of b and vb in the scratch ((rows,); vbias = bias without momentum)
    float* partial;         // (gridDim.x, n_in) partial sums of this hidden layer (layer 0: none)
};

// The scratch part of dynamic shared memory (spread_plan.scratch_floats, in this order).
struct SpreadScratch {
    float* x;          // (max n_in,) the layer's input
    float* image;      // (sizes[0],) the image of layer 0's forward pass (prefetched; in x's buffer where it fits)
    float* delta;      // (max rows per block,) the deltas of the block's rows of a hidden layer
    float* reduce;     // (SP_WARPS, SP_REG_ROWS) the register tile's forward reduction
    float* exchange;   // the owners' partials (grid, rows | 1), or the top hidden layer's input
    float* logits;     // (n_classes,)
    float* delta_out;  // (n_classes,) softmax - onehot
    float *W_out, *b_out, *vW_out, *vb_out;   // the block's copy of the output layer (n_classes, n_in)
    float *bias, *vbias;   // the biases of the block's rows of every hidden layer (ceil(n_out / G) each), and
                           // with momentum their velocities
};

// [begin, end) of the rows of hidden layer with n_out rows that `block` owns.
__device__ __forceinline__ int first_row(int n_out, int block, int blocks)
{
    return (int)((long long)block * n_out / blocks);
}

// Whether `block` owns rows of a hidden layer of n_out rows (first_row's ranges). With n_out >=
// blocks every block does; else the products are below blocks^2 and 32-bit arithmetic is exact
// (no 64-bit division in the loops that call it).
__device__ __forceinline__ bool owns_rows(int n_out, int block, int blocks)
{
    return n_out >= blocks || (block + 1) * n_out / blocks > block * n_out / blocks;
}

// Row r of the block's rows (r >= register_rows): in shared memory or in W.
__device__ __forceinline__ float* memory_row(const SpreadLayer& p, int r)
{
    const int s = r - p.register_rows;
    return s < p.shared_rows ? p.shared + (size_t)s * p.n_in : p.W + (size_t)(p.row_begin + r) * p.n_in;
}

// The label of the launch's next image and the sample of the one after it (-1: none), fetched by
// thread 0 during an image's load pass in layer 0's backward phase, so that the next image's forward
// pass of layer 0 finds its sample, label and next sample in shared memory.
struct UpcomingSample {
    int label, next;
};

// Thread 0: the label of sample `next` (-1: no next image; then nothing) and the sample at position
// `after_next` of the order (-1: none) into *upcoming. Called just before a load pass's
// __syncthreads, so that these loads wait with the pass's others.
__device__ __forceinline__ void fetch_upcoming(UpcomingSample* upcoming, const int* __restrict__ labels,
                                               const int* __restrict__ order, int next, int after_next)
{
    if (threadIdx.x == 0 && next >= 0) {
        upcoming->label = labels[next];
        upcoming->next = after_next >= 0 ? order[after_next] : -1;
    }
}

// Copies the block's shared rows of the hidden layers between W (global) and shared memory.
__device__ __forceinline__ void copy_shared_rows(const SpreadLayer* plan, int hidden_layers, bool to_shared)
{
    for (int l = 0; l < hidden_layers; ++l) {
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

// Copies the biases (and, with `velocities`, their velocities) of the block's rows of the hidden
// layers between b, vb (global) and the scratch.
__device__ __forceinline__ void copy_hidden_biases(const SpreadLayer* plan, int hidden_layers, bool velocities,
                                                   bool to_shared)
{
    for (int l = 0; l < hidden_layers; ++l) {
        const SpreadLayer& p = plan[l];
        for (int r = threadIdx.x; r < p.rows; r += blockDim.x) {
            const int i = p.row_begin + r;
            if (to_shared) {
                p.bias[r] = p.b[i];
                if (velocities)
                    p.vbias[r] = p.vb[i];
            } else {
                p.b[i] = p.bias[r];
                if (velocities)
                    p.vb[i] = p.vbias[r];
            }
        }
    }
}

// Copies the output layer (W, b and, with `velocities`, vW, vb) between global memory and the
// block's copy in shared memory.
__device__ __forceinline__ void copy_output_layer(const SpreadLayer& out, const SpreadScratch& s, bool velocities,
                                                  bool to_shared)
{
    const int weights = out.n_out * out.n_in;
    for (int e = threadIdx.x; e < weights + out.n_out; e += blockDim.x) {
        const bool bias = e >= weights;
        float* global_value = bias ? out.b + (e - weights) : out.W + e;
        float* shared_value = bias ? s.b_out + (e - weights) : s.W_out + e;
        float* global_velocity = bias ? out.vb + (e - weights) : out.vW + e;
        float* shared_velocity = bias ? s.vb_out + (e - weights) : s.vW_out + e;
        if (to_shared) {
            *shared_value = *global_value;
            if (velocities)
                *shared_velocity = *global_velocity;
        } else {
            *global_value = *shared_value;
            if (velocities)
                *global_velocity = *shared_velocity;
        }
    }
}

// Forward of the register rows: y[row_begin + r] = act(w_r . x + b) for r < register_rows.
// x (n_in,) in shared memory; reduce (SP_WARPS, SP_REG_ROWS) shared scratch. Every thread calls it.
__device__ __forceinline__ void register_forward(const float (&wreg)[SP_REG_ROWS][SP_REG_COLS], const SpreadLayer& p,
                                                 const float* x, float* reduce)
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
        p.y[row] = scaled_tanh(__fadd_rn(sum, p.bias[threadIdx.x]));
    }
}

#define SP_COLUMN_GROUP 4   // rows of a column whose weights (and velocities) are loaded before any is stored

// Column j of the block's rows in memory (register_rows .. rows - 1): continues the fmaf chain
// `acc` of the column's weights (not yet stepped) times delta, in row order, and returns it. Only
// loads: the compiler may issue them all at once.
__device__ __forceinline__ float memory_column_partial(const SpreadLayer& p, int j, const float* delta, float acc)
{
    const int first = p.register_rows, rows = p.rows, n_in = p.n_in;
    const int shared_end = first + p.shared_rows;   // rows first .. shared_end - 1 in shared memory
    const float* const shared_column = p.shared + j - (size_t)first * n_in;
    const float* const global_column = p.W + (size_t)p.row_begin * n_in + j;
    for (int r = first; r < rows; ++r)
        acc = fmaf((r < shared_end ? shared_column : global_column)[(size_t)r * n_in], delta[r], acc);
    return acc;
}

// Column j of the block's rows in memory: every weight's step (step = lr (delta_r x_j), sgd_step's
// arithmetic). The rows go in groups of SP_COLUMN_GROUP: the group's loads are issued together,
// then its steps are taken in row order, so that a column waits on L2 once per group rather than
// once per row (a row's load would otherwise wait for the previous row's store, which may alias
// it). The plan's fields are copied into locals first: p lives in shared memory, which a store
// through a generic pointer might alias, so they would be re-read after every store.
__device__ __forceinline__ void memory_column_step(const SpreadLayer& p, int j, float xj, const float* delta,
                                                   float lr, float momentum, bool use_momentum)
{
    const int first = p.register_rows, rows = p.rows, n_in = p.n_in;
    const int shared_end = first + p.shared_rows;
    float* const shared_column = p.shared + j - (size_t)first * n_in;
    float* const global_column = p.W + (size_t)p.row_begin * n_in + j;
    float* const velocity_column = p.vW + (size_t)p.row_begin * n_in + j;
    for (int r0 = first; r0 < rows; r0 += SP_COLUMN_GROUP) {
        float w[SP_COLUMN_GROUP], v[SP_COLUMN_GROUP];
#pragma unroll
        for (int q = 0; q < SP_COLUMN_GROUP; ++q) {
            const int r = r0 + q;
            if (r < rows) {
                w[q] = (r < shared_end ? shared_column : global_column)[(size_t)r * n_in];
                if (use_momentum)
                    v[q] = velocity_column[(size_t)r * n_in];
            }
        }
#pragma unroll
        for (int q = 0; q < SP_COLUMN_GROUP; ++q) {
            const int r = r0 + q;
            if (r < rows) {
                (r < shared_end ? shared_column : global_column)[(size_t)r * n_in] =
                    sgd_stepped(w[q], &v[q], __fmul_rn(lr, __fmul_rn(delta[r], xj)), momentum, use_momentum);
                if (use_momentum)
                    velocity_column[(size_t)r * n_in] = v[q];
            }
        }
    }
}

// The block's partial row partial_l[blockIdx.x, :] of hidden layer l >= 1 (p) from its deltas
// (shared, (rows,)): before the step, so that the grid barrier's arrive can follow it and the step
// overlap the barrier. Thread t: columns j = t + 256 k, each one fmaf chain down the block's rows in
// row order (register rows, then memory rows) of the weights times delta.
__device__ __forceinline__ void hidden_partials(const float (&wreg)[SP_REG_ROWS][SP_REG_COLS], const SpreadLayer& p,
                                                bool in_register_tile, const float* delta)
{
    float* const block_partial = p.partial + (size_t)blockIdx.x * p.n_in;
    if (in_register_tile) {
#pragma unroll
        for (int k = 0; k < SP_REG_COLS; ++k) {
            const int j = threadIdx.x + SP_THREADS * k;
            if (j < p.n_in) {
                float acc = 0.0f;
#pragma unroll
                for (int r = 0; r < SP_REG_ROWS; ++r)
                    if (r < p.register_rows)
                        acc = fmaf(wreg[r][k], delta[r], acc);
                block_partial[j] = memory_column_partial(p, j, delta, acc);
            }
        }
    } else {
        for (int j = threadIdx.x; j < p.n_in; j += blockDim.x)
            block_partial[j] = memory_column_partial(p, j, delta, 0.0f);
    }
}

// The step of the block's rows of hidden layer l (p) from its deltas (shared, (rows,)) and its
// input x (shared, (n_in,)). Thread t: the same columns as hidden_partials (so no other thread's
// partial reads a weight it steps), then the biases.
__device__ __forceinline__ void hidden_step(float (&wreg)[SP_REG_ROWS][SP_REG_COLS], const SpreadLayer& p,
                                            bool in_register_tile, const float* x, const float* delta, float lr,
                                            float momentum, bool use_momentum)
{
    if (in_register_tile) {
#pragma unroll
        for (int k = 0; k < SP_REG_COLS; ++k) {
            const int j = threadIdx.x + SP_THREADS * k;
            if (j < p.n_in) {
                const float xj = x[j];
#pragma unroll
                for (int r = 0; r < SP_REG_ROWS; ++r)
                    if (r < p.register_rows) {
                        float* v = p.vW + (size_t)(p.row_begin + r) * p.n_in + j;
                        wreg[r][k] = sgd_stepped(wreg[r][k], v, __fmul_rn(lr, __fmul_rn(delta[r], xj)), momentum,
                                                 use_momentum);
                    }
                memory_column_step(p, j, xj, delta, lr, momentum, use_momentum);
            }
        }
    } else {
        for (int j = threadIdx.x; j < p.n_in; j += blockDim.x)
            memory_column_step(p, j, x[j], delta, lr, momentum, use_momentum);
    }
    for (int r = threadIdx.x; r < p.rows; r += blockDim.x)
        sgd_step(p.bias + r, p.vbias + r, __fmul_rn(lr, delta[r]), momentum, use_momentum);
}

// The output layer on the block's copy (out: W_out (n_classes, n_in) in s.W_out) up to its deltas,
// then the deltas of the block's rows of the top hidden layer (top) into s.delta; its step and the
// copy's (output_step) come after the arrive. One pass of loads: y_{L-2} (the logits' input, f' and
// the output step's input) into s.x, and when the block owns top rows their step's input x (y_{L-3}
// or the image; (top.n_in,)) into s.exchange and, with one hidden layer, the next image (next_image,
// or none) into s.image and (fetch_upcoming) the next image's label and the sample after it. Every
// thread calls it; only block 0 adds the loss and the error to the totals (its launch totals in
// shared memory) and writes the logits to out.y.
__device__ __forceinline__ void output_layer(const SpreadLayer& out, const SpreadLayer& top, const SpreadScratch& s,
                                             const float* x, const float* next_image, int label, float lr,
                                             float momentum, bool use_momentum, double* loss_total,
                                             int* wrong_total, UpcomingSample* upcoming, const int* labels,
                                             const int* order, int next, int after_next)
{
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (int j = threadIdx.x; j < out.n_in; j += blockDim.x)
        s.x[j] = __ldcg(top.y + j);
    if (top.rows > 0) {
        for (int j = threadIdx.x; j < top.n_in; j += blockDim.x)
            s.exchange[j] = __ldcg(x + j);
        if (next_image != nullptr)   // top is layer 0: top.n_in = sizes[0]
            for (int j = threadIdx.x; j < top.n_in; j += blockDim.x)
                s.image[j] = __ldcg(next_image + j);
    }
    fetch_upcoming(upcoming, labels, order, next, after_next);
    __syncthreads();
    for (int c = warp; c < out.n_out; c += SP_WARPS) {
        const float logit = row_forward(s.W_out + (size_t)c * out.n_in, s.x, out.n_in, s.b_out[c], false);
        if (lane == 0)
            s.logits[c] = logit;
    }
    __syncthreads();
    if (warp == 0) {
        const SoftmaxXent result = softmax_xent_row(s.logits, label, out.n_out, s.delta_out);
        if (blockIdx.x == 0 && lane == 0) {
            loss_total[0] = loss_total[0] + (double)result.loss;
            wrong_total[0] += result.prediction != label;
        }
    }
    __syncthreads();
    if (blockIdx.x == 0)
        for (int c = threadIdx.x; c < out.n_out; c += blockDim.x)
            out.y[c] = s.logits[c];
    // delta of row i of the top layer: one chain over the classes of the OLD output weights
    for (int r = threadIdx.x; r < top.rows; r += blockDim.x) {
        const int i = top.row_begin + r;
        float sum = 0.0f;
        for (int c = 0; c < out.n_out; ++c)
            sum = fmaf(s.W_out[(size_t)c * out.n_in + i], s.delta_out[c], sum);
        s.delta[r] = __fmul_rn(sum, scaled_tanh_derivative(s.x[i]));
    }
    __syncthreads();   // the partials and the steps read every row's delta
}

// The step of the block's copy of the output layer (the same operations in every block), from
// delta_out and its input y_{L-2} in s.x: after the output phase's arrive, since it touches only the
// block's shared memory.
__device__ __forceinline__ void output_step(const SpreadLayer& out, const SpreadScratch& s, float lr, float momentum,
                                            bool use_momentum)
{
    for (int e = threadIdx.x; e < out.n_out * out.n_in; e += blockDim.x) {
        const int c = e / out.n_in, j = e - c * out.n_in;
        sgd_step(s.W_out + e, s.vW_out + e, __fmul_rn(lr, __fmul_rn(s.delta_out[c], s.x[j])), momentum,
                 use_momentum);
    }
    for (int c = threadIdx.x; c < out.n_out; c += blockDim.x)
        sgd_step(s.b_out + c, s.vb_out + c, __fmul_rn(lr, s.delta_out[c]), momentum, use_momentum);
}

// train_online_spread: `steps` online SGD steps on images order[cursor ...], one after another.
//   layers (n_layers, 5) device addresses of W_l (n_out, n_in), b_l (n_out,), vW_l, vb_l (the
//     velocities; used only when momentum != 0) and y_l (n_out,) the activations;
//   sizes (n_layers + 1,) = n_in of layer 0, then n_out of every layer; n_layers >= 2;
//   partial: for every hidden layer l >= 1 in turn, (gridDim.x, n_in_l) floats (row b: block b's
//     sums);
//   images (n_samples, sizes[0]), labels (n_samples,), order (n_samples,) the epoch's permutation,
//   cursor (1,) the position in the epoch, advanced by `steps`; loss_total (1,) double and
//   wrong_total (1,) take every image's loss and error, in image order; hyper (2,) = [lr, momentum];
//   barrier (1,) the grid barrier's counter (zero before the first launch; stays valid after);
//   register_layer: the hidden layer of the register tile (spread_plan.register_layer; its n_in
//     <= SP_THREADS SP_REG_COLS), -1 for none; shared_weight_floats: the capacity of the weight
//     part of dynamic shared memory; output_velocities: 1 when momentum != 0 (the output layer's
//     velocities and the hidden biases' velocities then have their copy in the scratch too), else 0.
// Grid: 1-D, at most the resident blocks (a cooperative launch); blockDim.x = SP_THREADS; dynamic
// shared memory (floats): the scratch (SpreadScratch's buffers in order, = spread_plan.scratch_floats),
// then shared_weight_floats.
extern "C" __global__ void __launch_bounds__(SP_THREADS, 1)
train_online_spread(const unsigned long long* __restrict__ layers, const int* __restrict__ sizes,
                    float* __restrict__ partial, const float* __restrict__ images,
                    const int* __restrict__ labels, const int* __restrict__ order,
                    int* __restrict__ cursor, double* __restrict__ loss_total,
                    int* __restrict__ wrong_total, const float* __restrict__ hyper,
                    unsigned int* __restrict__ barrier, int n_layers, int steps, int n_samples,
                    int register_layer, int shared_weight_floats, int output_velocities)
{
    extern __shared__ float shared_memory[];
    __shared__ SpreadLayer plan[SP_MAX_LAYERS];
    __shared__ SpreadScratch s;
    __shared__ int start;
    __shared__ struct {
        int sample, label, next;
    } image_sample;
    __shared__ UpcomingSample upcoming;
    // Block 0's running epoch totals for the launch: read at its start, written back at its end,
    // so that the output phase adds to shared memory (the same double additions in image order).
    __shared__ double launch_loss_total;
    __shared__ int launch_wrong_total;

    const int grid = (int)gridDim.x, last = n_layers - 1;
    if (threadIdx.x == 0) {
        int max_in = 0, max_rows = 0, exchange = sizes[last - 1];   // the top hidden layer's input
        int bias_rows = 0;
        for (int l = 0; l < last; ++l) {
            max_in = max(max_in, sizes[l]);
            const int rows = (sizes[l + 1] + grid - 1) / grid;
            max_rows = max(max_rows, rows);
            bias_rows += rows;
            if (l + 1 < last)   // the deltas of layer l come from the partials of hidden layer l + 1
                exchange = max(exchange, grid * (rows | 1));
        }
        const int n_classes = sizes[n_layers], out_in = sizes[last];
        max_in = max(max_in, out_in);
        float* next = shared_memory;
        s.x = next;
        next += max_in;
        // The prefetched image shares x's buffer where it fits beside layer 0's input, which x holds
        // in layer 0's backward pass, where the image is loaded; it is read only in the next image's
        // forward pass of layer 0, which takes no x. With one hidden layer the image is loaded in
        // the output phase, beside y_0, and never fits (spread_plan.image_floats).
        const bool image_in_x = n_layers > 2 && 2 * sizes[0] <= max_in;
        s.image = image_in_x ? s.x + sizes[0] : next;
        next += image_in_x ? 0 : sizes[0];
        s.delta = next;
        next += max_rows;
        s.reduce = next;
        next += SP_WARPS * SP_REG_ROWS;
        s.exchange = next;
        next += exchange;
        s.logits = next;
        next += n_classes;
        s.delta_out = next;
        next += n_classes;
        s.W_out = next;
        next += n_classes * out_in;
        s.b_out = next;
        next += n_classes;
        s.vW_out = output_velocities ? next : s.W_out;   // untouched without momentum
        next += output_velocities ? n_classes * out_in : 0;
        s.vb_out = output_velocities ? next : s.b_out;
        next += output_velocities ? n_classes : 0;
        s.bias = next;
        next += bias_rows;
        s.vbias = output_velocities ? next : s.bias;   // untouched without momentum
        next += output_velocities ? bias_rows : 0;
        float* weights = next;
        int bias_offset = 0;
        int free = shared_weight_floats;
        size_t partial_offset = 0;
        for (int l = 0; l < n_layers; ++l) {
            SpreadLayer& p = plan[l];
            read_layer_arrays(p, layers, l);
            p.n_in = sizes[l];
            p.n_out = sizes[l + 1];
            p.partial = nullptr;
            if (l == last) {   // replicated: every block holds all of it, in the scratch
                p.row_begin = p.register_rows = 0;
                p.rows = p.shared_rows = p.n_out;
                p.shared = s.W_out;
                continue;
            }
            p.row_begin = first_row(p.n_out, blockIdx.x, grid);
            p.rows = first_row(p.n_out, blockIdx.x + 1, grid) - p.row_begin;
            p.bias = s.bias + bias_offset;
            p.vbias = s.vbias + bias_offset;
            bias_offset += (p.n_out + grid - 1) / grid;
            const bool tiled = l == register_layer && p.n_in <= SP_THREADS * SP_REG_COLS;
            p.register_rows = tiled ? min(p.rows, SP_REG_ROWS) : 0;
            p.shared_rows = free > 0 ? min(p.rows - p.register_rows, free / p.n_in) : 0;
            free -= p.shared_rows * p.n_in;
            p.shared = weights;
            weights += (size_t)p.shared_rows * p.n_in;
            if (l) {
                p.partial = partial + partial_offset;
                partial_offset += (size_t)grid * p.n_in;
            }
        }
        start = cursor[0];
        if (blockIdx.x == 0) {
            launch_loss_total = loss_total[0];
            launch_wrong_total = wrong_total[0];
        }
        if (steps > 0 && start >= 0 && start < n_samples) {   // the launch's first image
            image_sample.sample = order[start];
            image_sample.label = labels[image_sample.sample];
            image_sample.next = 1 < steps && start + 1 < n_samples ? order[start + 1] : -1;
        }
    }
    __syncthreads();
    copy_shared_rows(plan, last, true);
    copy_output_layer(plan[last], s, output_velocities, true);
    copy_hidden_biases(plan, last, output_velocities, true);

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
        // The image's sample and label and the next image of the launch (-1: none), in shared
        // memory rather than in registers across the forward pass; read after its first grid
        // barrier. The first image's were read at the launch start; a later image's come from
        // `upcoming`, which the previous image fetched in its layer 0 backward phase, so no global
        // memory is read here. The previous image's last reads of image_sample come before the
        // __syncthreads or grid barrier that ends its backward pass.
        if (threadIdx.x == 0 && step > 0) {
            image_sample.sample = image_sample.next;
            image_sample.label = upcoming.label;
            image_sample.next = upcoming.next;
        }
        if (step == 0 && plan[0].rows > 0) {   // later images were prefetched by the previous one
            const float* image = images + (size_t)image_sample.sample * sizes[0];
            for (int j = threadIdx.x; j < sizes[0]; j += blockDim.x)
                s.image[j] = __ldcg(image + j);
            __syncthreads();
        }

        // ---- forward of the hidden layers: the register rows by the whole block, then warp w
        // takes the block's other rows register_rows + w, + 8, ...
        for (int l = 0; l < last; ++l) {
            const SpreadLayer& p = plan[l];
            if (p.rows > 0) {
                const float* x = s.image;
                if (l) {
                    for (int j = threadIdx.x; j < p.n_in; j += blockDim.x)
                        s.x[j] = __ldcg(plan[l - 1].y + j);
                    __syncthreads();
                    x = s.x;
                }
                if (l == register_layer)
                    register_forward(wreg, p, x, s.reduce);
                for (int r = p.register_rows + warp; r < p.rows; r += SP_WARPS) {
                    const int row = p.row_begin + r;
                    const float y = row_forward(memory_row(p, r), x, p.n_in, p.bias[r], true);
                    if (lane == 0)
                        p.y[row] = y;
                }
            }
            grid_sync(barrier);
        }

        // ---- backward and update of the hidden layers, top first; the top layer's deltas come
        // from the output layer, which every block does on its copy first
        for (int l = last - 1; l >= 0; --l) {
            const SpreadLayer& p = plan[l];
            const bool top = l == last - 1;
            // the step's input: y_{l-1} or the image, loaded into s.exchange (top) or s.x
            const int next = image_sample.next;
            const float* x = l ? plan[l - 1].y : images + (size_t)image_sample.sample * sizes[0];
            const float* next_image = l == 0 && next >= 0 ? images + (size_t)next * sizes[0] : nullptr;
            // the next image's label and the sample after it are fetched in layer 0's phase only
            const int fetch_next = l == 0 ? next : -1;
            const int after_next = step + 2 < steps && position + 2 < n_samples ? position + 2 : -1;
            if (top) {
                output_layer(plan[last], p, s, x, next_image, image_sample.label, lr, momentum, use_momentum,
                             &launch_loss_total, &launch_wrong_total, &upcoming, labels, order, fetch_next, after_next);
            } else if (p.rows > 0) {
                const SpreadLayer& above = plan[l + 1];
                // One pass of loads: the owners' partials of the block's rows (owner b' at row
                // b' (rows | 1), consecutive threads on consecutive addresses), the rows' y (into
                // delta), the step's input x and, below layer 0, the next image.
                const int stride = p.rows | 1;   // odd: the warp's reads below hit 32 banks
                for (int e = threadIdx.x; e < grid * p.rows; e += blockDim.x) {
                    const int owner = e / p.rows, r = e - owner * p.rows;
                    if (owns_rows(above.n_out, owner, grid))
                        s.exchange[owner * stride + r] =
                            __ldcg(above.partial + (size_t)owner * above.n_in + p.row_begin + r);
                }
                for (int r = threadIdx.x; r < p.rows; r += blockDim.x)
                    s.delta[r] = __ldcg(p.y + p.row_begin + r);
                for (int j = threadIdx.x; j < p.n_in; j += blockDim.x)
                    s.x[j] = __ldcg(x + j);
                if (next_image != nullptr)
                    for (int j = threadIdx.x; j < sizes[0]; j += blockDim.x)
                        s.image[j] = __ldcg(next_image + j);
                fetch_upcoming(&upcoming, labels, order, fetch_next, after_next);
                __syncthreads();
                // delta of row i: the owners' partials of layer l + 1 (a fixed tree, see the top;
                // -0 is the identity of the sum), times f'(y_l[i])
                for (int r = warp; r < p.rows; r += SP_WARPS) {
                    float sum = -0.0f;
                    for (int owner = lane; owner < grid; owner += 32)
                        if (owns_rows(above.n_out, owner, grid))
                            sum = __fadd_rn(sum, s.exchange[owner * stride + r]);
#pragma unroll
                    for (int offset = 16; offset > 0; offset >>= 1)
                        sum = __fadd_rn(sum, __shfl_xor_sync(FULL_MASK, sum, offset));
                    if (lane == 0)
                        s.delta[r] = __fmul_rn(sum, scaled_tanh_derivative(s.delta[r]));
                }
                __syncthreads();
            } else {   // a block without rows of layer l still needs the next label (its output layer)
                fetch_upcoming(&upcoming, labels, order, fetch_next, after_next);
            }
            const bool tiled = l == register_layer;
            const float* step_input = top ? s.exchange : s.x;
            if (l > 0 || top) {
                // the partials of layer l are read by the owners of layer l - 1 after the barrier;
                // a net of one hidden layer (top, l = 0): every block has read y_0 before the next
                // image rewrites it. The steps touch only the block's own rows and copy, so they go
                // between the arrive and the wait.
                if (l > 0 && p.rows > 0)
                    hidden_partials(wreg, p, tiled, s.delta);
                GridArrival arrival = grid_arrive(barrier);
                if (top)
                    output_step(plan[last], s, lr, momentum, use_momentum);
                if (p.rows > 0)
                    hidden_step(wreg, p, tiled, step_input, s.delta, lr, momentum, use_momentum);
                grid_wait(barrier, arrival);
            } else {
                if (p.rows > 0)
                    hidden_step(wreg, p, tiled, step_input, s.delta, lr, momentum, use_momentum);
                __syncthreads();   // the next image's forward pass reads the rows just stepped
            }
        }
    }

    grid_sync(barrier);   // every block has read the cursor and the output layer, and finished
    copy_shared_rows(plan, last, false);
    copy_hidden_biases(plan, last, output_velocities, false);
    if (blockIdx.x == 0)   // every block's copy of the output layer holds the same bits
        copy_output_layer(plan[last], s, output_velocities, false);
#pragma unroll
    for (int r = 0; r < SP_REG_ROWS; ++r)
#pragma unroll
        for (int k = 0; k < SP_REG_COLS; ++k) {
            const int j = threadIdx.x + SP_THREADS * k;
            if (tile != nullptr && r < tile->register_rows && j < tile->n_in)
                tile->W[(size_t)(tile->row_begin + r) * tile->n_in + j] = wreg[r][k];
        }
    if (blockIdx.x == 0 && threadIdx.x == 0) {   // the trainer reads the totals after the launch
        loss_total[0] = launch_loss_total;
        wrong_total[0] = launch_wrong_total;
        cursor[0] = start + min(steps, max(n_samples - start, 0));
    }
}
