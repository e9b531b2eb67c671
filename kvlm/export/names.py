"""The names of kvlm's serving contract: signatures, inputs and outputs of its exports.

Read by the writer (`kvlm.export.signatures`) and by clients and servers, which must not need
TensorFlow or Keras to import them.
"""

SIGNATURE_NAME = "serving_default"
FEATURES_SIGNATURE_NAME = "logits"
IMAGE_INPUT = "image_bytes"
TEXT_INPUT = "text"
INPUT_NAMES = (IMAGE_INPUT, TEXT_INPUT)
OUTPUT_NAMES = ("answer", "score", "scores", "labels")
# A model with adapter experts installed: two more outputs, and a signature taking `experts`.
EXPERT_OUTPUT = "expert"
EXPERT_OUTPUT_NAMES = (EXPERT_OUTPUT, "expert_weight")
CHOOSE_EXPERTS_SIGNATURE_NAME = "choose_experts"
EXPERTS_INPUT = "experts"
ROUTED_FEATURES_SIGNATURE_NAME = "routed_logits"
# The name `expert` gives an example no expert took.
BASE_EXPERT = "base"
# A `DualEncoder` export: `embed` (also its `serving_default`) maps the same inputs to
# unit-norm float32 `[batch, embedding_dim]` embeddings of each image and each text.
EMBED_SIGNATURE_NAME = "embed"
EMBED_FEATURES_SIGNATURE_NAME = "embeddings"
EMBED_OUTPUT_NAMES = ("image_embedding", "text_embedding")
# A `Captioner` export: `caption` (also its `serving_default`) maps `image_bytes` alone to
# greedy-decoded caption strings.
CAPTION_SIGNATURE_NAME = "caption"
CAPTION_FEATURES_SIGNATURE_NAME = "caption_token_ids"
CAPTION_INPUT_NAMES = (IMAGE_INPUT,)
CAPTION_OUTPUT_NAMES = ("caption",)
