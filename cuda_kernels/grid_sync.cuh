// The grid-wide barrier of the cooperative kernels (mlp_persistent.cu, mlp_spread.cu).
#pragma once

// A barrier of the whole grid. The kernel is launched cooperatively (cudaLaunchCooperativeKernel),
// so every block is resident and waiting cannot deadlock. On a GPU it is the scheme of
// cooperative_groups' grid sync, written out so that no toolkit header is needed (bare NVRTC has
// no <cooperative_groups.h>): thread 0 of each block fences its block's writes and adds to a
// device counter; block 0 adds 0x80000000 - (blocks - 1) and every other block 1, so the top bit
// flips exactly when the last block arrives, and the counter needs no reset between barriers or
// launches. The emulator runs the same kernel with its own grid barrier, which checks that every
// thread of the grid reaches it (deadlocks are reported, and block orders vary between barriers).
//
// The two halves of a split grid barrier (the scheme of CUDA 12's grid_group::barrier_arrive and
// barrier_wait): grid_arrive publishes the block's writes and counts it in, grid_wait returns once
// every block has arrived. Between them a block may work on its own data only (what no other block
// reads or writes before the wait returns): that work overlaps the barrier's latency. Every thread
// calls both; the token is thread 0's counter value before its add (the others' is unused). The
// emulator puts its one grid barrier of the pair at the arrive or at the wait (Module.split_barrier),
// so that work published after the arrive, or another block's data read before the wait, shows.
struct GridArrival {
#ifdef GPUMLP_EMULATOR
    cooperative_groups::grid_group::arrival_token token;
#else
    unsigned int before;
#endif
};

__device__ __forceinline__ GridArrival grid_arrive(unsigned int* barrier)
{
    __syncthreads();
#ifdef GPUMLP_EMULATOR
    (void)barrier;
    return GridArrival{cooperative_groups::this_grid().barrier_arrive()};
#else
    unsigned int before = 0;
    if (threadIdx.x == 0) {
        const unsigned int add = blockIdx.x == 0 ? 0x80000000u - (gridDim.x - 1) : 1u;
        __threadfence();
        before = atomicAdd(barrier, add);
    }
    return GridArrival{before};
#endif
}

__device__ __forceinline__ void grid_wait(unsigned int* barrier, GridArrival& arrival)
{
#ifdef GPUMLP_EMULATOR
    (void)barrier;
    using Token = cooperative_groups::grid_group::arrival_token;
    cooperative_groups::this_grid().barrier_wait(static_cast<Token&&>(arrival.token));
#else
    if (threadIdx.x == 0) {
        while (((arrival.before ^ *(volatile unsigned int*)barrier) & 0x80000000u) == 0) {
        }
        __threadfence();
    }
#endif
    __syncthreads();
}

__device__ __forceinline__ void grid_sync(unsigned int* barrier)
{
#ifdef GPUMLP_EMULATOR
    (void)barrier;
    cooperative_groups::this_grid().sync();
#else
    GridArrival arrival = grid_arrive(barrier);
    grid_wait(barrier, arrival);
#endif
}
