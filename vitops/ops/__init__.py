"""vitops ops. Each is a torch custom op (torch.ops.vitops.*) behind a documented Python function."""
from vitops.ops.drop_path import drop_path, drop_path_add
from vitops.ops.fuse_conv_bn import fuse_conv_bn

__all__ = ["drop_path", "drop_path_add", "fuse_conv_bn"]
