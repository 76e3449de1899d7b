"""Anything that runs the model on data: calibration samples, BitDelta scale distillation."""
from .data import CalibData, from_file, from_ids, from_text, load_calibration
from .distill import SignScaledLinear, build_student, distill_scales, train_scales, write_rescaled

__all__ = ["CalibData", "from_file", "from_ids", "from_text", "load_calibration", "SignScaledLinear",
           "build_student", "distill_scales", "train_scales", "write_rescaled"]
