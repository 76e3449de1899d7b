"""The tune stage one decoder layer at a time: what ``--calib`` runs where the whole model does not fit.

The end-to-end tune stage (distill.py, ``stage="tune"``) trains every tuned tensor's continuous numbers
together on KL to the fine-tune's logits, so it holds the whole model in float32 plus its gradients. Here
each decoder layer is trained on its own, in the memory of one layer plus the calibration activations
(the streaming of layerwise.py): the layer with base + delta weights, its tuned linears as their codecs'
``tune_student``, learns to give the fine-tune's layer output

    min  sum_b || L_student(h_s[b]) - L_ft(h_ft[b]) ||^2

where h_ft are the fine-tune's own hidden states entering the layer and h_s the student's (the layers
before it already tuned), so each layer also corrects what the earlier ones left. One batch of windows is
held out (from 4 batches up): a layer whose held-out error rises keeps its stored encodings. Tensors of
the layer that do not tune (norms, other codecs) take base + their stored delta, as the file gives them.
"""
from __future__ import annotations

import os
import time
from typing import Any

import torch
from torch import Tensor, nn

from ..checkpoint import open_checkpoint
from ..codecs import Encoded
from ..delta import Delta, load_delta
from ..errors import SettingsError
from ..memory import training_heap
from ..progress import progress_bar
from .data import CalibData
from .distill import _distilled, apply_stored, rewrite_delta, swap_in
from .layerwise import _first, _layer0_inputs, _to
from .streamed import open_layered

METHOD = "tune-blockwise"


def tune_blockwise(base: str | os.PathLike, finetuned: str | os.PathLike, delta_in: str | os.PathLike,
                   delta_out: str | os.PathLike, calib: CalibData | Tensor, *, steps: int, lr: float,
                   batch_size: int = 4, device: str | torch.device = "cpu", seed: int = 0, overwrite: bool = False,
                   progress: bool = True) -> dict[str, Any]:
    """Tune, layer by layer, the tensors of ``delta_in`` whose codec's calibrator tunes (``steps`` AdamW
    steps per layer at ``lr`` on its dimensionless offsets); write ``delta_out``; return a report."""
    if not isinstance(steps, int) or steps < 1:
        raise SettingsError(f"calibration: blockwise tune steps must be a positive integer, got {steps!r}")
    device = torch.device(device)
    if isinstance(calib, Tensor):
        calib = CalibData(calib.to(torch.int64), {"data": "<token ids>"})
    t0 = time.perf_counter()
    df = load_delta(delta_in)
    replaced: dict[str, Encoded] = {}
    layers: list[dict[str, Any]] = []
    with open_layered(finetuned, df.files.get("config.json"), torch.float32) as lm, open_checkpoint(base) as bck:
        with lm.lazy_outside_layers():
            hidden, kwargs = _layer0_inputs(lm.model, lm.layers[0], calib.ids, batch_size)
        h_ft, kwargs = _to(hidden, device), _to(kwargs, device)
        h_s = [h.clone() for h in h_ft]
        gen = torch.Generator().manual_seed(int(seed))
        for li in progress_bar(range(len(lm.layers)), desc="tune (layer by layer)", unit="layer", enable=progress):
            with lm.materialized(lm.layers[li], device) as layer:  # the fine-tune's layer i
                with torch.no_grad():
                    target = [_first(layer(h, **kw)) for h, kw in zip(h_ft, kwargs)]
                rec = _tune_layer(f"{lm.prefix}.{li}", layer, h_s, target, kwargs, bck, df, steps, lr, gen, replaced)
                with torch.no_grad():  # the next layer's inputs through this layer as the file will hold it
                    h_s = [_first(layer(h, **kw)) for h, kw in zip(h_s, kwargs)]
                _restore(layer, rec.pop("originals"))
            h_ft = target
            layers.append(rec)
    tuned = [r for r in layers if r["tensors"]]
    calibration = {"method": METHOD, "steps": steps, "lr": lr, "batch_size": batch_size, "loss": "mse",
                   "layers": len(tuned), "kept_layers": sum(r["kept"] for r in tuned),
                   "loss_before": sum(r["loss_before"] for r in tuned),
                   "loss_after": sum(r["loss_after"] for r in tuned),
                   "checked_on": "held-out windows" if len(h_ft) >= 4 else "training windows",
                   "data": calib.describe()}
    rewrite_delta(df, delta_out, replaced, calibration, overwrite=overwrite)
    df.close()
    return {**calibration, "tensors": len(replaced), "per_layer": layers, "seconds": time.perf_counter() - t0,
            "path": str(delta_out)}


def _student_layer(prefix: str, layer: nn.Module, bck, df: Delta) -> tuple[dict[str, tuple], dict]:
    """Turn the fine-tune's ``layer`` into the student in place: every tensor the file holds becomes base +
    its stored delta, except the weights of linears whose codec tunes, which become the base weight inside
    their codec's ``tune_student``. Returns ({name: (calibrator, encoding, student)}, originals to restore)."""
    layer.requires_grad_(False)
    students, originals = {}, {}
    modules = dict(layer.named_modules())
    for n, p in layer.named_parameters():
        name = f"{prefix}.{n}"
        info = df.params.get(name)
        if info is None or info.tied_to is not None:
            raise SettingsError(f"calibration (tune, layer by layer): {name} of the loaded model is not a tensor of "
                                f"{df.path} (transformers merged or renamed it on load); compress with "
                                "--calib-tune-steps 0")
        b = bck.get(name).to(p.device, torch.float32) if info.has_base else None
        mod_name = n.rsplit(".", 1)[0] if n.endswith(".weight") else None
        module = modules.get(mod_name) if mod_name else None
        cal = _distilled(df, name, "tune")
        if cal is not None and isinstance(module, nn.Linear) and len(info.shape) == 2 and b is not None:
            with torch.no_grad():
                p.copy_(b.reshape(p.shape))
            enc = df.encoded(name)
            student = cal.tune_student(module, enc).to(p.device)
            originals[mod_name] = swap_in(layer, modules, mod_name, student)
            students[name] = (cal, enc, student)
            continue
        apply_stored(df, name, p, b)
    return students, originals


def _restore(layer: nn.Module, originals: dict[str, tuple]) -> None:
    """Put the layer's own linears back where students stood (its parameters then go back to ``meta``)."""
    for parent, child, module in originals.values():
        setattr(parent, child, module)


def _error(layer: nn.Module, h: list[Tensor], target: list[Tensor], kwargs: list[dict], rows: list[int]) -> float:
    with torch.no_grad():
        return sum(float((_first(layer(h[i], **kwargs[i])) - target[i]).pow(2).mean()) for i in rows) / len(rows)


def _tune_layer(prefix: str, layer: nn.Module, h_s: list[Tensor], target: list[Tensor], kwargs: list[dict], bck,
                df: Delta, steps: int, lr: float, gen: torch.Generator,
                replaced: dict[str, Encoded]) -> dict[str, Any]:
    """Train one layer's students toward ``target``; record their new encodings in ``replaced``."""
    students, originals = _student_layer(prefix, layer, bck, df)
    rec: dict[str, Any] = {"layer": prefix, "tensors": len(students), "originals": originals}
    if not students:
        return rec
    n = len(h_s)
    check = [n - 1] if n >= 4 else list(range(n))
    train = [i for i in range(n) if i not in check] if n >= 4 else list(range(n))
    params = [p for _, _, s in students.values() for p in s.parameters() if p.requires_grad]
    rec["loss_before"] = _error(layer, h_s, target, kwargs, check)
    start = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    order: list[int] = []
    with training_heap():
        for _ in range(steps):
            if not order:
                order = [train[i] for i in torch.randperm(len(train), generator=gen).tolist()]
            i = order.pop()
            loss = (_first(layer(h_s[i], **kwargs[i])) - target[i]).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    rec["loss_trained"] = _error(layer, h_s, target, kwargs, check)
    rec["kept"] = not rec["loss_trained"] <= rec["loss_before"]  # higher, or not a number (training diverged)
    rec["loss_after"] = rec["loss_before"] if rec["kept"] else rec["loss_trained"]
    if rec["kept"]:  # never worse than the stored encodings: the students as they started
        with torch.no_grad():
            for p, p0 in zip(params, start):
                p.copy_(p0)
    else:
        for name, (cal, enc, student) in students.items():
            replaced[name] = cal.tune_encoded(student, enc)
    return rec
