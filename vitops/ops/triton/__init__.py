"""Triton kernels, one file per op. Each file holds the @triton.jit kernels, their launchers, and the custom ops
`vitops::<op>_triton` that wrap the launchers."""
