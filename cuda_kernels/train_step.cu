// The kernel that closes the forward half of a training step, shared by the online (B = 1) and
// minibatch paths: the softmax/cross-entropy head with the step's bookkeeping. Reference:
// gpumlp/reference.py (softmax_xent_ref, and finish_step_ref for the totals).
//
// The position in the epoch lives in a device int, `cursor`: the first layer's forward kernel
// (layer_forward_mv_gather or layer_forward_gemm_gather, which gather their samples themselves)
// reads it and softmax_xent advances it; nothing after softmax_xent in a step reads it, so a CUDA
// graph captured once for K steps replays unchanged for every chunk of K steps of the epoch. No
// atomics: bit-repeatable.

#include "softmax_row.cuh"

// softmax_xent: per row of logits, softmax, cross-entropy loss, output delta and the argmax; then
// the step's bookkeeping (what a separate one-thread finish_step kernel did before: fused, the
// step saves a launch).
//   logits (B, C), labels (B,) in [0, C); outputs delta (B, C) = softmax - onehot(label),
//   loss (B,) = -log p[label] = log(sum exp(l - max)) - (l[label] - max), prediction (B,) the
//   first argmax, wrong (B,) = prediction != label. A label outside [0, C) gives loss NaN and
//   wrong 1 rather than an out-of-bounds read. Then loss_total (1,) double += loss[0], loss[1],
//   ... added one by one in that order, wrong_total (1,) int += sum of wrong, cursor (1,) int += B.
// ONE block (grid 1: the in-order totals need every row of the step, and blocks cannot wait for
// each other); its warps take rows warp, warp + warps, ...: each row is softmax_xent_row
// (softmax_row.cuh; lane l handles classes l, l + 32, ..., so any C works; xor butterflies, so
// the result is repeatable and identical in every lane), and lane 0 writes the row's loss,
// prediction and wrong. After a barrier (which makes every row's loss and wrong visible to the
// block), thread 0 adds them up in row order.
extern "C" __global__ void softmax_xent(const float* __restrict__ logits,
                                        const int* __restrict__ labels,
                                        float* __restrict__ delta,
                                        float* __restrict__ loss,
                                        int* __restrict__ wrong,
                                        int* __restrict__ prediction,
                                        double* __restrict__ loss_total,
                                        int* __restrict__ wrong_total,
                                        int* __restrict__ cursor,
                                        int n_rows, int n_classes)
{
    const int lane = threadIdx.x & 31;
    const int warps = blockDim.x >> 5;
    for (int row = threadIdx.x >> 5; row < n_rows; row += warps) {   // warp-uniform
        const int label = labels[row];
        const SoftmaxXent row_result =
            softmax_xent_row(logits + (size_t)row * n_classes, label, n_classes, delta + (size_t)row * n_classes);
        if (lane == 0) {
            loss[row] = row_result.loss;
            prediction[row] = row_result.prediction;
            wrong[row] = row_result.prediction != label;
        }
    }
    __syncthreads();   // every row's loss and wrong are written
    if (threadIdx.x == 0 && blockIdx.x == 0) {
        double sum = loss_total[0];
        int errors = wrong_total[0];
        for (int r = 0; r < n_rows; ++r) {
            sum += (double)loss[r];
            errors += wrong[r];
        }
        loss_total[0] = sum;
        wrong_total[0] = errors;
        cursor[0] += n_rows;
    }
}
