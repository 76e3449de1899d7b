"""Serving deltas without reconstructing the fine-tune: runtime modules (modules), model patching
(patch), the base-layer backends (quantized: one dispatch_* per backend), multi-tenant generation
(generate)."""
from .generate import generate, load_base
from .modules import DeltaLinear, MultiDeltaLinear, MultiDeltaModule
from .patch import patch_model, patch_model_multi, set_delta_index, unpatch_model
from .quantized import DISPATCHERS, Backend, backend_of

__all__ = ["DeltaLinear", "MultiDeltaLinear", "MultiDeltaModule", "patch_model", "patch_model_multi",
           "set_delta_index", "unpatch_model", "generate", "load_base", "DISPATCHERS", "Backend", "backend_of"]
