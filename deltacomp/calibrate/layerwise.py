"""Layer-by-layer calibration on data: every tensor whose codec's calibrator runs in the ``layerwise``
stage (codecs/calibrator.py) is re-encoded from its delta and the Hessian of its layer's inputs.

One sequential pass (GPTQ's): the fine-tune is loaded once; decoder layer i sees the hidden states produced
by layers 0..i-1 already replaced by base + calibrated delta; inside a layer every linear's input Hessian
H = sum x^T x comes from one pass with the fine-tune's own weights for that layer. Memory: one model, the
(n, L, hidden) activations, and one K x K Hessian per linear of the current layer. Tensors outside the
decoder layers, and of other codecs, keep their stored encoding; every tensor keeps its bytes (what each
calibrator does is in its codec's package).
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import asdict
from typing import Any, Iterator

import torch
from torch import Tensor

from ..checkpoint import open_checkpoint
from ..codecs import Encoded, available, get_codec
from ..codecs.calibrator import LayerwiseOptions, output_error
from ..delta import load_delta
from ..errors import SettingsError
from ..progress import progress_bar
from .data import CalibData
from .distill import rewrite_delta
from .streamed import decoder_layers, open_layered

STAGE = "layerwise"


def _calibrators() -> dict:
    """Codec name -> its calibrator, for the codecs calibrated in this stage."""
    return {n: c for n in available() if (c := get_codec(n).calibrator()) is not None and c.stage == STAGE}


class _Stop(Exception):
    pass


def calibrate_layerwise(base: str | os.PathLike, finetuned: str | os.PathLike, delta_in: str | os.PathLike,
                        delta_out: str | os.PathLike, calib: CalibData | Tensor, *,
                        options: LayerwiseOptions | None = None, batch_size: int = 4, overwrite: bool = False,
                        progress: bool = True, device: str | torch.device = "cpu",
                        **option_values: Any) -> dict[str, Any]:
    """Re-encode every tensor of ``delta_in`` whose codec calibrates in this stage, on calibration data;
    write ``delta_out``. ``options`` (or its fields as keywords: ``damp``, ``act_order``, ``whiten``,
    ``allocation``) go to the codecs' calibrators. The model stays on the CPU; each decoder layer moves to
    ``device`` while it is calibrated (its Hessians and the calibrators' math there), then back."""
    device = torch.device(device)
    options = options if options is not None else LayerwiseOptions(**option_values)
    if isinstance(calib, Tensor):
        calib = CalibData(calib.to(torch.int64), {"data": "<token ids>"})
    t0 = time.perf_counter()
    df = load_delta(delta_in)
    cals = _calibrators()
    targets = {n for n, i in df.params.items() if i.codec in cals and i.tied_to is None}
    if not targets:
        raise SettingsError(f"calibration: {delta_in} has no {' or '.join(cals)} tensors to calibrate")
    replaced: dict[str, Encoded] = {}
    errors: dict[str, dict[str, float]] = {}
    with open_layered(finetuned, df.files.get("config.json"), torch.float32) as lm, open_checkpoint(base) as bck:
        _linear_targets(lm, targets, cals)
        with lm.lazy_outside_layers():
            hidden, kwargs = _layer0_inputs(lm.model, lm.layers[0], calib.ids, batch_size)
        hidden, kwargs = _to(hidden, device), _to(kwargs, device)
        for li in progress_bar(range(len(lm.layers)), desc="calibrate", unit="layer", enable=progress):
            with lm.materialized(lm.layers[li], device) as layer:  # one layer in memory / on the device
                hidden = _calibrate_layer(f"{lm.prefix}.{li}", layer, hidden, kwargs, bck, df, targets, cals,
                                          options, device, replaced, errors)
    calibration = {"method": STAGE, **{n: c.description for n, c in cals.items()}, **asdict(options),
                   "data": calib.describe(),
                   "output_error_data_free": sum(e["data_free"] for e in errors.values()),
                   "output_error_calibrated": sum(e["calibrated"] for e in errors.values())}
    rewrite_delta(df, delta_out, replaced, calibration, overwrite=overwrite)
    df.close()
    return {**calibration, "tensors": len(replaced), "per_tensor": errors, "seconds": time.perf_counter() - t0,
            "path": str(delta_out)}


def _linear_targets(lm, targets: set[str], cals: dict) -> None:
    """Refuse (none) or warn about (some) targets that are not the weight of a torch.nn.Linear inside the
    decoder layers: the calibrators take a delta of shape (out, in) and its input Hessian, which e.g.
    GPT-2's Conv1D (weights stored transposed) or a tensor outside the layers does not give."""
    linear = {f"{lm.prefix}.{i}.{n}.weight" for i, layer in enumerate(lm.layers)
              for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    outside = sorted(targets - linear)
    if not outside:
        return
    what = (f"{len(outside)} of the delta's {'/'.join(cals)} tensors (e.g. {outside[0]}) are not the weight of a "
            f"torch.nn.Linear layer inside {type(lm.model).__name__}'s decoder layers")
    if len(outside) == len(targets):
        raise SettingsError(f"calibration: {what}, so none can be calibrated (GPT-2-style Conv1D layers are not "
                            "supported); compress without --calib")
    print(f"deltacomp: calibration: {what}; they keep their data-free encoding", file=sys.stderr)
    targets.difference_update(outside)


def _calibrate_layer(prefix: str, layer: torch.nn.Module, hidden: list[Tensor], kwargs: list[dict], bck, df,
                     targets: set[str], cals: dict, options: LayerwiseOptions, device: torch.device,
                     replaced: dict[str, Encoded], errors: dict[str, dict[str, float]]) -> list[Tensor]:
    """Re-encode the targets among ``layer``'s linears on its input Hessians, put base + calibrated delta
    in the layer, and return the next layer's inputs (through the calibrated weights)."""
    mine = {f"{prefix}.{n}.weight": m for n, m in layer.named_modules()
            if isinstance(m, torch.nn.Linear) and f"{prefix}.{n}.weight" in targets}
    hess = _hessians(layer, mine, hidden, kwargs)
    for name, mod in mine.items():
        b = bck.get(name).to(device, torch.float32)
        delta = mod.weight.detach().to(torch.float32) - b
        codec = get_codec(df.params[name].codec)
        # the stored encoding stays on the CPU (some codecs decode it there); delta and H on device
        enc = cals[codec.name].calibrate(delta, df.encoded(name), hess[name], options)
        if enc is None:
            continue
        dec = codec.decode(enc).to(device)
        errors[name] = {"codec": codec.name, "calibrated": output_error(delta, dec, hess[name]),
                        "data_free": output_error(delta, df.decode(name).to(device), hess[name])}
        enc.tensors = {k: v.cpu() for k, v in enc.tensors.items()}
        replaced[name] = enc
        with torch.no_grad():
            mod.weight.copy_((b + dec).to(mod.weight.dtype))
    with torch.no_grad():
        return [_first(layer(h, **kw)) for h, kw in zip(hidden, kwargs)]


def input_grams(finetuned: str | os.PathLike, calib: CalibData, names: set[str], *, batch_size: int = 4,
                device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """H = x^T x / tokens (float32, on the CPU) of the inputs of each linear whose weight is in ``names``,
    on the fine-tune's own activations: what ``--method auto --calib`` weighs each candidate's error with,
    trace((D - D^) H (D - D^)^T). The decoder layers run one at a time (all batches through layer i, then
    i + 1), each read from the checkpoint while it runs; a name outside the layers makes it run the whole
    model per batch instead (everything loaded)."""
    device = torch.device(device)
    with open_layered(finetuned, None, torch.float32) as lm:
        inside = {f"{lm.prefix}.{i}.{n}.weight" for i, layer in enumerate(lm.layers)
                  for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
        if not names:
            return {}
        if names <= inside:
            return _layer_grams(lm, calib, names, batch_size, device)
    with open_layered(finetuned, None, torch.float32, stream=False) as lm:
        model = lm.model.to(device)
        mods = {f"{n}.weight": m for n, m in model.named_modules()
                if isinstance(m, torch.nn.Linear) and f"{n}.weight" in names}
        with _input_sums(mods, device) as grams, torch.no_grad():
            for s in range(0, calib.ids.shape[0], batch_size):
                model(input_ids=calib.ids[s:s + batch_size].to(device), use_cache=False)
    tokens = max(1, calib.ids.numel())
    return {n: (g / tokens).float().cpu() for n, g in grams.items()}


def _layer_grams(lm, calib: CalibData, names: set[str], batch_size: int, device: torch.device) -> dict[str, Tensor]:
    """input_grams over the decoder layers one at a time, up to the last layer that holds one of ``names``:
    a single pass per layer both sums x^T x (float64, hooks) and makes the next layer's inputs."""
    with lm.lazy_outside_layers():
        hidden, kwargs = _layer0_inputs(lm.model, lm.layers[0], calib.ids, batch_size)
    hidden, kwargs = _to(hidden, device), _to(kwargs, device)
    tokens = max(1, calib.ids.numel())
    last = max(i for i in range(len(lm.layers)) if any(n.startswith(f"{lm.prefix}.{i}.") for n in names))
    grams: dict[str, Tensor] = {}
    for li in range(last + 1):
        with lm.materialized(lm.layers[li], device) as layer:
            mine = {f"{lm.prefix}.{li}.{n}.weight": m for n, m in layer.named_modules()
                    if isinstance(m, torch.nn.Linear) and f"{lm.prefix}.{li}.{n}.weight" in names}
            with _input_sums(mine, device) as sums, torch.no_grad():
                hidden = [_first(layer(h, **kw)) for h, kw in zip(hidden, kwargs)]
        grams.update({n: (g / tokens).float().cpu() for n, g in sums.items()})
    return grams


@contextlib.contextmanager
def _input_sums(mods: dict[str, torch.nn.Linear], device) -> Iterator[dict[str, Tensor]]:
    """Inside the ``with``, every forward of a module in ``mods`` adds x^T x of its input (float64) to
    the yielded ``{name: sum}``."""
    sums = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64, device=device) for n, m in mods.items()}
    hooks = [m.register_forward_pre_hook(_accumulate(sums[n])) for n, m in mods.items()]
    try:
        yield sums
    finally:
        for hk in hooks:
            hk.remove()


def _hessians(layer: torch.nn.Module, mine: dict[str, torch.nn.Linear], hidden: list[Tensor],
              kwargs: list[dict]) -> dict[str, Tensor]:
    """H = sum x^T x (float64) of the inputs of each linear in ``mine``, over one pass of the layer."""
    with _input_sums(mine, next(layer.parameters()).device) as hess, torch.no_grad():
        for h, kw in zip(hidden, kwargs):
            layer(h, **kw)
    return hess


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


def _to(obj, device: torch.device):
    """``obj`` with every tensor in it (nested in lists, tuples and dicts) on ``device``."""
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a namedtuple
        return type(obj)(*(_to(v, device) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(v, device) for v in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out
