// The row dot product of the cooperative kernels (mlp_persistent.cu, mlp_spread.cu).
#pragma once

#include "mlp_common.cuh"
#include "softmax_row.cuh"   // FULL_MASK

#define ROW_MV_UNROLL 16   // loads in flight per lane; a multiple of 4 (MV_UNROLL of mlp_online.cu gives
                          // the same accumulator of every product)

// act(w . x + b) of one row by one warp, in layer_forward_mv's order (mlp_online.cu): lane l adds
// w[l + 32 m] x[l + 32 m] into accumulator m % 4 in increasing m, the four combined
// (a0 + a1) + (a2 + a3), then an xor butterfly over the lanes (every lane gets the sum). w (n_in,) in
// shared or global memory, x (n_in,) in shared memory.
__device__ __forceinline__ float row_forward(const float* w, const float* x, int n_in, float bias, bool activate)
{
    const int lane = threadIdx.x & 31;
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int j0 = lane; j0 < n_in; j0 += 32 * ROW_MV_UNROLL) {
        float wv[ROW_MV_UNROLL], xv[ROW_MV_UNROLL];
#pragma unroll
        for (int k = 0; k < ROW_MV_UNROLL; ++k) {
            const int j = j0 + 32 * k;
            const bool inside = j < n_in;
            wv[k] = inside ? w[j] : 0.0f;
            xv[k] = inside ? x[j] : 0.0f;
        }
#pragma unroll
        for (int k = 0; k < ROW_MV_UNROLL; ++k)
            acc[k & 3] = fmaf(wv[k], xv[k], acc[k & 3]);
    }
    float sum = __fadd_rn(__fadd_rn(acc[0], acc[1]), __fadd_rn(acc[2], acc[3]));
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1)
        sum = __fadd_rn(sum, __shfl_xor_sync(FULL_MASK, sum, offset));
    const float a = __fadd_rn(sum, bias);
    return activate ? scaled_tanh(a) : a;
}
