"""Drop-in modules built on the ops."""
from .attention import Attention, patch_timm
from .elastic import ElasticLayerNorm, ElasticLinear

__all__ = ["Attention", "patch_timm", "ElasticLinear", "ElasticLayerNorm"]
