"""A synthetic language the demo generates itself, so that it needs no download.

Each token is drawn from a distribution that depends on the two tokens before it:
P(next = c | a, b) is proportional to exp(two_back[a, c] + one_back[b, c]), with fixed
random score tables. The previous token's part is strong and a model learns it within a
few dozen steps; the part of the token two back takes attention and longer, as real text
has easy and hard parts. The best loss any model can reach is known exactly, the average
surprise of the tokens actually drawn; the demo plots it as the floor of the loss curves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Spreads of the random scores: the larger, the more predictable the next token.
ONE_BACK_SCALE = 2.0
TWO_BACK_SCALE = 1.5


@dataclass(frozen=True)
class TokenBatches:
    """``tokens[step]`` is one training batch of shape (batch, seq_len + 1).

    ``loss_floor`` is the mean cross-entropy of a model that knew the transition table.
    """

    tokens: torch.Tensor
    loss_floor: float

    @property
    def steps(self) -> int:
        return self.tokens.shape[0]


def transition_table(vocab: int, generator: torch.Generator) -> torch.Tensor:
    """probabilities[a, b, c] = P(next = c | previous two = a, b)."""
    one_back = ONE_BACK_SCALE * torch.randn((vocab, vocab), generator=generator, dtype=torch.float64)
    two_back = TWO_BACK_SCALE * torch.randn((vocab, vocab), generator=generator, dtype=torch.float64)
    return (two_back[:, None, :] + one_back[None, :, :]).softmax(dim=-1)


def generate(vocab: int, steps: int, batch: int, seq_len: int, seed: int) -> TokenBatches:
    """``steps`` batches of ``batch`` sequences of ``seq_len + 1`` tokens, all from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    table = transition_table(vocab, generator)
    sequences = steps * batch
    tokens = torch.empty((sequences, seq_len + 1), dtype=torch.int64)
    # The first two tokens are uniform: predicting the second from the first costs log(vocab).
    tokens[:, :2] = torch.randint(vocab, (sequences, 2), generator=generator)
    cumulative = table.cumsum(dim=-1)
    uniforms = torch.rand((seq_len + 1, sequences, 1), generator=generator, dtype=torch.float64)
    surprise = torch.zeros(sequences, dtype=torch.float64)
    for position in range(2, seq_len + 1):
        context = (tokens[:, position - 2], tokens[:, position - 1])
        # Inverse-CDF sampling: the first token whose cumulative probability passes u.
        drawn = torch.searchsorted(cumulative[context], uniforms[position]).squeeze(1).clamp_(max=vocab - 1)
        tokens[:, position] = drawn
        surprise -= table[context + (drawn,)].log()
    predicted_positions = seq_len  # targets are tokens 1 .. seq_len
    floor = (surprise.sum() + sequences * math.log(vocab)) / (sequences * predicted_positions)
    return TokenBatches(tokens.view(steps, batch, seq_len + 1), float(floor))
