"""Blocks and Swin-style backbones; importing registers every preset x size with timm."""
from ablate.models.backbone import SIZES, AblateNet, ModelSize
from ablate.models.blocks import BLOCKS
from ablate.models.zoo import create, model_names

__all__ = ["AblateNet", "ModelSize", "SIZES", "BLOCKS", "create", "model_names"]
