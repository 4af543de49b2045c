"""vitops ops. Each is a torch custom op (torch.ops.vitops.*) behind a documented Python function."""
from vitops.ops.attention import attention, attention_packed
from vitops.ops.drop_path import drop_path, drop_path_add
from vitops.ops.fuse_conv_bn import fuse_conv_bn

__all__ = ["attention", "attention_packed", "drop_path", "drop_path_add", "fuse_conv_bn"]
