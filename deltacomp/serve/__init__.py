"""Serving deltas without reconstructing the fine-tune: runtime modules (modules), model patching
(patch), the base-layer backends (quantized: one dispatch_* per backend), multi-tenant generation
(generate), and the OpenAI-compatible HTTP server (server, engine, ...: imported on their own, so that
``import deltacomp`` needs no web stack)."""
from .generate import generate, load_base
from .modules import DeltaLinear, MultiDeltaLinear, MultiDeltaModule
from .patch import patch_model, patch_model_multi, set_delta_index, unpatch_model
from .quantized import DISPATCHERS, Backend, backend_of

__all__ = ["DeltaLinear", "MultiDeltaLinear", "MultiDeltaModule", "patch_model", "patch_model_multi",
           "set_delta_index", "unpatch_model", "generate", "load_base", "DISPATCHERS", "Backend", "backend_of"]
