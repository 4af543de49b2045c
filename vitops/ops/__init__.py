"""vitops ops. Each is a torch custom op (torch.ops.vitops.*) behind a documented Python function."""
from vitops.ops.drop_path import drop_path, drop_path_add

__all__ = ["drop_path", "drop_path_add"]
