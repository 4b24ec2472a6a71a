"""Drop-in modules built on the ops."""
from .elastic import ElasticLayerNorm, ElasticLinear

__all__ = ["ElasticLinear", "ElasticLayerNorm"]
