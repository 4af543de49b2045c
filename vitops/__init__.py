"""vitops: fused ops, optimizers and timm-compatible layers for vision transformers and CNNs."""
from vitops import ops, layers  # noqa: F401  (importing ops registers every custom op)
from vitops import optim, utils  # noqa: F401  (importing optim registers the optimizer-step ops)
from vitops._backend import BACKENDS, use_backend
from vitops._info import backend_info
from vitops.patch import PatchReport, patch_model
from vitops.reparam import ReparamReport, reparameterize
from vitops import loss, models  # noqa: E402,F401
from vitops.models import create_model, list_models  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "PatchReport",
    "ReparamReport",
    "backend_info",
    "layers",
    "ops",
    "optim",
    "patch_model",
    "reparameterize",
    "use_backend",
    "utils",
    "__version__",
]
__all__ += ["create_model", "list_models", "loss", "models"]
