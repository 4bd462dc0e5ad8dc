"""Captions and prompts → CLIP hidden states, as kohya sd-scripts encodes them.

Training and validation (kohya's ``SdTokenizeStrategy`` / ``SdTextEncodingStrategy``,
``--max_token_length``):

* The caption is tokenized to ``max_token_length + 2`` tokens (BOS, up to 75/150/225 tokens,
  EOS, then padding; without the flag: the tokenizer's 77), truncated and padded.
* Longer than 77: it is cut into 75-token chunks, each wrapped as ``BOS chunk EOS`` with the
  first and last token of the whole sequence. For SD1.x (pad = EOS) nothing else changes;
  for a tokenizer whose pad differs from EOS a chunk ending in a word gets EOS as its last
  token and an empty chunk ``BOS PAD ...`` becomes ``BOS EOS PAD ...`` (kohya's SD2 rule).
* Every chunk goes through the text encoder on its own; ``clip_skip`` > 1 takes the
  ``clip_skip``-th last hidden state through the final layer norm, per chunk.
* The chunks are joined back: the first chunk's BOS, the 75 inner states of every chunk, the
  last chunk's EOS -- ``75 * n + 2`` states (152 for 150, 227 for 225). 75 and no flag give
  the 77 states of one plain encoder call, unchanged.
* ``--weighted_captions`` (kohya's ``tokenize_with_weights`` / ``encode_tokens_with_weights``): the
  caption's ``(word:1.2)`` / ``[word]`` weights are read by :mod:`engine.sample.weights`, each weighted
  piece is tokenized on its own, and each token's hidden state is multiplied by its weight after the
  encoder (BOS, EOS and padding keep 1). Unlike the sample pipeline, training does not rescale the
  states to their former mean -- kohya does not either.

Sample images (kohya's long-prompt pipeline, which ignores ``--max_token_length``): a prompt
may have up to 225 tokens; it and the negative prompt are padded to the same number of
75-token chunks (as many as the longer one needs, at most 3), each chunk is encoded as
above, and the chunks are joined whole, BOS and EOS of each kept (``77 * n`` states).
kohya's attention weights in prompts (``(word:1.2)``, ``[word]``) are read by
:mod:`engine.sample.weights`: each weighted piece is tokenized on its own and its hidden states
are weighted, then rescaled to their former mean.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

MAX_TOKEN_LENGTHS = (75, 150, 225)
SAMPLE_MAX_CHUNKS = 3      # kohya's long-prompt pipeline: max_embeddings_multiples = 3


def caption_token_ids(tokenizer, text: str, max_token_length: int | None) -> "torch.Tensor":
    """kohya's ``_get_input_ids``: the caption's token ids as (chunks, 77)."""
    import torch

    model_max = tokenizer.model_max_length
    length = model_max if max_token_length is None else max_token_length + 2
    ids = tokenizer(text, padding="max_length", truncation=True, max_length=length, return_tensors="pt").input_ids[0]
    if length <= model_max:
        return ids[None]
    return torch.stack([_wrap(tokenizer, ids[:1], ids[i:i + model_max - 2], ids[-1:])
                        for i in range(1, length - model_max + 2, model_max - 2)])


def weighted_caption_token_ids(tokenizer, text: str, max_token_length: int | None
                               ) -> tuple["torch.Tensor", "torch.Tensor"]:
    """kohya's ``_get_input_ids(weighted=True)``: the caption's ids and each id's weight, both (chunks, 77).

    The pieces' tokens are cut to ``max_token_length`` (75 without the flag), wrapped in BOS/EOS and padded;
    longer than 77 they are chunked as :func:`caption_token_ids` chunks them, each chunk's BOS and EOS
    weighing 1."""
    import torch

    from engine.sample.weights import weighted_tokens

    model_max = tokenizer.model_max_length
    length = model_max if max_token_length is None else max_token_length + 2
    tokens, weights = weighted_tokens(tokenizer, text, length - 2)
    pad = length - 2 - len(tokens)
    ids = torch.tensor([tokenizer.bos_token_id] + tokens + [tokenizer.eos_token_id] + [tokenizer.pad_token_id] * pad)
    flat = torch.tensor([1.0] + weights + [1.0] * (pad + 1))
    if length <= model_max:
        return ids[None], flat[None]
    starts = range(1, length - model_max + 2, model_max - 2)
    chunked = torch.stack([_wrap(tokenizer, ids[:1], ids[i:i + model_max - 2], ids[-1:]) for i in starts])
    chunk_weights = torch.ones(chunked.shape)
    for n, i in enumerate(starts):
        chunk_weights[n, 1:model_max - 1] = flat[i:i + model_max - 2]
    return chunked, chunk_weights


def weigh_captions(hidden: "torch.Tensor", weights: "torch.Tensor") -> "torch.Tensor":
    """kohya's ``encode_tokens_with_weights``: joined caption states (B, 77 or 75 * n + 2, D) times their
    tokens' weights (B, n, 77); BOS, EOS and padding states keep theirs (1)."""
    import torch

    if weights.shape[1] == 1:
        return hidden * weights[:, 0, :, None].to(hidden.dtype)
    per_state = torch.cat([torch.ones_like(weights[:, 0, :1])] +
                          [weights[:, i, 1:-1] for i in range(weights.shape[1])] +
                          [torch.ones_like(weights[:, 0, :1])], dim=1)
    return hidden * per_state[:, :, None].to(hidden.dtype)


def _wrap(tokenizer, bos: "torch.Tensor", inner: "torch.Tensor", last: "torch.Tensor") -> "torch.Tensor":
    import torch

    chunk = torch.cat([bos, inner, last])
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if pad != eos:                    # kohya's rule for SD2-style tokenizers (PAD differs from EOS)
        if chunk[-2] != eos and chunk[-2] != pad:
            chunk[-1] = eos
        if chunk[1] == pad:
            chunk[1] = eos
    return chunk


def encode_chunks(text_encoder, input_ids: "torch.Tensor", clip_skip: int | None) -> "torch.Tensor":
    """(B, n, 77) ids → (B, n * 77, D) hidden states, every chunk encoded on its own with ``clip_skip``."""
    b, n, length = input_ids.shape
    flat = input_ids.reshape(b * n, length)
    if clip_skip is not None and clip_skip > 1:
        out = text_encoder(flat, output_hidden_states=True)
        text_model = getattr(text_encoder, "text_model", text_encoder)
        hidden = text_model.final_layer_norm(out.hidden_states[-clip_skip])
    else:
        hidden = text_encoder(flat).last_hidden_state
    return hidden.reshape(b, n * length, hidden.shape[-1])


def join_chunks(hidden: "torch.Tensor", chunk_length: int) -> "torch.Tensor":
    """kohya: the first BOS, each chunk's inner states, the last EOS (one chunk: unchanged)."""
    import torch

    if hidden.shape[1] == chunk_length:
        return hidden
    parts = [hidden[:, :1]]
    parts += [hidden[:, i:i + chunk_length - 2] for i in range(1, hidden.shape[1], chunk_length)]
    parts.append(hidden[:, -1:])
    return torch.cat(parts, dim=1)


def encode_captions(text_encoder, input_ids: "torch.Tensor", clip_skip: int | None) -> "torch.Tensor":
    """Training's text conditioning for (B, n, 77) ids: (B, 77, D), or (B, 75 * n + 2, D) for n > 1."""
    return join_chunks(encode_chunks(text_encoder, input_ids, clip_skip), input_ids.shape[-1])


def _sample_ids(tokenizer, prompts: list[str]) -> tuple["torch.Tensor", list[list[float]]]:
    """kohya's long-prompt pipeline: (len(prompts), n, 77) ids, n chunks for the longest prompt (at most
    3), and each prompt's weight per hidden state (77 * n)."""
    import torch

    from engine.sample.weights import chunk_weights, weighted_tokens

    inner = tokenizer.model_max_length - 2
    parsed = [weighted_tokens(tokenizer, p, inner * SAMPLE_MAX_CHUNKS) for p in prompts]
    longest = max(len(tokens) for tokens, _ in parsed)
    chunks = max(1, min(SAMPLE_MAX_CHUNKS, (longest - 1) // inner + 1))
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    out = []
    for tokens, _ in parsed:
        full = torch.tensor([bos] + tokens + [eos] * (chunks * inner + 1 - len(tokens)), dtype=torch.long)
        out.append(torch.stack([_wrap(tokenizer, full[:1], full[1 + i * inner:1 + (i + 1) * inner], full[-1:])
                                for i in range(chunks)]))
    return torch.stack(out), [chunk_weights(weights, chunks, inner) for _, weights in parsed]


def sample_token_ids(tokenizer, prompts: list[str]) -> "torch.Tensor":
    """kohya's long-prompt pipeline: (len(prompts), n, 77) ids, n chunks for the longest prompt (at most 3)."""
    return _sample_ids(tokenizer, prompts)[0]


def encode_sample_prompts(text_encoder, tokenizer, prompts: list[str], device, clip_skip: int | None
                          ) -> list["torch.Tensor"]:
    """Hidden states of sample prompts (a prompt and its negative share one length), one (1, 77 * n, D) per
    prompt, each prompt encoded in its own call and then weighted, as kohya's pipeline does."""
    from engine.sample.weights import apply_weights

    ids, weights = _sample_ids(tokenizer, prompts)
    ids = ids.to(device)
    return [apply_weights(encode_chunks(text_encoder, ids[i:i + 1], clip_skip), weights[i])
            for i in range(len(prompts))]
