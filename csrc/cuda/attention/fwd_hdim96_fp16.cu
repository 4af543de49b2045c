// One instantiation per file (see launch.h).
#include "launch.cuh"

template cudaError_t vitops::cuda::attention::run_forward<96, vitops::cuda::warp::Fp16>(
    const vitops::cuda::attention::ForwardParams&, cudaStream_t);
