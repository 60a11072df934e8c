// The persistent online (batch size 1) engine: ONE cooperative launch trains `steps` consecutive
// images of the epoch. Reference: the graph engine's kernels (mlp_online.cu layer_forward_mv,
// backward_update_partial, backward_reduce; train_step.cu softmax_xent, gather_batch, finish_step),
// whose arithmetic it repeats operation for operation, so that both engines end with the same bits.
//
// Ownership. Layer l (W_l is (n_out, n_in)) is cut into chunks of PT_ROWS = 32 rows, the chunks of
// backward_update_partial. Chunk c of layer l belongs to block (first_l + c) % gridDim.x, where
// first_l is the number of chunks of the layers below (so the layers' chunks are dealt round the
// grid one after another). The owner of a chunk does everything to its rows, for every image of
// the launch: their forward outputs, their deltas, their partial sums of delta W and their SGD
// steps. Only activations y_l and chunk partials cross between blocks, through global memory (L2),
// with a grid-wide barrier between the write and the reads:
//   forward:  owners write y_l[rows]           -> grid barrier -> every block reads all of y_l
//   backward: owners write partial_l[chunk, :] -> grid barrier -> the owner of rows i of layer l-1
//             sums partial_l[0.., i] in chunk order (backward_reduce) and applies f'(y_{l-1}[i])
// i.e. 2 (L - 1) grid barriers per image for L layers. The output layer (<= 32 rows, one chunk)
// needs none: its owner does the softmax itself after a __syncthreads.
// Why no barrier between images: the next image's first writes (y_0) come after the barrier that
// follows the last reads of y_0 by other blocks (layer 1's partials and updates); every later
// buffer is likewise rewritten only after a barrier that follows its last read.
//
// Weights. With weights_in_shared the block copies its rows of every W into dynamic shared memory
// at the start of the launch and back at its end (the layout is (owned chunks in order, rows,
// n_in) per layer); otherwise it reads them from global memory. Biases and velocities stay in
// global memory. lr and momentum are read from device memory (hyper = [lr, momentum]).
//
// Exactness (the order of every sum is the graph engine's):
//   forward: one warp per row; lane l adds W[i, l + 32 m] x[l + 32 m] into accumulator m % 4 in
//     increasing m (layer_forward_mv's MV_UNROLL, a multiple of 4, gives the same assignment), the
//     four combined (a0 + a1) + (a2 + a3), then the same xor butterfly;
//   backward: thread t walks column j of its chunk's rows in row order with one fmaf chain (the
//     OLD weight times delta), then takes the step exactly as update_column / sgd_step;
//   reduce: the chunks of a column added in increasing chunk order from chunk 0, as backward_reduce.

#include "mlp_common.cuh"
#include "softmax_row.cuh"
#include "grid_sync.cuh"
#include "layer_table.cuh"
#include "row_forward.cuh"

#define PT_THREADS 256      // 8 warps; train_persistent.PERSISTENT_THREADS mirrors it
#define PT_WARPS (PT_THREADS / 32)
#define PT_ROWS 32          // = BU_ROWS of mlp_online.cu: the chunk of the partial sums
#define PT_MAX_LAYERS 12    // train_persistent.MAX_LAYERS (net 5 has 10)

// Where a block finds its part of each layer, computed once per launch by thread 0.
struct LayerPlan {
    float *W, *b, *vW, *vb, *y;
    int n_out, n_in, chunks;
    int first_chunk;        // the block's first chunk of this layer; it owns first, first + grid, ...
    float* rows;            // its rows: in shared memory (owned chunks back to back) or W itself
    float* partial;         // (chunks, n_in) partial sums of this layer (layer 0: none)
};

__device__ __forceinline__ float* chunk_rows(const LayerPlan& p, int chunk, int owned_index, bool in_shared)
{
    return in_shared ? p.rows + (size_t)owned_index * PT_ROWS * p.n_in : p.W + (size_t)chunk * PT_ROWS * p.n_in;
}

// Copies the block's rows of every layer between W (global) and its shared-memory copy.
__device__ __forceinline__ void copy_owned_rows(const LayerPlan* plan, int n_layers, bool to_shared)
{
    for (int l = 0; l < n_layers; ++l) {
        const LayerPlan& p = plan[l];
        for (int c = p.first_chunk, k = 0; c < p.chunks; c += gridDim.x, ++k) {
            const int rows = min(PT_ROWS, p.n_out - c * PT_ROWS);
            float* global_rows = p.W + (size_t)c * PT_ROWS * p.n_in;
            float* shared_rows = chunk_rows(p, c, k, true);
            for (int e = threadIdx.x; e < rows * p.n_in; e += blockDim.x) {
                if (to_shared)
                    shared_rows[e] = global_rows[e];
                else
                    global_rows[e] = shared_rows[e];
            }
        }
    }
}

// train_online_persistent: `steps` online SGD steps on images order[cursor ...], one after another.
//   layers (n_layers, 5) device addresses of W_l (n_out, n_in), b_l (n_out,), vW_l, vb_l (the
//     velocities; used only when momentum != 0) and y_l (n_out,) the activations;
//   sizes (n_layers + 1,) = n_in of layer 0, then n_out of every layer; the last <= 32;
//   partial: for every layer l >= 1 in turn, (ceil(n_out_l / 32), n_in_l) floats;
//   images (n_samples, sizes[0]), labels (n_samples,), order (n_samples,) the epoch's permutation,
//   cursor (1,) the position in the epoch, advanced by `steps`; loss_total (1,) double and
//   wrong_total (1,) take every image's loss and error, in image order; hyper (2,) = [lr, momentum];
//   barrier (1,) the grid barrier's counter (zero before the first launch; stays valid after).
// Grid: 1-D, at most the resident blocks (a cooperative launch); blockDim.x = PT_THREADS; dynamic
// shared memory: max n_in floats for the layer's input (every warp of the block reads all of it),
// then, when weights_in_shared, the block's rows of every W (train_persistent.plan_launch).
extern "C" __global__ void __launch_bounds__(PT_THREADS, 1)
train_online_persistent(const unsigned long long* __restrict__ layers, const int* __restrict__ sizes,
                        float* __restrict__ partial, const float* __restrict__ images,
                        const int* __restrict__ labels, const int* __restrict__ order,
                        int* __restrict__ cursor, double* __restrict__ loss_total,
                        int* __restrict__ wrong_total, const float* __restrict__ hyper,
                        unsigned int* __restrict__ barrier, int n_layers, int steps, int n_samples, int weights_in_shared)
{
    extern __shared__ float shared_memory[];   // x of the layer (max n_in), then the block's rows
    __shared__ LayerPlan plan[PT_MAX_LAYERS];
    __shared__ float delta[PT_ROWS];
    __shared__ int start;

    float* const x_shared = shared_memory;
    if (threadIdx.x == 0) {
        int chunks_below = 0, max_in = 0;
        for (int l = 0; l < n_layers; ++l)
            max_in = max(max_in, sizes[l]);
        size_t shared_offset = max_in, partial_offset = 0;
        for (int l = 0; l < n_layers; ++l) {
            LayerPlan& p = plan[l];
            read_layer_arrays(p, layers, l);
            p.n_in = sizes[l];
            p.n_out = sizes[l + 1];
            p.chunks = (p.n_out + PT_ROWS - 1) / PT_ROWS;
            // the smallest c >= 0 with (chunks_below + c) % grid == blockIdx.x
            const int grid = (int)gridDim.x;
            p.first_chunk = ((int)blockIdx.x - chunks_below % grid + grid) % grid;
            p.rows = weights_in_shared ? shared_memory + shared_offset : p.W;
            for (int c = p.first_chunk; c < p.chunks; c += grid)
                shared_offset += (size_t)min(PT_ROWS, p.n_out - c * PT_ROWS) * p.n_in;
            p.partial = l ? partial + partial_offset : nullptr;
            if (l)
                partial_offset += (size_t)p.chunks * p.n_in;
            chunks_below += p.chunks;
        }
        start = cursor[0];
    }
    __syncthreads();
    const bool in_shared = weights_in_shared != 0;
    if (in_shared)
        copy_owned_rows(plan, n_layers, true);
    const float lr = hyper[0], momentum = hyper[1];
    const bool use_momentum = momentum != 0.0f;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, last = n_layers - 1;
    __syncthreads();

    for (int step = 0; step < steps; ++step) {
        const int position = start + step;
        if (position < 0 || position >= n_samples)
            break;   // the same for every block: the trainer never asks for it
        const int sample = order[position];
        const float* image = images + (size_t)sample * sizes[0];

        // ---- forward: warp w of the owner computes rows w, w + 8, ... of each owned chunk
        for (int l = 0; l < n_layers; ++l) {
            const LayerPlan& p = plan[l];
            if (p.first_chunk < p.chunks) {   // the block owns rows of the layer: x to shared memory
                const float* x = l ? plan[l - 1].y : image;
                for (int j = threadIdx.x; j < p.n_in; j += blockDim.x)
                    x_shared[j] = __ldcg(x + j);
                __syncthreads();
            }
            for (int c = p.first_chunk, k = 0; c < p.chunks; c += gridDim.x, ++k) {
                const int rows = min(PT_ROWS, p.n_out - c * PT_ROWS);
                const float* w = chunk_rows(p, c, k, in_shared);
                for (int r = warp; r < rows; r += PT_WARPS) {
                    const int row = c * PT_ROWS + r;
                    const float y = row_forward(w + (size_t)r * p.n_in, x_shared, p.n_in, p.b[row], l < last);
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
            const LayerPlan& p = plan[l];
            const float* x = l ? plan[l - 1].y : image;
            for (int c = p.first_chunk, k = 0; c < p.chunks; c += gridDim.x, ++k) {
                const int rows = min(PT_ROWS, p.n_out - c * PT_ROWS);
                const int row_begin = c * PT_ROWS;
                if (l == last) {
                    if (warp == 0)
                        softmax_row(p.y, labels[sample], p.n_out, delta, loss_total, wrong_total);
                } else if (threadIdx.x < rows) {
                    // delta of row i: the partials of layer l + 1 in chunk order, times f'(y_l[i])
                    const LayerPlan& above = plan[l + 1];
                    const int i = row_begin + threadIdx.x;
                    float sum = __ldcg(above.partial + i);
                    for (int a = 1; a < above.chunks; ++a)
                        sum = __fadd_rn(sum, __ldcg(above.partial + (size_t)a * above.n_in + i));
                    delta[threadIdx.x] = __fmul_rn(sum, scaled_tanh_derivative(p.y[i]));
                }
                __syncthreads();

                float* w = chunk_rows(p, c, k, in_shared);
                float* v = p.vW + (size_t)row_begin * p.n_in;
                for (int j = threadIdx.x; j < p.n_in; j += blockDim.x) {
                    const float xj = __ldcg(x + j);
                    float acc = 0.0f;
                    for (int r = 0; r < rows; ++r) {
                        const size_t e = (size_t)r * p.n_in + j;
                        const float d = delta[r];
                        acc = fmaf(w[e], d, acc);       // the OLD weight, as the graph engine
                        sgd_step(w + e, v + e, __fmul_rn(lr, __fmul_rn(d, xj)), momentum, use_momentum);
                    }
                    if (l)
                        p.partial[(size_t)c * p.n_in + j] = acc;
                }
                if (threadIdx.x < rows) {
                    const int i = row_begin + threadIdx.x;
                    sgd_step(p.b + i, p.vb + i, __fmul_rn(lr, delta[threadIdx.x]), momentum, use_momentum);
                }
                __syncthreads();   // delta is rewritten by the next chunk
            }
            if (l)
                grid_sync(barrier);
        }
    }

    grid_sync(barrier);   // every block has read the cursor and finished its last image
    if (in_shared)
        copy_owned_rows(plan, n_layers, false);
    if (blockIdx.x == 0 && threadIdx.x == 0)
        cursor[0] = start + min(steps, max(n_samples - start, 0));
}
