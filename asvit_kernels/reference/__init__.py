"""Plain-PyTorch ground truth for every op: float64-capable, any device, what tests compare to."""
from .attention import attention, varlen_attention
from .elastic import elastic_layer_norm, elastic_linear

__all__ = ["elastic_linear", "elastic_layer_norm", "varlen_attention", "attention"]
