"""vitops: fused ops, optimizers and timm-compatible layers and models for vision transformers and CNNs."""
# Importing ops and optim registers every custom op.
from vitops import layers, loss, models, ops, optim, utils
from vitops._backend import BACKENDS, availability, use_backend
from vitops._info import backend_info
from vitops.models import create_model, list_models
from vitops.patch import PatchReport, patch_model
from vitops.reparam import ReparamReport, reparameterize

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "PatchReport",
    "ReparamReport",
    "availability",
    "backend_info",
    "create_model",
    "layers",
    "list_models",
    "loss",
    "models",
    "ops",
    "optim",
    "patch_model",
    "reparameterize",
    "use_backend",
    "utils",
    "__version__",
]
