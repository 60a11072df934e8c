// Kernels that need a grid-wide barrier (tests/test_persistent_emulator.py): launched cooperatively,
// cooperative_groups::this_grid().sync() orders every block's writes before every block's reads.
// Kept out of tests/kernels/*.cu because <cooperative_groups.h> comes with the CUDA toolkit, which
// bare NVRTC does not find.
#include <cooperative_groups.h>

namespace cg = cooperative_groups;

// values (gridDim.x,), out (gridDim.x,): block b writes values[b], then reads its neighbour's slot
// values[(b + 1) % gridDim.x]. Without the barrier (synchronise == 0) that read races the write.
extern "C" __global__ void neighbour_exchange(float* values, float* out, int synchronise)
{
    if (threadIdx.x == 0)
        values[blockIdx.x] = 1.0f + blockIdx.x;
    if (synchronise)
        cg::this_grid().sync();
    if (threadIdx.x == 0)
        out[blockIdx.x] = values[(blockIdx.x + 1) % gridDim.x];
}

// out (gridDim.x, blockDim.x <= 64): each block's shared memory keeps its own values across
// `rounds` grid barriers, while every other block runs in between.
extern "C" __global__ void shared_survives_grid_sync(int* out, int rounds)
{
    __shared__ int mine[64];
    mine[threadIdx.x] = blockIdx.x * 1000 + threadIdx.x;
    for (int r = 0; r < rounds; ++r)
        cg::this_grid().sync();
    out[blockIdx.x * blockDim.x + threadIdx.x] = mine[threadIdx.x];
}

// out (gridDim.x,): the odd blocks never reach the grid barrier that the even blocks wait at.
extern "C" __global__ void odd_blocks_skip_the_grid_sync(int* out)
{
    if (blockIdx.x % 2 == 0)
        cg::this_grid().sync();
    out[blockIdx.x] = 1;
}

// out (gridDim.x,): half of each block waits at __syncthreads, the other half at the grid barrier.
extern "C" __global__ void block_and_grid_barrier_mixed(int* out)
{
    if (threadIdx.x < 16)
        __syncthreads();
    else
        cg::this_grid().sync();
    out[blockIdx.x] = 1;
}

// table (1,) holds the address of a float array that is not an argument; out (gridDim.x,): block b
// writes element `index` + b of that array after a grid barrier, then copies it to out[b]. With an
// index outside the array, memcheck must report the access it cannot see among the arguments.
extern "C" __global__ void write_through_table(const unsigned long long* table, int index, float* out)
{
    float* values = (float*)table[0];
    cg::this_grid().sync();
    if (threadIdx.x == 0) {
        values[index + (int)blockIdx.x] = 2.0f;
        out[blockIdx.x] = values[index + (int)blockIdx.x];
    }
}

// in, out (gridDim.x,): block b halves in[b] after a grid barrier; a subnormal result is zero under
// -ftz=true, as CuPy compiles.
extern "C" __global__ void halve_after_grid_sync(const float* in, float* out)
{
    cg::this_grid().sync();
    if (threadIdx.x == 0)
        out[blockIdx.x] = in[blockIdx.x] * 0.5f;
}
