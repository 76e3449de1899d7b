"""A causal LM run one decoder layer at a time, its weights read from the checkpoint when a layer (or a
module outside the layers) runs and dropped after: what layer-by-layer calibration needs, in the memory
of one layer plus the activations, whatever the number of layers.

The model is built from its config with every parameter on the ``meta`` device (accelerate's
``init_empty_weights``, buffers such as rotary frequencies computed as usual). ``materialized(module)``
reads the module's parameters from the checkpoint onto a device for the duration of a ``with``;
``lazy_outside_layers()`` does the same for every module outside the decoder layers whenever it runs (the
embedding, before layer 0). A checkpoint whose tensor names do not match the model's parameters (a
format transformers converts on load) is not streamed: :func:`open_layered` then loads the whole model
as before, and says so.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from ..checkpoint import Checkpoint, open_checkpoint
from ..errors import CheckpointError


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's list of decoder layers and its dotted name: ``model.layers`` (Llama, Qwen, Mistral,
    ...), ``transformer.h`` (GPT-2, Bloom, Falcon, GPT-J), ``model.decoder.layers`` (OPT). It is the
    outermost list of modules of one class holding ``config.num_hidden_layers`` of them (so not a MoE
    layer's list of experts); without that number, the outermost list of one class that holds the most
    parameters."""
    lists = [(name, mod) for name, mod in model.named_modules()
             if isinstance(mod, nn.ModuleList) and len(mod) and len({type(m) for m in mod}) == 1]
    outer = [(n, m) for n, m in lists if not any(n.startswith(f"{o}.") for o, _ in lists)]
    depth = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    sized = [(n, m) for n, m in outer if len(m) == depth]
    pick = sized or sorted(outer, key=lambda nm: -sum(p.numel() for p in nm[1].parameters()))
    if not pick:
        raise CheckpointError(f"calibration: {type(model).__name__} has no list of decoder layers "
                              "(such as model.layers or transformer.h) to run one at a time")
    return pick[0]


class LayeredModel:
    """A model plus how its parameters get to where they run. ``streamed`` False: every parameter is
    already in memory and ``materialized`` only moves a module to the device and back."""

    def __init__(self, model: nn.Module, ckpt: Checkpoint | None, dtype: torch.dtype):
        self.model, self.ckpt, self.dtype = model, ckpt, dtype
        self.prefix, self.layers = decoder_layers(model)
        self.streamed = ckpt is not None

    def close(self) -> None:
        if self.ckpt is not None:
            self.ckpt.close()

    def __enter__(self) -> "LayeredModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _qualified(self, module: nn.Module) -> str:
        for name, mod in self.model.named_modules():
            if mod is module:
                return name
        raise ValueError("module is not part of this model")

    @contextlib.contextmanager
    def materialized(self, module: nn.Module, device: torch.device | str = "cpu") -> Iterator[nn.Module]:
        """``module`` with its parameters (read from the checkpoint when streamed) on ``device`` inside
        the ``with``; afterwards back on ``meta`` (streamed) or on the CPU."""
        if not self.streamed:
            module.to(device)
            try:
                yield module
            finally:
                module.to("cpu")
            return
        from accelerate.utils import set_module_tensor_to_device

        prefix = self._qualified(module)
        names = [n for n, p in module.named_parameters() if p.is_meta]
        try:
            for n in names:
                full = f"{prefix}.{n}" if prefix else n
                set_module_tensor_to_device(module, n, device, value=self._read(full), dtype=self.dtype)
            yield module
        finally:
            for n in names:
                set_module_tensor_to_device(module, n, "meta")

    def _read(self, name: str) -> torch.Tensor:
        src = name if name in self.ckpt else _tied_source(self.model, name)
        return self.ckpt.get(src).to(self.dtype)

    @contextlib.contextmanager
    def lazy_outside_layers(self, device: torch.device | str = "cpu") -> Iterator[None]:
        """Inside the ``with``, every module outside the decoder layers that holds parameters of its own
        gets them read in just before it runs and dropped right after (streamed models only)."""
        if not self.streamed:
            yield
            return
        handles, open_ = [], {}
        inside = {id(m) for m in self.layers.modules()}
        for mod in self.model.modules():
            if id(mod) in inside or not any(True for _ in mod.parameters(recurse=False)):
                continue

            def pre(m, _args, _mod=mod):
                cm = self.materialized(_mod, device)
                cm.__enter__()
                open_[id(_mod)] = cm

            def post(m, _args, _out, _mod=mod):
                cm = open_.pop(id(_mod), None)
                if cm is not None:
                    cm.__exit__(None, None, None)

            handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post, always_call=True)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            for cm in list(open_.values()):
                cm.__exit__(None, None, None)


def _tied_source(model: nn.Module, name: str) -> str:
    """The stored name of a parameter a checkpoint omits because it is tied (lm_head -> embeddings)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    target = params.get(name)
    for other, p in params.items():
        if other != name and p is target:
            return other
    raise CheckpointError(f"calibration: the checkpoint has no tensor {name!r}")


def model_config(path: Path, config_json: bytes | None):
    import transformers

    if path.is_dir() and (path / "config.json").is_file():
        return transformers.AutoConfig.from_pretrained(str(path))
    if config_json is None:
        raise CheckpointError(f"{path}: calibration runs the model and needs its config.json; give a model folder")
    return transformers.AutoConfig.for_model(**json.loads(config_json))


def open_layered(path: str | os.PathLike, config_json: bytes | None, dtype: torch.dtype, *,
                 stream: bool = True) -> LayeredModel:
    """The causal LM at ``path`` (a model folder, or one .safetensors file plus ``config_json``) with its
    parameters streamed from the checkpoint when every one of them is stored under its own name; loaded
    whole otherwise (or with ``stream=False``)."""
    import transformers
    from accelerate import init_empty_weights

    from .distill import _load_model

    p = Path(path)
    if stream:
        cfg = model_config(p, config_json)
        with init_empty_weights(include_buffers=False):
            model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        model.tie_weights()
        ckpt = open_checkpoint(p)
        try:
            for name in dict(model.named_parameters()):
                if name not in ckpt:
                    _tied_source(model, name)
        except CheckpointError:
            ckpt.close()
        else:
            return LayeredModel(model.eval().requires_grad_(False), ckpt, dtype)
    model = _load_model(p, config_json, dtype).requires_grad_(False)
    return LayeredModel(model, None, dtype)
