"""A TF-Serving-compatible server and client for SavedModels (kvlm's exports and any other).

- `Server(ServerOptions(...))`: the embedded server: every PredictionService method
  (Predict, Classify, Regress, MultiInference, GetModelMetadata) and ModelService
  (GetModelStatus, HandleReloadConfigRequest) over gRPC, TF Serving's REST API and
  Prometheus metrics, with version polling, batching, image size and decode memory
  limits, TLS and bearer-token auth. `kvlm serve` runs it from the command line.
- `PredictClient(target, timeout=...)`: a client using only the official stubs.
- `load_model_config`, `load_batching_parameters`: TF Serving's config file formats.

Imports are lazy: `kvlm.serving.client` needs neither Keras nor the server code.
"""

from __future__ import annotations

from kvlm.lazy import lazy_getattr

_LAZY = {
    "PredictClient": "kvlm.serving.client",
    "Server": "kvlm.serving.server",
    "serve": "kvlm.serving.server",
    "ServerOptions": "kvlm.serving.config",
    "ModelConfig": "kvlm.serving.config",
    "BatchingConfig": "kvlm.serving.config",
    "TLSConfig": "kvlm.serving.config",
    "load_model_config": "kvlm.serving.config",
    "load_batching_parameters": "kvlm.serving.config",
    "load_ssl_config": "kvlm.serving.config",
    "ServingError": "kvlm.serving.errors",
}

__all__ = sorted(_LAZY)
__getattr__ = lazy_getattr(__name__, _LAZY)
