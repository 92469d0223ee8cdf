"""ablate: ablation studies of the spatial-mixing operators of vision backbones.

After `import ablate`, every preset x size is a timm model: `timm.create_model("ablate_dwconv_tiny")`.
"""
from ablate import ops  # noqa: F401  (registers the built-in operator options)
from ablate.models import AblateNet, create, model_names
from ablate.space import InvalidOperatorError, OperatorSpec, validate
from ablate.space.presets import PRESETS, preset

__all__ = ["AblateNet", "create", "model_names", "InvalidOperatorError", "OperatorSpec", "validate",
           "PRESETS", "preset"]
__version__ = "0.1.0"
