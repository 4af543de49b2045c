"""The drop_path_add Triton kernels compile for an H100 ahead of time (see tests/triton_aot.py)."""
from tests.triton_aot import assert_compiles_for_sm90


def test_drop_path_add_triton_kernels_compile_for_sm90():
    assert_compiles_for_sm90(
        """
    from vitops.ops.triton import drop_path_add as k

    def compile(fn, signature, constants, **options):
        signature = {**signature, **{name: "constexpr" for name in constants}}
        source = ASTSource(fn=fn, signature=signature, constexprs=constants)
        return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]

    blocks = dict(BLOCK_R=16, BLOCK_C=256, BLOCK_I=1, ACC=tl.float32)
    for dtype in ("fp32", "bf16"):
        ptx = compile(
            k._forward_kernel,
            dict(residual_ptr=f"*{dtype}", branch_ptr=f"*{dtype}", gamma_ptr="*fp32", scale_ptr="*fp32",
                 out_ptr=f"*{dtype}", rows="i32", channels="i32", inner="i32", rows_per_sample="i32"),
            dict(HAS_RESIDUAL=True, HAS_GAMMA=True, HAS_SCALE=True, **blocks),
            enable_fp_fusion=False,
        )
        assert "fma.rn.f32" not in ptx, "the forward must not contract into FMAs"
        compile(
            k._backward_kernel,
            dict(grad_out_ptr=f"*{dtype}", branch_ptr=f"*{dtype}", gamma_ptr="*fp32", scale_ptr="*fp32",
                 grad_branch_ptr=f"*{dtype}", partials_ptr="*fp32", rows="i32", channels="i32", inner="i32",
                 rows_per_sample="i32"),
            dict(HAS_GAMMA=True, HAS_SCALE=True, NEED_BRANCH_GRAD=True, NEED_GAMMA_GRAD=True, **blocks),
        )
        """
    )
