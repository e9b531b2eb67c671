"""WordPiece tokenizer whose vocabulary is computed from the training text."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import keras_hub
import tensorflow as tf

RESERVED_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
VOCABULARY_FILE = "vocabulary.txt"
WORD = re.compile(r"[a-z0-9]+")


def build_vocabulary(
    texts: Iterable[str], vocabulary_size: int = 1000, extra_words: Iterable[str] = ()
) -> list[str]:
    """Computes a lowercase WordPiece vocabulary from `texts` plus `extra_words`.

    `[PAD]` is id 0, which the models treat as padding.
    """
    corpus = [t for t in texts if t] + [w for w in extra_words if w]
    if not corpus:
        raise ValueError("Cannot build a vocabulary from no text.")
    vocabulary = keras_hub.tokenizers.compute_word_piece_vocabulary(
        tf.data.Dataset.from_tensor_slices(corpus).batch(1024),
        vocabulary_size=vocabulary_size,
        lowercase=True,
        reserved_tokens=list(RESERVED_TOKENS),
    )
    return list(vocabulary)


def missing_words(texts: Iterable[str], vocabulary: Iterable[str]) -> list[str]:
    """The lowercase words of `texts` that `vocabulary` lacks as whole tokens, in order of first use."""
    known = set(vocabulary)
    words = (w for text in texts for w in WORD.findall(text.lower()))
    return list(dict.fromkeys(w for w in words if w not in known))


def make_tokenizer(vocabulary: list[str], sequence_length: int) -> keras_hub.tokenizers.WordPieceTokenizer:
    """A tokenizer producing `sequence_length` int32 ids per string, padded with 0."""
    if not vocabulary or vocabulary[0] != "[PAD]":
        raise ValueError("The vocabulary must start with '[PAD]' (id 0 is padding).")
    return keras_hub.tokenizers.WordPieceTokenizer(
        vocabulary=vocabulary, sequence_length=sequence_length, lowercase=True, oov_token="[UNK]"
    )


def save_vocabulary(vocabulary: list[str], directory: str | Path) -> Path:
    """Writes one token per line to `directory/vocabulary.txt`."""
    path = Path(directory) / VOCABULARY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(vocabulary) + "\n", encoding="utf-8")
    return path


def load_vocabulary(directory: str | Path) -> list[str]:
    """Reads `directory/vocabulary.txt` (or a vocabulary file path)."""
    path = Path(directory)
    if path.is_dir():
        path = path / VOCABULARY_FILE
    if not path.exists():
        raise FileNotFoundError(f"No vocabulary file at {path}")
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line]
