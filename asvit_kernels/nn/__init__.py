"""Drop-in modules built on the ops."""
from .attention import Attention, count_patched, patch_timm
from .elastic import ElasticLayerNorm, ElasticLinear

__all__ = ["Attention", "patch_timm", "count_patched", "ElasticLinear", "ElasticLayerNorm"]
