import pytest
from torch import nn

from asvit_kernels.models import count_flops, count_params
from asvit_kernels.nn import Attention, ElasticLinear


def test_count_params():
    shared = nn.Linear(4, 3)
    model = nn.Sequential(shared, nn.ReLU(), shared, ElasticLinear(3, 5, bias=False))
    assert count_params(model) == 4 * 3 + 3 + 3 * 5
    model[3].weight.requires_grad_(False)
    assert count_params(model, trainable_only=True) == 4 * 3 + 3
    with pytest.raises(TypeError, match="model"):
        count_params("resnet")


def test_count_flops_by_hand():
    """Conv + linear + fused attention + elastic linear, counted by hand in multiply-adds."""
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 4, stride=4)          # 16x16 -> 4x4 = 16 tokens
            self.attn = Attention(8, 2, attn_dim=12)
            self.head = ElasticLinear(8, 10).set_range((2, 6), (7, 5))

        def forward(self, x):
            t = self.conv(x).flatten(2).transpose(1, 2)        # (B, 16, 8)
            return self.head(self.attn(t).mean(1)[:, :6])

    macs = 16 * 8 * 3 * 4 * 4 + 16 * 8 * 36 + 2 * 16 * 16 * 12 + 16 * 12 * 8 + 6 * 5
    model = Tiny().train()
    assert count_flops(model, (3, 16, 16)) == macs == count_flops(model, (16, 16))
    assert model.training
    with pytest.raises(TypeError, match="input_size"):
        count_flops(model, "224")
    with pytest.raises(ValueError, match="input_size"):
        count_flops(model, (3, 0, 16))
    assert count_flops(nn.Sequential(nn.Linear(4, 2)), (1, 1, 4)) == 8


def test_asvit_large_size_matches_the_paper():
    """As-ViT Large at 224, 1000 classes: about 88M parameters and 22.5 G multiply-adds."""
    from asvit_kernels.models.asvit import AsViT
    model = AsViT.from_genotype("8,2,3,5|4,1,2,2|4,1,4,5|4,1,6,2|32,180")
    assert 87e6 <= count_params(model) <= 89e6
    assert 22e9 <= count_flops(model, 224) <= 23e9
