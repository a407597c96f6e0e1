"""Parameter lists the benchmarks step over."""

from __future__ import annotations


def gpt2_small(width: int = 768, vocab: int = 50257, context: int = 1024, layers: int = 12) -> list[tuple[int, ...]]:
    """GPT-2 small's 148 parameter tensors (124M parameters at width 768)."""
    shapes = [(vocab, width), (context, width)]
    for _ in range(layers):
        shapes += [
            (width,), (width,),  # ln_1
            (width, 3 * width), (3 * width,),  # attention qkv
            (width, width), (width,),  # attention projection
            (width,), (width,),  # ln_2
            (width, 4 * width), (4 * width,),  # mlp in
            (4 * width, width), (width,),  # mlp out
        ]
    return shapes + [(width,), (width,)]  # ln_f


def resnet50() -> list[tuple[int, ...]]:
    """ResNet-50's 161 parameter tensors (25.6M parameters)."""
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    in_channels = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for block in range(blocks):
            out_channels = width * 4
            shapes += [(width, in_channels, 1, 1), (width,), (width,)]
            shapes += [(width, width, 3, 3), (width,), (width,)]
            shapes += [(out_channels, width, 1, 1), (out_channels,), (out_channels,)]
            if block == 0:
                shapes += [(out_channels, in_channels, 1, 1), (out_channels,), (out_channels,)]
            in_channels = out_channels
    return shapes + [(1000, 2048), (1000,)]


def many_small(count: int, size: int) -> list[tuple[int, ...]]:
    return [(size,)] * count


def numel(shapes: list[tuple[int, ...]]) -> int:
    total = 0
    for shape in shapes:
        n = 1
        for s in shape:
            n *= s
        total += n
    return total
