"""The small GPT-style transformer the demo trains.

Plain PyTorch with one deliberate choice: attention is written out (matmul, mask, softmax,
matmul) rather than calling ``scaled_dot_product_attention``, whose fused CUDA backward
kernels may accumulate in a nondeterministic order. The demo compares two optimizers by
training the same model twice; any nondeterminism in the model would show up as a
parameter difference that the optimizers did not cause.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .sizes import ModelSize

INIT_STD = 0.02  # GPT-2's initialisation scale


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        future = torch.ones(length, length, dtype=torch.bool, device=x.device).triu(1)
        weights = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
        return self.out((weights @ v).transpose(1, 2).reshape(batch, length, width))


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attention_norm = nn.LayerNorm(width)
        self.attention = CausalSelfAttention(width, heads)
        self.mlp_norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class TinyGPT(nn.Module):
    """Token and position embeddings, pre-norm transformer blocks, a linear head."""

    def __init__(self, size: ModelSize):
        super().__init__()
        self.token_embedding = nn.Embedding(size.vocab, size.width)
        self.position_embedding = nn.Embedding(size.seq_len, size.width)
        self.blocks = nn.ModuleList(Block(size.width, size.heads) for _ in range(size.layers))
        self.final_norm = nn.LayerNorm(size.width)
        self.head = nn.Linear(size.width, size.vocab)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=INIT_STD)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.token_embedding(tokens) + self.position_embedding(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.final_norm(x))


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy, computed in float32 at least (float64 stays float64)."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def parameter_count(size: ModelSize) -> int:
    """The model's parameter count, without allocating it."""
    with torch.device("meta"):
        return sum(p.numel() for p in TinyGPT(size).parameters())
