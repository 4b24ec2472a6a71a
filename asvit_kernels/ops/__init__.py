"""The public ops: validation, backend dispatch, torch.library registration, autograd."""
from .elastic import elastic_layer_norm, elastic_linear

__all__ = ["elastic_linear", "elastic_layer_norm"]
