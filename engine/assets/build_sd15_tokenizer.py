"""Derive the SD1.5 (OpenAI CLIP ViT-L/14) tokenizer files from CLIP's BPE merges list.

The merges list ships as ``open_clip/bpe_simple_vocab_16e6.txt.gz`` in PyPI's
``open_clip_torch`` wheel (MIT). Get it offline-friendly with::

    pip download --no-deps open_clip_torch -d /tmp/oc
    python engine/assets/build_sd15_tokenizer.py /tmp/oc/open_clip_torch-*.whl

The vocabulary is built exactly as CLIP builds it: the 256 byte-unicode symbols, the
same with ``</w>``, one token per merge (the first 49152 - 256 - 2 merges), then
``<|startoftext|>`` and ``<|endoftext|>`` -- 49408 tokens. Writes ``vocab.json`` and
``merges.txt`` next to the committed tokenizer configs in ``sd15/tokenizer/``.
"""

from __future__ import annotations

import gzip
import json
import sys
import zipfile
from pathlib import Path

GZ_NAME = "open_clip/bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2
VOCAB_SIZE = 49408
from engine.tiny import bytes_to_unicode  # noqa: E402  (CLIP's byte map, shared with the tiny tokenizer)

OUT_DIR = Path(__file__).resolve().parent / "sd15" / "tokenizer"


def read_merges_text(source: Path) -> str:
    """The merges list text from the ``.txt.gz`` itself or from the wheel holding it."""
    if source.suffix == ".whl":
        with zipfile.ZipFile(source) as whl:
            return gzip.decompress(whl.read(GZ_NAME)).decode("utf-8")
    return gzip.decompress(source.read_bytes()).decode("utf-8")


def derive(text: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) from the merges list text, as CLIP's SimpleTokenizer derives them."""
    lines = text.split("\n")[1 : NUM_MERGES + 1]  # line 0 is the "#version" header
    merges = [tuple(line.split()) for line in lines]
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError("unexpected merges list: not CLIP's bpe_simple_vocab_16e6")
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    tokens += ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"derived {len(vocab)} tokens, expected {VOCAB_SIZE}")
    return vocab, merges  # type: ignore[return-value]


def write(vocab: dict[str, int], merges: list[tuple[str, str]], out_dir: Path = OUT_DIR) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out_dir / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: build_sd15_tokenizer.py <open_clip_torch-*.whl | bpe_simple_vocab_16e6.txt.gz>")
        return 2
    vocab, merges = derive(read_merges_text(Path(argv[0])))
    write(vocab, merges)
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {OUT_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
