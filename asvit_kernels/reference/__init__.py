"""Plain-PyTorch ground truth for every op: float64-capable, any device, what tests compare to."""
from .attention import attention, varlen_attention
from .elastic import elastic_layer_norm, elastic_linear
from .ntk import length_distortion_loop, ntk_loop, per_sample_grad_gram

__all__ = ["elastic_linear", "elastic_layer_norm", "varlen_attention", "attention", "ntk_loop",
           "length_distortion_loop", "per_sample_grad_gram"]
