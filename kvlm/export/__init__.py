"""SavedModel export with in-graph preprocessing, in TF Serving's layout.

`export_model(run_dir, base_path="saved_models", name="kvlm")` writes
`saved_models/kvlm/<version>/` with a `serving_default` signature taking
`image_bytes` and `text` (both `string[batch]`) and returning `answer`, `score`,
`scores` and `labels` (see `kvlm.export.signatures`), plus warm-up requests in
`assets.extra/tf_serving_warmup_requests`. Each task chooses its writer
(`kvlm.tasks.base.Task.export`): a retrieval run's `DualEncoder` gets an `embed` signature
(also its `serving_default`) returning `image_embedding` and `text_embedding`, a captioning
run's `Captioner` a `caption` signature.

Submodules import TensorFlow and Keras lazily, so `kvlm.export.layout` stays light.
"""

from __future__ import annotations

from kvlm.lazy import lazy_getattr

_LAZY = {
    "export_model": "kvlm.export.savedmodel",
    "write_saved_model": "kvlm.export.savedmodel",
    "write_dual_encoder_saved_model": "kvlm.export.savedmodel",
    "write_captioner_saved_model": "kvlm.export.savedmodel",
    "make_serving_function": "kvlm.export.signatures",
    "make_embed_function": "kvlm.export.signatures",
    "make_caption_function": "kvlm.export.signatures",
    "write_warmup_requests": "kvlm.export.warmup",
    "validate_model_name": "kvlm.export.layout",
    "next_version": "kvlm.export.layout",
    "version_dirs": "kvlm.export.layout",
    "SIGNATURE_NAME": "kvlm.export.signatures",
    "INPUT_NAMES": "kvlm.export.signatures",
    "OUTPUT_NAMES": "kvlm.export.signatures",
    "EMBED_SIGNATURE_NAME": "kvlm.export.signatures",
    "EMBED_OUTPUT_NAMES": "kvlm.export.signatures",
    "CAPTION_SIGNATURE_NAME": "kvlm.export.signatures",
    "CAPTION_OUTPUT_NAMES": "kvlm.export.signatures",
}

__all__ = sorted(_LAZY)
__getattr__ = lazy_getattr(__name__, _LAZY)
