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
__device__ __forceinline__ void grid_sync(unsigned int* barrier)
{
#ifdef GPUMLP_EMULATOR
    (void)barrier;
    cooperative_groups::this_grid().sync();
#else
    __syncthreads();
    if (threadIdx.x == 0) {
        const unsigned int add = blockIdx.x == 0 ? 0x80000000u - (gridDim.x - 1) : 1u;
        __threadfence();
        const unsigned int before = atomicAdd(barrier, add);
        while (((before ^ *(volatile unsigned int*)barrier) & 0x80000000u) == 0) {
        }
        __threadfence();
    }
    __syncthreads();
#endif
}
