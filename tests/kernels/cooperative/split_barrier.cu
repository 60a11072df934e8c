// Kernels with a split grid barrier, barrier_arrive then barrier_wait (tests/test_emulator_split_barrier.py):
// a block publishes what other blocks read, arrives, works on its own data, then waits. The
// planted bugs each show under one of the emulator's split_barrier settings. Written for NVRTC
// with the toolkit's <cooperative_groups.h> (no std::move there: the token is cast to an rvalue).
#include <cooperative_groups.h>

namespace cg = cooperative_groups;
typedef cg::grid_group::arrival_token token_t;

// partial (2, gridDim.x), sums (gridDim.x,), own (gridDim.x, blockDim.x): in round r block b
// publishes slot r % 2 of partial[., b], arrives, adds 1 to its own row of `own`, waits, then adds
// its neighbour's published value to its sum. Two slots: round r + 1 writes the slot that round r
// - 1 read, with round r's barrier in between. A grid sync ends the rounds before the sums are written.
extern "C" __global__ void split_ring(float* partial, float* sums, float* own, int rounds)
{
    cg::grid_group grid = cg::this_grid();
    const unsigned int b = blockIdx.x, next = (b + 1) % gridDim.x;
    float sum = 0.0f;
    for (int r = 0; r < rounds; ++r) {
        float* slot = partial + (r % 2) * gridDim.x;
        if (threadIdx.x == 0)
            slot[b] = 1.0f + b + 100.0f * r;
        token_t token = grid.barrier_arrive();   // ring arrive
        own[b * blockDim.x + threadIdx.x] += 1.0f;
        grid.barrier_wait(static_cast<token_t&&>(token));
        if (threadIdx.x == 0)
            sum += slot[next];
    }
    grid.sync();
    if (threadIdx.x == 0)
        sums[b] = sum;
}

// partial, out (gridDim.x,): BUG, block b publishes partial[b] after its arrive; its neighbour
// reads it after its own wait, which need not come after the write.
extern "C" __global__ void publish_after_arrive(float* partial, float* out)
{
    cg::grid_group grid = cg::this_grid();
    token_t token = grid.barrier_arrive();
    if (threadIdx.x == 0)
        partial[blockIdx.x] = 1.0f + blockIdx.x;
    grid.barrier_wait(static_cast<token_t&&>(token));
    if (threadIdx.x == 0)
        out[blockIdx.x] = partial[(blockIdx.x + 1) % gridDim.x];
}

// partial, out (gridDim.x,): BUG, block b reads its neighbour's partial before its wait, when the
// neighbour need not have arrived.
extern "C" __global__ void read_before_wait(float* partial, float* out)
{
    cg::grid_group grid = cg::this_grid();
    if (threadIdx.x == 0)
        partial[blockIdx.x] = 1.0f + blockIdx.x;
    token_t token = grid.barrier_arrive();
    if (threadIdx.x == 0)
        out[blockIdx.x] = partial[(blockIdx.x + 1) % gridDim.x];
    grid.barrier_wait(static_cast<token_t&&>(token));
}

// out (gridDim.x,): misuses of the pair, one per value of `misuse`:
// 0 two arrives without a wait, 1 a wait without an arrive, 2 a thread that exits with its arrive
// pending, 3 a grid sync between arrive and wait.
extern "C" __global__ void split_barrier_misuse(float* out, int misuse)
{
    cg::grid_group grid = cg::this_grid();
    if (misuse == 0) {
        token_t first = grid.barrier_arrive();
        token_t second = grid.barrier_arrive();   // second arrive
        grid.barrier_wait(static_cast<token_t&&>(second));
        (void)first;
    } else if (misuse == 1) {
        grid.barrier_wait(token_t{});   // wait without arrive
    } else if (misuse == 2) {
        token_t token = grid.barrier_arrive();   // never waited for
        (void)token;
    } else {
        token_t token = grid.barrier_arrive();   // arrive before sync
        grid.sync();   // sync while pending
        grid.barrier_wait(static_cast<token_t&&>(token));
    }
    out[blockIdx.x] = 1.0f;
}

// out (gridDim.x,): the odd blocks never reach the split barrier that the even blocks wait at.
extern "C" __global__ void odd_blocks_skip_the_split_barrier(float* out)
{
    if (blockIdx.x % 2 == 0) {
        token_t token = cg::this_grid().barrier_arrive();   // even arrive
        cg::this_grid().barrier_wait(static_cast<token_t&&>(token));   // even wait
    }
    out[blockIdx.x] = 1.0f;
}

// out (gridDim.x,): the even blocks wait at a grid sync, the odd ones at a split barrier (its
// token a temporary).
extern "C" __global__ void sync_and_split_barrier_mixed(float* out)
{
    if (blockIdx.x % 2 == 0)
        cg::this_grid().sync();   // even sync
    else
        cg::this_grid().barrier_wait(cg::this_grid().barrier_arrive());   // odd split
    out[blockIdx.x] = 1.0f;
}

// out (gridDim.x,): half of each block waits at __syncthreads, the other half at the split barrier.
extern "C" __global__ void block_barrier_and_split_barrier_mixed(float* out)
{
    if (threadIdx.x < 16) {
        __syncthreads();   // low half
    } else {
        token_t token = cg::this_grid().barrier_arrive();   // high half
        cg::this_grid().barrier_wait(static_cast<token_t&&>(token));
    }
    out[blockIdx.x] = 1.0f;
}
