import pytest
from torch import nn

from asvit_kernels.models import count_params
from asvit_kernels.nn import ElasticLinear


def test_count_params():
    shared = nn.Linear(4, 3)
    model = nn.Sequential(shared, nn.ReLU(), shared, ElasticLinear(3, 5, bias=False))
    assert count_params(model) == 4 * 3 + 3 + 3 * 5
    model[3].weight.requires_grad_(False)
    assert count_params(model, trainable_only=True) == 4 * 3 + 3
    with pytest.raises(TypeError, match="model"):
        count_params("resnet")
