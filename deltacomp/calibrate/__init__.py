"""Anything that runs the model on data: calibration samples, BitDelta scale distillation."""
from .data import CalibData, from_file, from_ids, from_text, load_calibration
from .distill import SignScaledLinear, build_student, distill_scales, rewrite_delta, train_scales, write_rescaled
from .gptq import encode_gptq, whitened_svd
from .layerwise import calibrate_layerwise, ternary_ls_scale

__all__ = ["CalibData", "from_file", "from_ids", "from_text", "load_calibration", "SignScaledLinear",
           "build_student", "distill_scales", "train_scales", "write_rescaled", "rewrite_delta", "encode_gptq",
           "whitened_svd", "calibrate_layerwise", "ternary_ls_scale"]
