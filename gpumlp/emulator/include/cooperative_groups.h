// Stands in for CUDA's <cooperative_groups.h> in the emulator: what the kernels use of it is in
// cuda_compat.h, which g++ includes before every kernel source.
#pragma once
