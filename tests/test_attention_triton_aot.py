"""The attention Triton kernels compile for an H100 ahead of time, without a GPU (the interpreter accepts code the
compiler rejects): forward and both backward kernels, for float16, bfloat16 and float32, at the block sizes the
launchers pick for ViT shapes."""
from tests.triton_aot import assert_compiles_for_sm90


def test_attention_triton_kernels_compile_for_sm90():
    assert_compiles_for_sm90(
        """
    from vitops.ops.triton import attention as k

    def strides(*names):
        return {f"s{n}{x}": "i64" for n in names for x in "bhn"}

    for dtype, block_m, block_n, block_d in (
        ("fp16", 128, 64, 64), ("bf16", 128, 64, 64), ("bf16", 16, 16, 128), ("fp32", 64, 64, 32)
    ):
        blocks = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, IEEE=dtype == "fp32")
        t = f"*{dtype}"
        compile(
            k._fwd_kernel,
            dict(Q=t, K=t, V=t, O=t, LSE="*fp32", **strides("q", "k", "v", "o"),
                 H="i32", NQ="i32", NK="i32", D="i32", qk_scale_log2="fp32"),
            blocks, num_warps=8 if block_d >= 128 else 4,
        )
        compile(
            k._bwd_dq_kernel,
            dict(Q=t, K=t, V=t, O=t, DO=t, LSE="*fp32", DELTA="*fp32", DQ=t,
                 **strides("q", "k", "v", "o", "do", "dq"),
                 H="i32", NQ="i32", NK="i32", D="i32", scale="fp32", qk_scale_log2="fp32"),
            blocks, num_warps=8 if block_d >= 128 else 4,
        )
        compile(
            k._bwd_dkdv_kernel,
            dict(Q=t, K=t, V=t, DO=t, LSE="*fp32", DELTA="*fp32", DK=t, DV=t,
                 **strides("q", "k", "v", "do", "dk", "dv"),
                 H="i32", NQ="i32", NK="i32", D="i32", scale="fp32", qk_scale_log2="fp32"),
            blocks, num_warps=8 if block_d >= 128 else 4,
        )
        """
    )
