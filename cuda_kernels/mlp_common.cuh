// What the online (mlp_online.cu) and minibatch (mlp_batch.cu) kernels share: the scaled tanh of
// the hidden units and the SGD step of one parameter. Reference: gpumlp/reference.py.
#pragma once

#define TANH_A 0x1.b74538p+0f         // float32(1.7159)
#define TANH_B 0x1.554c98p-1f         // float32(0.6666)
#define TANH_B_OVER_A 0x1.8dceccp-2f  // float32(TANH_B) / float32(TANH_A), rounded once as numpy does
#define TANH_A_SQUARED 0x1.78df3cp+1f // float32(TANH_A) * float32(TANH_A)

// y = A tanh(B a), with the reference's roundings.
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

// The SGD step of one parameter of value p, rounded as sgd_update_ref rounds it (no contraction):
// plain, p - step; with momentum mu, v = mu v - step, then p + v. Returns the new value (for a
// parameter held in a register, mlp_spread.cu); *v is touched only with momentum.
__device__ __forceinline__ float sgd_stepped(float p, float* v, float step, float momentum, bool use_momentum)
{
    if (use_momentum) {
        const float velocity = __fsub_rn(__fmul_rn(momentum, *v), step);
        *v = velocity;
        return __fadd_rn(p, velocity);
    }
    return __fsub_rn(p, step);
}

// The same step of a parameter in memory, *p. p and v may be the same address without momentum.
__device__ __forceinline__ void sgd_step(float* p, float* v, float step, float momentum, bool use_momentum)
{
    *p = sgd_stepped(*p, v, step, momentum, use_momentum);
}
