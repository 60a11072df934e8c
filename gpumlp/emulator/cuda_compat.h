// The part of the CUDA language the project's kernels use, mapped onto C++17 for the CPU emulator.
// g++ force-includes this file (-include) before each unchanged .cu source; scheduler.c includes it
// for the shared types. Each CUDA thread runs as a fiber (scheduler.c), so the built-in indices are
// plain variables that the scheduler rewrites whenever it switches fibers, and everything that
// must wait for other threads (barriers, warp operations) is a call into the scheduler.
#pragma once

#include <float.h>
#include <limits.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <array>
#include <cmath>
#include <type_traits>
#include <utility>

#define __CUDACC__ 1
#define __CUDACC_RTC__ 1
#define GPUMLP_EMULATOR 1

#define GPUMLP_EXPORT __attribute__((visibility("default")))

// ---- qualifiers ------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __constant__
#define __managed__
#define __grid_constant__
#define __forceinline__ inline __attribute__((always_inline))
// Breaks libstdc++'s own __attribute__((__noinline__)) in <memory>, which kernels for NVRTC lack.
#define __noinline__ __attribute__((noinline))
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
// Blocks run one after another, so one static copy per variable is exactly per-block storage. The
// named section lets the scheduler find every such variable (__start_/__stop_gpumlp_shared) to
// poison it. `extern __shared__` cannot take `static`: the emulator's source step rewrites it.
#define __shared__ __attribute__((section("gpumlp_shared"))) static
#define GPUMLP_EXTERN_SHARED

// ---- vector types ----------------------------------------------------------------------------
#define GPUMLP_VECTOR2(name, T, align)                                                            \
    struct __attribute__((aligned(align))) name { T x, y; };                                      \
    static inline name make_##name(T x, T y) { return name{x, y}; }
#define GPUMLP_VECTOR3(name, T)                                                                   \
    struct name { T x, y, z; };                                                                   \
    static inline name make_##name(T x, T y, T z) { return name{x, y, z}; }
#define GPUMLP_VECTOR4(name, T, align)                                                            \
    struct __attribute__((aligned(align))) name { T x, y, z, w; };                                \
    static inline name make_##name(T x, T y, T z, T w) { return name{x, y, z, w}; }

GPUMLP_VECTOR2(float2, float, 8)
GPUMLP_VECTOR3(float3, float)
GPUMLP_VECTOR4(float4, float, 16)
GPUMLP_VECTOR2(double2, double, 16)
GPUMLP_VECTOR2(int2, int, 8)
GPUMLP_VECTOR3(int3, int)
GPUMLP_VECTOR4(int4, int, 16)
GPUMLP_VECTOR2(uint2, unsigned int, 8)
GPUMLP_VECTOR3(uint3, unsigned int)
GPUMLP_VECTOR4(uint4, unsigned int, 16)
GPUMLP_VECTOR4(char4, signed char, 4)
GPUMLP_VECTOR4(uchar4, unsigned char, 4)
GPUMLP_VECTOR2(longlong2, long long, 16)
GPUMLP_VECTOR2(ulonglong2, unsigned long long, 16)

struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
    constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
    constexpr operator uint3() const { return uint3{x, y, z}; }
};

// ---- the scheduler's side (scheduler.c) ------------------------------------------------------
extern "C" {
GPUMLP_EXPORT extern uint3 threadIdx;
GPUMLP_EXPORT extern uint3 blockIdx;
GPUMLP_EXPORT extern dim3 blockDim;
GPUMLP_EXPORT extern dim3 gridDim;

enum gpumlp_barrier_reduction { GPUMLP_BARRIER_PLAIN, GPUMLP_BARRIER_COUNT, GPUMLP_BARRIER_AND, GPUMLP_BARRIER_OR };
enum gpumlp_warp_op_kind {
    GPUMLP_SHFL_IDX, GPUMLP_SHFL_UP, GPUMLP_SHFL_DOWN, GPUMLP_SHFL_XOR,
    GPUMLP_SYNCWARP, GPUMLP_BALLOT, GPUMLP_ANY, GPUMLP_ALL
};
GPUMLP_EXPORT int gpumlp_barrier(int line, int reduction, int predicate);
GPUMLP_EXPORT unsigned long long gpumlp_warp_op(int kind, unsigned int mask, unsigned long long value,
                                                unsigned int argument, int width);

// Where one compiled module keeps its shared memory; the glue code of each module exports one.
// `dynamic` is page-aligned, `dynamic_mapped` bytes long: `dynamic_capacity` (the most a launch may
// give) then a guard zone, whole pages. With memcheck the scheduler makes the pages past a launch's
// dynamic shared memory PROT_NONE; `dynamic_accessible` is where its PROT_NONE pages begin (a byte
// offset from `dynamic`; `dynamic_mapped` when none are), kept between launches.
struct gpumlp_module_memory {
    char *static_begin, *static_end;
    char *dynamic;
    size_t dynamic_capacity, dynamic_mapped, dynamic_accessible;
};
}

static constexpr int warpSize = 32;

#define __syncthreads() gpumlp_barrier(__LINE__, GPUMLP_BARRIER_PLAIN, 0)
#define __syncthreads_count(p) gpumlp_barrier(__LINE__, GPUMLP_BARRIER_COUNT, (p))
#define __syncthreads_and(p) gpumlp_barrier(__LINE__, GPUMLP_BARRIER_AND, (p))
#define __syncthreads_or(p) gpumlp_barrier(__LINE__, GPUMLP_BARRIER_OR, (p))

// ---- cooperative groups: the grid of a cooperative launch ---------------------------------------
// The names of CUDA's <cooperative_groups.h> that the kernels use. this_grid().sync() is a barrier
// of every thread of the grid; the scheduler refuses it outside a cooperative launch. The default
// argument records the caller's line for deadlock reports. barrier_arrive() and
// barrier_wait(token) are the two halves of one grid barrier (CUDA 12's split barrier): the
// scheduler makes one of them the real barrier (the launch's SPLIT_AT_WAIT flag) and checks that
// every thread pairs them. The token carries nothing: the scheduler keeps each thread's pending
// arrive itself (CUDA's own token is an unsigned int that only the block's first thread uses).
extern "C" GPUMLP_EXPORT void gpumlp_grid_sync(int line);
extern "C" GPUMLP_EXPORT void gpumlp_grid_arrive(int line);
extern "C" GPUMLP_EXPORT void gpumlp_grid_wait(int line);
namespace cooperative_groups {
struct grid_group {
    struct arrival_token {};
    void sync(int line = __builtin_LINE()) const { gpumlp_grid_sync(line); }
    arrival_token barrier_arrive(int line = __builtin_LINE()) const {
        gpumlp_grid_arrive(line);
        return arrival_token();
    }
    void barrier_wait(arrival_token &&token, int line = __builtin_LINE()) const {
        (void)token;
        gpumlp_grid_wait(line);
    }
    unsigned long long num_threads() const {
        return (unsigned long long)gridDim.x * gridDim.y * gridDim.z * blockDim.x * blockDim.y * blockDim.z;
    }
    unsigned long long num_blocks() const { return (unsigned long long)gridDim.x * gridDim.y * gridDim.z; }
    unsigned long long block_rank() const { return blockIdx.x + gridDim.x * (blockIdx.y + (unsigned long long)gridDim.y * blockIdx.z); }
    bool is_valid() const { return true; }
};
static inline grid_group this_grid() { return grid_group(); }
}  // namespace cooperative_groups

// ---- warp operations ---------------------------------------------------------------------------
template <class T>
static inline unsigned long long gpumlp_to_bits(T value) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "warp shuffles move at most 8 bytes");
    unsigned long long bits = 0;
    memcpy(&bits, &value, sizeof value);
    return bits;
}
template <class T>
static inline T gpumlp_from_bits(unsigned long long bits) {
    T value;
    memcpy(&value, &bits, sizeof value);
    return value;
}
template <class T>
static inline T __shfl_sync(unsigned int mask, T var, int src_lane, int width = 32) {
    return gpumlp_from_bits<T>(gpumlp_warp_op(GPUMLP_SHFL_IDX, mask, gpumlp_to_bits(var), (unsigned)src_lane, width));
}
template <class T>
static inline T __shfl_up_sync(unsigned int mask, T var, unsigned int delta, int width = 32) {
    return gpumlp_from_bits<T>(gpumlp_warp_op(GPUMLP_SHFL_UP, mask, gpumlp_to_bits(var), delta, width));
}
template <class T>
static inline T __shfl_down_sync(unsigned int mask, T var, unsigned int delta, int width = 32) {
    return gpumlp_from_bits<T>(gpumlp_warp_op(GPUMLP_SHFL_DOWN, mask, gpumlp_to_bits(var), delta, width));
}
template <class T>
static inline T __shfl_xor_sync(unsigned int mask, T var, int lane_mask, int width = 32) {
    return gpumlp_from_bits<T>(gpumlp_warp_op(GPUMLP_SHFL_XOR, mask, gpumlp_to_bits(var), (unsigned)lane_mask, width));
}
static inline void __syncwarp(unsigned int mask = 0xffffffffu) { gpumlp_warp_op(GPUMLP_SYNCWARP, mask, 0, 0, 32); }
static inline unsigned int __ballot_sync(unsigned int mask, int predicate) {
    return (unsigned int)gpumlp_warp_op(GPUMLP_BALLOT, mask, predicate != 0, 0, 32);
}
static inline int __any_sync(unsigned int mask, int predicate) {
    return (int)gpumlp_warp_op(GPUMLP_ANY, mask, predicate != 0, 0, 32);
}
static inline int __all_sync(unsigned int mask, int predicate) {
    return (int)gpumlp_warp_op(GPUMLP_ALL, mask, predicate != 0, 0, 32);
}

// ---- atomics -----------------------------------------------------------------------------------
// Fibers switch only at barriers and warp operations and blocks run one after another, so a plain
// read-modify-write is already atomic with respect to every other CUDA thread.
#define GPUMLP_ATOMIC(name, T, update)                                                            \
    static inline T name(T *address, T value) {                                                   \
        T old = *address;                                                                         \
        *address = (update);                                                                      \
        return old;                                                                               \
    }
#define GPUMLP_ATOMIC_ALL_INTEGERS(name, update)                                                  \
    GPUMLP_ATOMIC(name, int, update)                                                              \
    GPUMLP_ATOMIC(name, unsigned int, update)                                                     \
    GPUMLP_ATOMIC(name, unsigned long long, update)
GPUMLP_ATOMIC_ALL_INTEGERS(atomicAdd, old + value)
GPUMLP_ATOMIC(atomicAdd, float, old + value)
GPUMLP_ATOMIC(atomicAdd, double, old + value)
GPUMLP_ATOMIC(atomicSub, int, old - value)
GPUMLP_ATOMIC(atomicSub, unsigned int, old - value)
GPUMLP_ATOMIC_ALL_INTEGERS(atomicExch, value)
GPUMLP_ATOMIC(atomicExch, float, value)
GPUMLP_ATOMIC_ALL_INTEGERS(atomicMax, old > value ? old : value)
GPUMLP_ATOMIC(atomicMax, long long, old > value ? old : value)
GPUMLP_ATOMIC_ALL_INTEGERS(atomicMin, old < value ? old : value)
GPUMLP_ATOMIC(atomicMin, long long, old < value ? old : value)
GPUMLP_ATOMIC_ALL_INTEGERS(atomicAnd, old & value)
GPUMLP_ATOMIC_ALL_INTEGERS(atomicOr, old | value)
GPUMLP_ATOMIC_ALL_INTEGERS(atomicXor, old ^ value)
GPUMLP_ATOMIC(atomicInc, unsigned int, old >= value ? 0u : old + 1u)
GPUMLP_ATOMIC(atomicDec, unsigned int, (old == 0u || old > value) ? value : old - 1u)
#define GPUMLP_ATOMIC_CAS(T)                                                                      \
    static inline T atomicCAS(T *address, T compare, T value) {                                   \
        T old = *address;                                                                         \
        if (old == compare) *address = value;                                                     \
        return old;                                                                               \
    }
GPUMLP_ATOMIC_CAS(int)
GPUMLP_ATOMIC_CAS(unsigned int)
GPUMLP_ATOMIC_CAS(unsigned long long)
GPUMLP_ATOMIC_CAS(unsigned short)

static inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
static inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
static inline void __threadfence_system() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
static inline void __trap() { __builtin_trap(); }

template <class T>
static inline T __ldg(const T *address) { return *address; }
template <class T>
static inline T __ldcg(const T *address) { return *address; }

// ---- math --------------------------------------------------------------------------------------
// glibc declares these names itself (as internal aliases), so they can only be macros here.
#define __expf(x) expf(x)
#define __logf(x) logf(x)
#define __sinf(x) sinf(x)
#define __cosf(x) cosf(x)
#define __powf(x, y) powf(x, y)
#define __tanf(x) tanf(x)
#define __exp10f(x) exp10f(x)
#define __log2f(x) log2f(x)
#define __log10f(x) log10f(x)
#define __sincosf(x, s, c) sincosf(x, s, c)

#define GPUMLP_MIN_MAX(T)                                                                         \
    static inline T min(T a, T b) { return a < b ? a : b; }                                       \
    static inline T max(T a, T b) { return a > b ? a : b; }
GPUMLP_MIN_MAX(int)
GPUMLP_MIN_MAX(unsigned int)
GPUMLP_MIN_MAX(long)
GPUMLP_MIN_MAX(unsigned long)
GPUMLP_MIN_MAX(long long)
GPUMLP_MIN_MAX(unsigned long long)
static inline float min(float a, float b) { return fminf(a, b); }
static inline float max(float a, float b) { return fmaxf(a, b); }
static inline double min(double a, double b) { return fmin(a, b); }
static inline double max(double a, double b) { return fmax(a, b); }
static inline unsigned int min(int a, unsigned int b) { return min((unsigned int)a, b); }
static inline unsigned int min(unsigned int a, int b) { return min(a, (unsigned int)b); }
static inline unsigned int max(int a, unsigned int b) { return max((unsigned int)a, b); }
static inline unsigned int max(unsigned int a, int b) { return max(a, (unsigned int)b); }

using std::isfinite;
using std::isinf;
using std::isnan;

static inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
static inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
static inline float fdividef(float a, float b) { return a / b; }
static inline float __fdividef(float a, float b) { return a / b; }
static inline float __fdiv_rn(float a, float b) { return a / b; }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fsub_rn(float a, float b) { return a - b; }
static inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
static inline float __frcp_rn(float x) { return 1.0f / x; }
static inline float __fsqrt_rn(float x) { return sqrtf(x); }
static inline float __frsqrt_rn(float x) { return 1.0f / sqrtf(x); }
static inline int __float2int_rd(float x) { return (int)floorf(x); }
static inline int __float2int_ru(float x) { return (int)ceilf(x); }
static inline int __float2int_rn(float x) { return (int)nearbyintf(x); }
static inline int __float2int_rz(float x) { return (int)x; }
static inline unsigned int __float2uint_rd(float x) { return (unsigned int)floorf(x); }
static inline unsigned int __float2uint_rn(float x) { return (unsigned int)nearbyintf(x); }
static inline unsigned int __float2uint_rz(float x) { return (unsigned int)x; }
static inline float __int2float_rn(int x) { return (float)x; }
static inline float __uint2float_rn(unsigned int x) { return (float)x; }
static inline float __int_as_float(int x) { return gpumlp_from_bits<float>((unsigned int)x); }
static inline float __uint_as_float(unsigned int x) { return gpumlp_from_bits<float>(x); }
static inline int __float_as_int(float x) { return (int)gpumlp_to_bits(x); }
static inline unsigned int __float_as_uint(float x) { return (unsigned int)gpumlp_to_bits(x); }
static inline long long __double_as_longlong(double x) { return (long long)gpumlp_to_bits(x); }
static inline double __longlong_as_double(long long x) { return gpumlp_from_bits<double>((unsigned long long)x); }

// ---- integer intrinsics ------------------------------------------------------------------------
static inline unsigned int __umulhi(unsigned int a, unsigned int b) { return (unsigned int)(((unsigned long long)a * b) >> 32); }
static inline int __mulhi(int a, int b) { return (int)(((long long)a * b) >> 32); }
static inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
    return (unsigned long long)(((unsigned __int128)a * b) >> 64);
}
static inline int __mul24(int a, int b) {
    return (int)((unsigned int)(((int)((unsigned int)a << 8)) >> 8) * (unsigned int)(((int)((unsigned int)b << 8)) >> 8));
}
static inline unsigned int __umul24(unsigned int a, unsigned int b) { return (a & 0xffffffu) * (b & 0xffffffu); }
static inline int __popc(unsigned int x) { return __builtin_popcount(x); }
static inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
static inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned int)x); }
static inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
static inline int __ffs(int x) { return __builtin_ffs(x); }
static inline int __ffsll(long long x) { return __builtin_ffsll(x); }
static inline unsigned int __brev(unsigned int x) {
    x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
    x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
    x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
    return __builtin_bswap32(x);
}
