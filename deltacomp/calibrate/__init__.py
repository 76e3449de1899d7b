"""Anything that runs the model on data: calibration samples, the distill and layerwise drivers that call
each codec's calibrator (codecs/calibrator.py), and the options of ``compress(calibration=...)``."""
from ..codecs.calibrator import LayerwiseOptions, output_error
from .data import CalibData, from_file, from_ids, from_text, load_calibration
from .distill import build_student, distill_scales, rewrite_delta, train_scales
from .layerwise import calibrate_layerwise
from .options import CalibrationOptions

__all__ = ["CalibData", "from_file", "from_ids", "from_text", "load_calibration", "build_student",
           "distill_scales", "train_scales", "rewrite_delta", "calibrate_layerwise", "CalibrationOptions",
           "LayerwiseOptions", "output_error"]
