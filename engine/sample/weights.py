"""kohya's attention weights in sample prompts (its long-prompt pipeline, A1111's syntax).

``(words)`` multiplies the weight of its words by 1.1, ``[words]`` divides it by 1.1,
``(words:1.3)`` multiplies it by 1.3; brackets nest and multiply. ``\\(``, ``\\)``, ``\\[``,
``\\]`` and ``\\\\`` are the literal characters. A bracket left open weighs everything after it;
a closing bracket with no opening one is plain text. :func:`parse_weights` gives the prompt as
``(text, weight)`` pieces, neighbours of equal weight joined.

Each piece is tokenized on its own and its tokens carry its weight; the prompt's hidden states
are multiplied by their token's weight and then rescaled so that their mean is what it was
(:func:`apply_weights`), as kohya's pipeline does before sampling.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

UP = 1.1                    # (words)
DOWN = 1 / 1.1              # [words]
_ESCAPES = "()[]\\"
_WEIGHT = re.compile(r":([+-]?[.\d]+)\)")


def parse_weights(text: str) -> list[tuple[str, float]]:
    """The prompt as (text, weight) pieces; a prompt with no brackets is one piece of weight 1."""
    pieces: list[list] = []          # [text, weight], in order
    open_round: list[int] = []       # where each still-open "(" starts, as an index into pieces
    open_square: list[int] = []
    plain: list[str] = []

    def flush() -> None:
        if plain:
            pieces.append(["".join(plain), 1.0])
            plain.clear()

    def scale(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\":
            if i + 1 < len(text) and text[i + 1] in _ESCAPES:
                plain.append(text[i + 1])
                i += 2
            else:
                i += 1                               # a lone backslash is dropped
            continue
        weight = _WEIGHT.match(text, i) if c == ":" else None
        if c in "([" or (weight and open_round) or (c == ")" and open_round) or (c == "]" and open_square):
            flush()
            if c == "(":
                open_round.append(len(pieces))
            elif c == "[":
                open_square.append(len(pieces))
            elif weight:
                try:
                    factor = float(weight.group(1))
                except ValueError:
                    raise ValueError(f"prompt weight ':{weight.group(1)})' is not a number") from None
                scale(open_round.pop(), factor)
                i = weight.end()
                continue
            elif c == ")":
                scale(open_round.pop(), UP)
            else:
                scale(open_square.pop(), DOWN)
            i += 1
            continue
        plain.append(c)
        i += 1
    flush()
    for start in open_round:
        scale(start, UP)
    for start in open_square:
        scale(start, DOWN)
    merged: list[tuple[str, float]] = []
    for piece_text, weight in pieces:
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + piece_text, weight)
        else:
            merged.append((piece_text, weight))
    return merged or [("", 1.0)]


def weighted_tokens(tokenizer, text: str, limit: int) -> tuple[list[int], list[float]]:
    """The prompt's tokens (no BOS/EOS), each piece tokenized on its own, with their weights; at most
    ``limit`` tokens."""
    tokens: list[int] = []
    weights: list[float] = []
    for piece, weight in parse_weights(text):
        ids = tokenizer(piece).input_ids[1:-1]
        tokens += ids
        weights += [weight] * len(ids)
        if len(tokens) > limit:
            break
    return tokens[:limit], weights[:limit]


def chunk_weights(weights: list[float], chunks: int, inner: int) -> list[float]:
    """One weight per hidden state of ``chunks`` whole chunks (BOS, ``inner`` tokens, EOS): 1 for BOS,
    EOS and padding."""
    out: list[float] = []
    for i in range(chunks):
        part = weights[i * inner:(i + 1) * inner]
        out += [1.0] + part + [1.0] * (inner - len(part)) + [1.0]
    return out


def apply_weights(hidden: "torch.Tensor", weights: list[float]) -> "torch.Tensor":
    """Hidden states (1, n, D) times each state's weight, rescaled to their mean before weighting;
    unchanged when every weight is 1."""
    import torch

    if all(w == 1.0 for w in weights):
        return hidden
    before = hidden.float().mean(dim=(-2, -1)).to(hidden.dtype)
    scaled = hidden * torch.tensor(weights, dtype=hidden.dtype, device=hidden.device)[None, :, None]
    after = scaled.float().mean(dim=(-2, -1)).to(hidden.dtype)
    return scaled * (before / after)[:, None, None]
