// Philox4x32-10 (Salmon et al., SC11), the counter-based generator of the deformation.
//
// Being a pure function of (counter, key), any thread can draw any number without state, and the
// numpy reference (gpumlp/philox.py) draws the same bits. Project layout: key = (seed, epoch),
// counter = (image_index, block, 0, 0); see gpumlp/deform.py for which block feeds what.
#pragma once

#define PHILOX_M0 0xD2511F53u
#define PHILOX_M1 0xCD9E8D57u
#define PHILOX_W0 0x9E3779B9u
#define PHILOX_W1 0xBB67AE85u

// One call: counter (c0..c3) and key (k0, k1) in, the four output words back in c0..c3.
// The 32x32 -> 64-bit product is written in plain C (the compiler emits mul.wide / mul.hi),
// so the same text runs unchanged in the CPU emulator.
__device__ __forceinline__ void philox4x32_10(unsigned& c0, unsigned& c1, unsigned& c2, unsigned& c3,
                                              unsigned k0, unsigned k1)
{
    #pragma unroll
    for (int round = 0; round < 10; ++round) {
        const unsigned long long p0 = (unsigned long long)PHILOX_M0 * c0;
        const unsigned long long p1 = (unsigned long long)PHILOX_M1 * c2;
        const unsigned n0 = (unsigned)(p1 >> 32) ^ c1 ^ k0;
        const unsigned n2 = (unsigned)(p0 >> 32) ^ c3 ^ k1;
        c1 = (unsigned)p1;
        c3 = (unsigned)p0;
        c0 = n0;
        c2 = n2;
        k0 += PHILOX_W0;   // the bump after the last round is never used
        k1 += PHILOX_W1;
    }
}

// uint32 -> float in [-1, 1): (x >> 8) * 2^-23 - 1. A 24-bit integer times a power of two, then
// minus 1, is exact in float32, so no rounding mode or fma contraction can change the value and
// the reference gets the same bits.
__device__ __forceinline__ float philox_uniform_pm1(unsigned x)
{
    return __fadd_rn(__fmul_rn((float)(x >> 8), 1.1920928955078125e-07f), -1.0f);
}
