// Kernels exercising the emulator's CUDA semantics (tests/test_emulator.py); valid CUDA for NVRTC too.

extern "C" __global__ void scale_with_tail(const float* __restrict__ x, float* __restrict__ y, float factor, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = factor * x[i] + (float)i;
}

// One block row per blockIdx.y, to check 2-D grids and blocks: out[row][col] = row * 1000 + col.
extern "C" __global__ void index_2d(int* out, int rows, int cols) {
    int col = blockIdx.x * blockDim.x + threadIdx.x;
    int row = blockIdx.y * blockDim.y + threadIdx.y;
    if (row < rows && col < cols) out[row * cols + col] = row * 1000 + col;
}

extern "C" __global__ void __launch_bounds__(256) block_sum(const float* __restrict__ x, float* __restrict__ partial, int n) {
    __shared__ float buffer[256];
    unsigned int t = threadIdx.x;
    unsigned int i = blockIdx.x * blockDim.x + t;
    buffer[t] = i < (unsigned int)n ? x[i] : 0.0f;
    __syncthreads();
    for (unsigned int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
        if (t < stride) buffer[t] += buffer[t + stride];
        __syncthreads();
    }
    if (t == 0) partial[blockIdx.x] = buffer[0];
}

__device__ __forceinline__ float warp_sum(float value) {
#pragma unroll
    for (int offset = warpSize / 2; offset > 0; offset >>= 1) value += __shfl_down_sync(0xffffffffu, value, offset);
    return value;
}

// Per warp: the sum by shfl_down (lane 0) and by shfl_xor (every lane), lane 0's value broadcast by
// shfl, the inclusive prefix sum by shfl_up, and a half-warp (width 16) rotation.
extern "C" __global__ void warp_shuffles(const float* __restrict__ x, float* __restrict__ down_sum,
                                         float* __restrict__ xor_sum, float* __restrict__ broadcast,
                                         float* __restrict__ prefix, float* __restrict__ rotated) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    int lane = threadIdx.x % warpSize;
    float value = x[i];
    float total = warp_sum(value);
    if (lane == 0) down_sum[i / warpSize] = total;
    float butterfly = value;
    for (int mask = 16; mask > 0; mask >>= 1) butterfly += __shfl_xor_sync(0xffffffffu, butterfly, mask);
    xor_sum[i] = butterfly;
    broadcast[i] = __shfl_sync(0xffffffffu, value, 0);
    float running = value;
    for (int delta = 1; delta < 32; delta <<= 1) {
        float before = __shfl_up_sync(0xffffffffu, running, delta);
        if (lane >= delta) running += before;
    }
    prefix[i] = running;
    rotated[i] = __shfl_sync(0xffffffffu, value, lane + 1, 16);
}

extern "C" __global__ void warp_votes(const int* __restrict__ flags, unsigned int* __restrict__ ballots,
                                      int* __restrict__ any, int* __restrict__ all, int* __restrict__ counts) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    int flag = flags[i];
    unsigned int ballot = __ballot_sync(0xffffffffu, flag);
    int some = __any_sync(0xffffffffu, flag);
    int every = __all_sync(0xffffffffu, flag);
    __syncwarp();
    if (threadIdx.x % 32 == 0) {
        ballots[i / 32] = ballot;
        any[i / 32] = some;
        all[i / 32] = every;
    }
    int block_count = __syncthreads_count(flag);
    if (threadIdx.x == 0) counts[blockIdx.x] = block_count;
}

// Reverses each block's slice through dynamic shared memory, seen under two names as in CUDA.
extern "C" __global__ void reverse_through_dynamic_shared(const float* __restrict__ x, float* __restrict__ y) {
    extern __shared__ float staged[];
    extern __shared__ __align__(16) unsigned char raw_staged[];
    unsigned int t = threadIdx.x;
    staged[t] = x[blockIdx.x * blockDim.x + t];
    __syncthreads();
    const float* same = reinterpret_cast<const float*>(raw_staged);
    y[blockIdx.x * blockDim.x + t] = same[blockDim.x - 1 - t];
}

// __shared__ inside an inline helper: one copy per block, like the kernel's own.
__device__ __forceinline__ float from_next_thread(float value) {
    __shared__ float exchange[64];
    exchange[threadIdx.x] = value;
    __syncthreads();
    return exchange[(threadIdx.x + 1) % blockDim.x];
}

extern "C" __global__ void rotate_through_helper(const float* __restrict__ x, float* __restrict__ y) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    y[i] = from_next_thread(x[i]);
}

extern "C" __global__ void atomics(const int* __restrict__ values, int n, int* __restrict__ int_sum,
                                   float* __restrict__ float_sum, unsigned int* __restrict__ unsigned_sum,
                                   int* __restrict__ maximum, int* __restrict__ minimum, int* __restrict__ first_claim,
                                   int* __restrict__ last_exchange, unsigned long long* __restrict__ wide_sum) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    int v = values[i];
    atomicAdd(int_sum, v);
    atomicAdd(float_sum, 0.5f * (float)v);
    atomicAdd(unsigned_sum, (unsigned int)v);
    atomicMax(maximum, v);
    atomicMin(minimum, v);
    atomicCAS(first_claim, -1, i);
    atomicExch(last_exchange, v);
    atomicAdd(wide_sum, (unsigned long long)v << 32);
}

extern "C" __global__ void intrinsics(const float* __restrict__ x, float* __restrict__ f, int* __restrict__ k) {
    float v = x[threadIdx.x];
    f[0] = __expf(v);
    f[1] = rsqrtf(v);
    f[2] = __fdividef(1.0f, v);
    f[3] = __int_as_float(__float_as_int(v));
    f[4] = min(v, 0.25f);
    f[5] = fmaxf(v, 2.0f);
    k[0] = __float2int_rd(-v);
    k[1] = __float2int_rn(2.5f);
    k[2] = __popc(0xf0f0u);
    k[3] = __clz(1);
    k[4] = __ffs(8);
    k[5] = (int)__umulhi(0x80000000u, 6u);
    k[6] = __mul24(-3, 5);
    k[7] = max(3, 7);
}

extern "C" __global__ void exit_before_barrier(float* out) {
    if (threadIdx.x >= 16) return;
    __syncthreads();
    out[threadIdx.x] = 1.0f;
}

extern "C" __global__ void barriers_in_both_branches(float* out) {
    if (threadIdx.x < 16) {
        __syncthreads();
        out[threadIdx.x] = 1.0f;
    } else {
        __syncthreads();
        out[threadIdx.x] = 2.0f;
    }
}

extern "C" __global__ void shuffle_after_exit(float* out) {
    if (threadIdx.x % 2) return;
    out[threadIdx.x] = __shfl_down_sync(0xffffffffu, 1.0f, 1);
}

extern "C" __global__ void write_through_null(float* out, int poke_null) {
    float* volatile target = poke_null ? nullptr : out;
    target[threadIdx.x] = 1.0f;
}

// The order in which blocks run: tickets[linear block index] = how many blocks ran before it.
extern "C" __global__ void block_tickets(unsigned int* __restrict__ counter, unsigned int* __restrict__ tickets) {
    if (threadIdx.x != 0) return;
    unsigned int block = (blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
    tickets[block] = atomicAdd(counter, 1u);
}

// The same array as two arguments: under memcheck both must still be one memory.
extern "C" __global__ void add_through_alias(const float* __restrict__ source, float* target, float* alias, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    target[i] = source[i];
    alias[i] += 1.0f;
}
