"""Layer-by-layer calibration on data: GPTQ for svd-mixed tensors, a least-squares scale for ternary ones.

One sequential pass (GPTQ's): the fine-tune is loaded once; decoder layer i sees the hidden states produced
by layers 0..i-1 already replaced by base + calibrated delta; inside a layer every linear's input Hessian
H = sum x^T x comes from one pass with the fine-tune's own weights for that layer. Memory: one model, the
(n, L, hidden) activations, and one K x K Hessian per linear of the current layer. Tensors outside the
decoder layers, and of other codecs, keep their stored encoding; every tensor keeps its bytes.

- svd-mixed: ``gptq.encode_gptq`` (V with H, then U with the Hessian of its own inputs).
- ternary: the support and signs stay; the scale becomes the least-squares one on the layer outputs,
  alpha = <delta H, T> / <T H, T> for the sign pattern T (per row with ``per_row``): the output-space
  counterpart of the codec's data-free ``scale=mean``, which is least squares on the weights.
"""
from __future__ import annotations

import os
import time
from typing import Any

import torch
from torch import Tensor

from ..checkpoint import open_checkpoint
from ..codecs.base import CodecName, Encoded
from ..codecs.svd_mixed import SvdMixedCodec
from ..codecs.ternary import TernaryCodec
from ..delta_file import load_delta
from ..errors import SettingsError
from ..progress import progress_bar
from .data import CalibData
from .distill import _load_model, rewrite_delta
from .gptq import encode_gptq, output_error

CALIBRATED = (CodecName.SVD_MIXED.value, CodecName.TERNARY.value)
ALLOCATIONS = ("keep", "optimal")


def ternary_ls_scale(delta: Tensor, enc: Encoded, h: Tensor) -> Encoded:
    """``enc`` (ternary) with its scale(s) replaced by the least-squares fit of the layer outputs:
    argmin_alpha trace((delta - alpha T) H (delta - alpha T)^T) with T the stored sign pattern. A row (or
    tensor) whose pattern has no output energy keeps its stored scale; a negative fit (the pattern points
    against the delta on this data) is clamped to 0."""
    codec = TernaryCodec()
    scale = enc.tensors["scale"]
    ones = Encoded(enc.codec, enc.shape, {**enc.tensors, "scale": torch.ones_like(scale)}, enc.params)
    t = codec.decode(ones).to(torch.float64)
    if t.dim() != 2:
        raise ValueError(f"ternary_ls_scale: a linear weight is 2-D, got shape {tuple(t.shape)}")
    th = t @ h.to(torch.float64)
    num = (delta.to(torch.float64) * th).sum(1)
    den = (t * th).sum(1)
    if scale.dim() == 0:
        num, den = num.sum(), den.sum()
    fit = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), scale.to(torch.float64))
    return Encoded(enc.codec, enc.shape, {**enc.tensors, "scale": fit.clamp_min(0).to(torch.float32).contiguous()},
                   dict(enc.params))


class _Stop(Exception):
    pass


def _decoder_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and name.endswith("layers") and len(mod):
            return name, mod
    raise ValueError(f"calibration: {type(model).__name__} has no decoder layer list (model.layers)")


def calibrate_layerwise(base: str | os.PathLike, finetuned: str | os.PathLike, delta_in: str | os.PathLike,
                        delta_out: str | os.PathLike, calib: CalibData | Tensor, *, damp: float = 0.01,
                        act_order: bool = False, whiten: bool = True, allocation: str = "keep",
                        batch_size: int = 4, overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Re-encode the svd-mixed (GPTQ) and ternary (least-squares scale) tensors of ``delta_in`` on
    calibration data; write ``delta_out``. GPTQ options: ``damp``, ``act_order``, ``whiten`` (singular
    vectors from the SVD of delta L, H = L L^T: gptq.whitened_svd) and ``allocation``: "keep" the stored
    groups (same bytes) or re-choose them within the same byte budget ("optimal", allocation.py)."""
    if allocation not in ALLOCATIONS:
        raise SettingsError(f"calibration: allocation must be one of {', '.join(ALLOCATIONS)}, got {allocation!r}")
    if isinstance(calib, Tensor):
        calib = CalibData(calib.to(torch.int64), {"data": "<token ids>"})
    t0 = time.perf_counter()
    df = load_delta(delta_in)
    targets = {n for n, i in df.params.items() if i.codec in CALIBRATED and i.tied_to is None}
    if not targets:
        raise SettingsError(f"calibration: {delta_in} has no svd-mixed or ternary tensors to calibrate")
    model = _load_model(finetuned, df.files.get("config.json"), torch.float32)
    model.requires_grad_(False)
    prefix, layers = _decoder_layers(model)
    hidden, kwargs = _layer0_inputs(model, layers[0], calib.ids, batch_size)
    replaced: dict[str, Encoded] = {}
    errors: dict[str, dict[str, float]] = {}
    with open_checkpoint(base) as bck:
        for li in progress_bar(range(len(layers)), desc="calibrate", unit="layer", enable=progress):
            layer = layers[li]
            mine = {f"{prefix}.{li}.{n}.weight": m for n, m in layer.named_modules()
                    if isinstance(m, torch.nn.Linear) and f"{prefix}.{li}.{n}.weight" in targets}
            hess = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for n, m in mine.items()}
            hooks = [m.register_forward_pre_hook(_accumulate(hess[n])) for n, m in mine.items()]
            with torch.no_grad():
                for h, kw in zip(hidden, kwargs):
                    layer(h, **kw)
            for hk in hooks:
                hk.remove()
            for name, mod in mine.items():
                info = df.params[name]
                b = bck.get(name).to(torch.float32)
                delta = mod.weight.detach().to(torch.float32) - b
                if info.codec == CodecName.SVD_MIXED.value:
                    if not info.settings.get("alloc"):
                        continue  # an all-zero delta: nothing to quantize, keep the stored encoding
                    settings = {k: v for k, v in info.settings.items() if k != "alloc"}
                    if allocation == "keep":
                        settings.update(groups=info.settings["alloc"], allocation="default")  # same groups
                    else:
                        settings.update(groups=None, allocation="optimal")  # same budget, groups re-chosen
                    enc = encode_gptq(delta, hess[name], damp=damp, act_order=act_order, whiten=whiten, **settings)
                    dec = SvdMixedCodec().decode(enc)
                else:
                    enc = ternary_ls_scale(delta, df.encoded(name), hess[name])
                    dec = TernaryCodec().decode(enc)
                errors[name] = {"codec": info.codec, "calibrated": output_error(delta, dec, hess[name]),
                                "data_free": output_error(delta, df.decode(name), hess[name])}
                replaced[name] = enc
                with torch.no_grad():
                    mod.weight.copy_((b + dec).to(mod.weight.dtype))
            with torch.no_grad():  # inputs of the next layer, through this layer's calibrated weights
                hidden = [_first(layer(h, **kw)) for h, kw in zip(hidden, kwargs)]
    del model
    calibration = {"method": "layerwise", "svd-mixed": "gptq", "ternary": "least-squares scale", "damp": damp,
                   "act_order": act_order, "whiten": whiten, "allocation": allocation, "data": calib.describe(),
                   "output_error_data_free": sum(e["data_free"] for e in errors.values()),
                   "output_error_calibrated": sum(e["calibrated"] for e in errors.values())}
    rewrite_delta(df, delta_out, replaced, calibration, overwrite=overwrite)
    df.close()
    return {**calibration, "tensors": len(replaced), "per_tensor": errors, "seconds": time.perf_counter() - t0,
            "path": str(delta_out)}


def _layer0_inputs(model: torch.nn.Module, layer0: torch.nn.Module, ids: Tensor,
                   batch_size: int) -> tuple[list[Tensor], list[dict]]:
    """The hidden states entering decoder layer 0 for each batch of ``ids``, and the keyword arguments
    the model passes every layer (attention mask, rotary embeddings, ...); the forward stops there."""
    captured: list[tuple[Tensor, dict]] = []

    def grab(_mod, args, kwargs):
        captured.append((args[0] if args else kwargs.pop("hidden_states"), kwargs))
        raise _Stop

    handle = layer0.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            for s in range(0, ids.shape[0], batch_size):
                try:
                    model(input_ids=ids[s:s + batch_size], use_cache=False)
                except _Stop:
                    pass
    finally:
        handle.remove()
    return [h for h, _ in captured], [{k: v for k, v in kw.items() if k != "hidden_states"} for _, kw in captured]


def _accumulate(h: Tensor):
    """A forward pre-hook adding x^T x of the module's input to ``h`` (float64); returns None so the
    input is left as it is."""
    def hook(_mod, args):
        x = args[0].reshape(-1, args[0].shape[-1]).double()
        h.add_(x.T @ x)
    return hook


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out
