"""gpumlp: Ciresan et al. (2010) deep big simple MLP, with hand-written CUDA kernels."""
__version__ = "0.1.0"
