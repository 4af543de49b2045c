"""vitops ops. Each is a torch custom op (torch.ops.vitops.*, schemas in vitops/ops/schemas.def) behind a
documented Python function; vitops/ops/_define.py registers them, vitops/ops/reference.py defines them."""
from vitops.ops._attention import MAX_HEAD_DIM, attention, attention_packed
from vitops.ops._drop_path import drop_path, drop_path_add
from vitops.ops._fuse_conv_bn import fuse_conv_bn

__all__ = ["MAX_HEAD_DIM", "attention", "attention_packed", "drop_path", "drop_path_add", "fuse_conv_bn"]
