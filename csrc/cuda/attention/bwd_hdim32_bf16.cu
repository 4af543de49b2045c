// One instantiation per file (see launch.h).
#include "launch.cuh"

template cudaError_t vitops::cuda::attention::run_backward<32, vitops::cuda::warp::Bf16>(
    const vitops::cuda::attention::BackwardParams&, cudaStream_t);
