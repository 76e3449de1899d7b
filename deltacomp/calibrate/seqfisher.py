"""The sequence-level Fisher estimate of the KL each linear's weight error costs: ``--method auto --calib``
with ``--auto-sensitivity sequence`` (the default).

Why not the per-channel estimate of sensitivity.py alone: it sums (g_t^T E x_t)^2 over tokens t, as if each
token's output error reached the logits on its own. Through attention a position's next-token distribution
reads the outputs of every earlier position, so an error that moves many positions the same way (what a
sign or sparse code leaves when it drops the delta's common direction) adds up coherently, and the
per-token sum misses it. On the bundled pair, for single tensors at the same bytes, the per-channel
estimate was 1.4-3.8x under the measured KL for svd-mixed and lowrank but 3-11x under for bitdelta and
ternary, so auto bought signs and sparse codes that cost more KL than it predicted (docs/auto.md).

The same second-order expansion without that assumption: with labels sampled from the fine-tune at every
position of a window w, the scores of different positions are uncorrelated with mean zero, so

    KL per token ~= 1/(2N) sum_w <E, J_w>^2,   J_w = sum_{t in w} d log p_ft(label_t) / dW,

J_w being the window's weight gradient and N the labelled positions. One backward pass per window gives
every linear's J_w; they are kept in bfloat16 in one scratch file beside the output (windows x the linears'
parameters x 2 bytes, e.g. 6.8 GB for 32 windows of a 135M model), written and read with plain file I/O
(no mapping, so they never count in the process's memory), and auto reads one tensor's at a time. A candidate
then costs windows x N x K multiply-adds. Unbiased, noisier than the per-channel estimate (a sum of one
square per window): 32 windows put it within about 25% of its mean.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import SettingsError
from ..progress import progress_bar
from .data import CalibData
from .distill import _load_model
from .sensitivity import linears

ESTIMATE = ("KL ~= 1/(2N) sum_w <D - D^, J_w>^2, J_w = the weight gradient of window w's log-likelihood of "
            "labels sampled from the fine-tune (N labelled positions)")


class GradientStore:
    """Per-window weight gradients of each linear, bfloat16, in one scratch file under ``directory``
    (removed by ``close``). ``store[name]`` is a float32 (windows, N, K) tensor scaled by 1/sqrt(N_tokens),
    so that 1/2 sum_w <E, store[name][w]>^2 is the predicted KL per token (auto._error)."""

    def __init__(self, directory: str | os.PathLike, shapes: dict[str, tuple[int, int]], windows: int):
        self.shapes, self.windows, self.scale = dict(shapes), int(windows), 1.0
        self.offsets, total = {}, 0
        for name, (n, k) in self.shapes.items():
            self.offsets[name] = total
            total += self.windows * n * k
        need = 2 * total
        free = shutil.disk_usage(directory).free
        if need > 0.9 * free:
            raise SettingsError(f"{directory}: --auto-sensitivity sequence keeps {self.windows} weight gradients "
                                f"of every linear on disk ({need / 1e9:.1f} GB) but only {free / 1e9:.1f} GB are "
                                "free; lower --calib-samples or use --auto-sensitivity sampled")
        fd, path = tempfile.mkstemp(prefix=".deltacomp-fisher-", suffix=".bin", dir=directory)
        self.fd, self.path = fd, Path(path)
        # plain reads and writes, no mapping: the gradients stay in the page cache, not in this process's RSS
        try:
            os.truncate(self.path, need)
        except BaseException:
            self.close()
            raise

    def put(self, name: str, window: int, grad: Tensor) -> None:
        n, k = self.shapes[name]
        data = grad.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes()
        os.pwrite(self.fd, data, 2 * (self.offsets[name] + window * n * k))

    def __contains__(self, name: object) -> bool:
        return name in self.offsets

    def __getitem__(self, name: str) -> Tensor:
        n, k = self.shapes[name]
        size = 2 * self.windows * n * k
        raw = bytearray(size)
        got = os.preadv(self.fd, [raw], 2 * self.offsets[name])
        if got != size:
            raise OSError(f"{self.path}: short read of {name}'s gradients ({got} of {size} bytes)")
        grads = torch.frombuffer(raw, dtype=torch.bfloat16).view(self.windows, n, k)
        return grads.float() * self.scale

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> "GradientStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def sequence_fisher(finetuned: str | os.PathLike, calib: CalibData, names: set[str], directory: str | os.PathLike,
                    *, device: str | torch.device = "cpu", seed: int = 0, progress: bool = False) -> GradientStore:
    """The per-window weight gradients of the linears in ``names`` (labels sampled from the fine-tune's own
    next-token distribution, seeded), one backward pass per calibration window."""
    model = _load_model(finetuned, None, torch.float32).to(device)
    return collect(model, calib.ids, names, directory, seed=seed, progress=progress)


def collect(model: torch.nn.Module, ids: Tensor, names: set[str], directory: str | os.PathLike, *,
            seed: int = 0, progress: bool = False) -> GradientStore:
    """``model``: a causal LM; ``ids`` (windows, seq_len). See ``sequence_fisher``."""
    ids = torch.as_tensor(ids)
    if ids.dim() != 2 or ids.shape[0] < 1 or ids.shape[1] < 1:
        raise SettingsError(f"calibration: the sequence Fisher needs at least one window of tokens, got token "
                            f"ids of shape {tuple(ids.shape)}")
    weights = {n: m.weight for n, m in linears(model, names).items()}
    store = GradientStore(directory, {n: tuple(w.shape) for n, w in weights.items()}, ids.shape[0])
    dev = next(model.parameters()).device
    gen = torch.Generator(device=dev).manual_seed(int(seed))
    needs = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    model.eval().requires_grad_(False)
    for w in weights.values():
        w.requires_grad_(True)
    labelled = 0
    try:
        for i in progress_bar(range(ids.shape[0]), desc="auto: sequence Fisher", unit="window", enable=progress):
            window = ids[i:i + 1].to(dev)
            with torch.enable_grad():
                logp = torch.log_softmax(model(input_ids=window, use_cache=False).logits.float(), dim=-1)
                with torch.no_grad():
                    target = torch.multinomial(logp.detach()[0].exp(), 1, generator=gen).reshape(window.shape)
                logp.gather(-1, target.unsqueeze(-1)).sum().backward()
            for name, w in weights.items():
                store.put(name, i, w.grad)
                w.grad = None
            labelled += target.numel()
    except BaseException:
        store.close()
        raise
    finally:
        model.train(was_training)
        for p, r in zip(model.parameters(), needs):
            p.requires_grad_(r)
    store.scale = float(labelled) ** -0.5
    return store
