"""Small models for the NTK tests, built from plain torch.nn."""
import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    """Pre-norm transformer block; with ``window`` set, attention runs inside windows partitioned
    after the qkv projection, so every linear layer still sees (B, ...)."""

    def __init__(self, d, heads, window=None):
        super().__init__()
        self.n1, self.qkv, self.proj = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.n2, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.heads, self.window = heads, window

    def forward(self, x):
        B, N, C = x.shape
        h, hd = self.heads, C // self.heads
        q, k, v = self.qkv(self.n1(x)).view(B, N, 3, h, hd).permute(2, 0, 3, 1, 4)
        if self.window:
            w = self.window
            q, k, v = (t.reshape(B, h, N // w, w, hd).transpose(1, 2).reshape(B * (N // w), h, w, hd)
                       for t in (q, k, v))
        a = torch.softmax(q @ k.transpose(-1, -2) * hd ** -0.5, -1) @ v
        if self.window:
            a = a.view(B, N // self.window, h, self.window, hd).transpose(1, 2).reshape(B, h, N, hd)
        x = x + self.proj(a.transpose(1, 2).reshape(B, N, C))
        return x + self.fc2(F.gelu(self.fc1(self.n2(x))))


class TinyViT(nn.Module):
    """Conv2d patch embedding, class token, position embedding, a windowed and a global block."""

    def __init__(self, d=16, heads=2, classes=10):
        super().__init__()
        self.patch = nn.Conv2d(3, d, 4, 4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, d) * 0.5)
        self.pos_embed = nn.Parameter(torch.randn(1, 17, d) * 0.5)
        self.blocks = nn.Sequential(Block(d, heads), Block(d, heads))
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, classes)
        self.window_block = Block(d, heads, window=4)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)                       # (B, 16, d)
        x = self.window_block(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


class WindowsFirst(nn.Module):
    """A linear layer fed (B * windows, ...): the fast path must step aside."""

    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):                                                   # (B, 8, 4)
        B = x.shape[0]
        y = self.fc(x.reshape(B * 2, 4, 4)).reshape(B, 8, 4)
        return self.out(y.mean(1))


class CustomLayer(nn.Module):
    """An unknown layer owning a weight it uses through F.linear."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 5))

    def forward(self, x):
        return F.linear(torch.tanh(x), self.w)


class Interacting(nn.Module):
    """Samples interact through a batch mean, with only supported layers."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc(x - x.mean(0, keepdim=True))


class Embedder(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6, padding_idx=0)
        self.fc = nn.Linear(6, 2)

    def forward(self, idx):
        return self.fc(torch.tanh(self.emb(idx))).sum(1)


class Tied(nn.Module):
    """Two Linear layers (and two LayerNorms) holding the same Parameters (tied weights)."""

    def __init__(self, d=6, classes=3):
        super().__init__()
        self.a, self.b = nn.Linear(d, d), nn.Linear(d, d)
        self.b.weight, self.b.bias = self.a.weight, self.a.bias
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.n2.weight = self.n1.weight
        self.out = nn.Linear(d, classes)

    def forward(self, x):                                                   # (B, T, d)
        h = torch.tanh(self.a(self.n1(x)))
        return self.out(torch.tanh(self.b(self.n2(h))).mean(1))


class CalledTwice(nn.Module):
    """One Linear called twice."""

    def __init__(self, d=6, classes=3):
        super().__init__()
        self.fc, self.out = nn.Linear(d, d), nn.Linear(d, classes)

    def forward(self, x):
        return self.out(torch.tanh(self.fc(torch.tanh(self.fc(x)))).mean(1))


class DirectUse(nn.Module):
    """A Linear's weight also used directly (F.linear), where no layer hook can see it."""

    def __init__(self, d=6, classes=3):
        super().__init__()
        self.fc, self.out = nn.Linear(d, d), nn.Linear(d, classes)

    def forward(self, x):
        h = torch.tanh(self.fc(x)) + F.linear(torch.sin(x), self.fc.weight)
        return self.out(h.mean(1))


class TiedEmbedding(nn.Module):
    """Language-model weight tying: the output Linear holds the Embedding's weight."""

    def __init__(self, vocab=11, d=6):
        super().__init__()
        self.emb, self.out = nn.Embedding(vocab, d), nn.Linear(d, vocab, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, idx):
        return self.out(torch.tanh(self.emb(idx))).sum(1)
