// The table of layer arrays the cooperative kernels (mlp_persistent.cu, mlp_spread.cu) receive:
// for layer l, LAYER_ARRAYS device addresses in this order (train_persistent.CooperativeTrainer
// builds it; LAYER_ARRAYS there mirrors the #define).
#pragma once

#define LAYER_ARRAYS 5   // per layer in `layers`: W, b, vW, vb, y

// Sets p.W (n_out, n_in), p.b (n_out,), p.vW, p.vb (their velocities) and p.y (n_out,) of layer l.
template <typename Plan>
__device__ __forceinline__ void read_layer_arrays(Plan& p, const unsigned long long* layers, int l)
{
    p.W = reinterpret_cast<float*>(layers[LAYER_ARRAYS * l + 0]);
    p.b = reinterpret_cast<float*>(layers[LAYER_ARRAYS * l + 1]);
    p.vW = reinterpret_cast<float*>(layers[LAYER_ARRAYS * l + 2]);
    p.vb = reinterpret_cast<float*>(layers[LAYER_ARRAYS * l + 3]);
    p.y = reinterpret_cast<float*>(layers[LAYER_ARRAYS * l + 4]);
}
