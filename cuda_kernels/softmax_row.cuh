// The softmax/cross-entropy of one row by one warp, shared by the graph engine's softmax_xent
// (train_step.cu) and the cooperative kernels train_online_persistent (mlp_persistent.cu, which so
// ends with the graph engine's bits) and train_online_spread (mlp_spread.cu). Reference:
// gpumlp/reference.py softmax_xent_ref.
#pragma once

#define FULL_MASK 0xffffffffu   // every lane of the warp takes part in the shuffles

// Which of two (value, index) candidates is the argmax: the larger value, the smaller index on
// ties (numpy's "first maximum"); index == n_classes marks "no candidate" (a lane with no class).
__device__ __forceinline__ bool takes_over(float other_value, int other_index, float value, int index,
                                           int n_classes)
{
    if (other_index == n_classes)
        return false;
    if (index == n_classes)
        return true;
    return other_value > value || (other_value == value && other_index < index);
}

// What softmax_xent_row hands back: the same in every lane of the warp.
struct SoftmaxXent {
    float loss;       // -log p[label]; NaN for a label outside [0, n_classes)
    int prediction;   // the first argmax of the logits
};

// Called by all 32 lanes of a warp (warp-uniform arguments); lane l handles classes l, l + 32, ...
// so any n_classes works. logits (n_classes,) and delta (n_classes,) in global or shared memory;
// writes delta = softmax(logits) - onehot(label). The max/argmax and the sum of exp(l - max) (each
// lane adds its classes in increasing order) are combined with xor butterflies: a fixed pairing,
// so the result is repeatable and identical in every lane. loss = log(sum) - (l[label] - max).
// A label outside [0, n_classes) gives loss NaN rather than an out-of-bounds read.
// No __restrict__ on logits: the persistent kernel writes them earlier in the same launch, so
// they must not be read through the read-only cache.
__device__ __forceinline__ SoftmaxXent softmax_xent_row(const float* logits, int label, int n_classes,
                                                        float* delta)
{
    const int lane = threadIdx.x & 31;
    float best = 0.0f;
    int best_index = n_classes;
    for (int c = lane; c < n_classes; c += 32)
        if (takes_over(logits[c], c, best, best_index, n_classes)) {
            best = logits[c];
            best_index = c;
        }
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        const float other = __shfl_xor_sync(FULL_MASK, best, offset);
        const int other_index = __shfl_xor_sync(FULL_MASK, best_index, offset);
        if (takes_over(other, other_index, best, best_index, n_classes)) {
            best = other;
            best_index = other_index;
        }
    }

    float total = 0.0f;
    for (int c = lane; c < n_classes; c += 32)
        total = __fadd_rn(total, expf(__fsub_rn(logits[c], best)));
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1)
        total = __fadd_rn(total, __shfl_xor_sync(FULL_MASK, total, offset));

    for (int c = lane; c < n_classes; c += 32) {
        const float p = __fdiv_rn(expf(__fsub_rn(logits[c], best)), total);
        delta[c] = c == label ? __fsub_rn(p, 1.0f) : p;
    }
    const bool label_ok = label >= 0 && label < n_classes;
    SoftmaxXent result;
    result.loss = label_ok ? __fsub_rn(logf(total), __fsub_rn(logits[label], best)) : __int_as_float(0x7fc00000);
    result.prediction = best_index;
    return result;
}

// softmax_xent of train_step.cu for ONE row, by one warp, for mlp_persistent.cu: delta[c] =
// softmax - onehot(label) into shared memory (softmax_xent_row), and (lane 0) the loss and the
// error added to the epoch totals as finish_step adds them. logits (n_classes,) in global memory,
// written by the calling block. (mlp_spread.cu calls softmax_xent_row in every block and adds to
// the totals in block 0 only.)
__device__ __forceinline__ void softmax_row(const float* logits, int label, int n_classes, float* delta,
                                            double* loss_total, int* wrong_total)
{
    const SoftmaxXent result = softmax_xent_row(logits, label, n_classes, delta);
    if ((threadIdx.x & 31) == 0) {
        loss_total[0] = loss_total[0] + (double)result.loss;
        wrong_total[0] += result.prediction != label;
    }
}
