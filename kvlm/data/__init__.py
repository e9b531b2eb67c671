"""Datasets, tokenizer and the tf.data input pipeline."""

from kvlm.data import catalogue, shapes
from kvlm.data.example import Example
from kvlm.data.folder import AnnotationError, load_folder
from kvlm.data.pipeline import (
    answer_vocabulary,
    caption_ids,
    encode_answers,
    make_caption_dataset,
    make_context_dataset,
    make_dataset,
    make_pair_dataset,
    pack_captions,
)
from kvlm.data.preprocessing import decode_image, make_augmenter, resize_image
from kvlm.data.tokenizer import build_vocabulary, load_vocabulary, make_tokenizer, missing_words, save_vocabulary
from kvlm.data.writer import png_bytes, write_folder

__all__ = [
    "AnnotationError",
    "Example",
    "answer_vocabulary",
    "build_vocabulary",
    "catalogue",
    "caption_ids",
    "decode_image",
    "encode_answers",
    "load_folder",
    "load_vocabulary",
    "make_augmenter",
    "make_caption_dataset",
    "make_context_dataset",
    "make_dataset",
    "make_pair_dataset",
    "make_tokenizer",
    "missing_words",
    "pack_captions",
    "png_bytes",
    "resize_image",
    "save_vocabulary",
    "shapes",
    "write_folder",
]
