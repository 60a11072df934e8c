// Planted bugs, one per check of the emulator (tests/test_emulator.py): each kernel is wrong in a way
// that a GPU run without compute-sanitizer would likely not show, and the matching check catches it.
// Valid CUDA for NVRTC too.

// memcheck: reads x[i + shift]; shift 1 reads one element past the end of x (an off-by-one).
extern "C" __global__ void shifted_copy(const float* __restrict__ x, float* __restrict__ y, int n, int shift) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = x[i + shift];
}

// memcheck: `i <= n` instead of `i < n` writes y[n].
extern "C" __global__ void inclusive_bound_fill(float* __restrict__ y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i <= n) y[i] = 1.0f;
}

// memcheck: thread 0 writes y[-1] (an index computed from 1 too early).
extern "C" __global__ void write_previous(int* __restrict__ y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i - 1] = i;
}

// initcheck: accumulates into y instead of assigning, so it reads what nothing wrote.
extern "C" __global__ void accumulate_instead_of_assign(const float* __restrict__ x, float* __restrict__ y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] += 2.0f * x[i];
}

// block order: a running sum over blocks that assumes block b-1 has finished before block b starts
// (true of the emulator's launch order, not of a GPU). One block per element; totals[b] = x[0..b].
extern "C" __global__ void running_sum_across_blocks(const float* __restrict__ x, float* __restrict__ totals) {
    if (threadIdx.x != 0) return;
    unsigned int b = blockIdx.x;
    totals[b] = (b ? totals[b - 1] : 0.0f) + x[b];
}

// launch limits: written for blocks of at most 128 threads.
extern "C" __global__ void __launch_bounds__(128) bounded_scale(float* __restrict__ y, float factor, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] *= factor;
}

// flush-to-zero: products, sums and differences as the three _rn intrinsics and as plain operators.
extern "C" __global__ void float_ops(const float* __restrict__ a, const float* __restrict__ b,
                                     float* __restrict__ out, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    out[6 * i + 0] = __fmul_rn(a[i], b[i]);
    out[6 * i + 1] = __fadd_rn(a[i], b[i]);
    out[6 * i + 2] = __fsub_rn(a[i], b[i]);
    out[6 * i + 3] = a[i] * b[i];
    out[6 * i + 4] = a[i] + b[i];
    out[6 * i + 5] = fmaf(a[i], b[i], 0.0f);
}
