"""The serving term of one encoded delta: ``x @ delta^T`` from its packed (or run-time) form.

A codec's ``serving_term(enc)`` returns a ``DeltaTerm`` (or a subclass holding a run-time layout, such as
ternary's CSR or raw's dense delta). Serving (deltacomp.serve) wraps a base linear layer around it and
asks it whether it can fuse with the base matmul; it never looks at the codec's name.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor, nn

from .base import Encoded

if TYPE_CHECKING:
    from .base import Codec

moves = 0  # serving terms moved so far (``moved``): part of serve.dispatch.plan_state, which a serving module's
# kept paths are keyed on, so a term moved alone (``layer.delta.to(...)``) drops the layer plans holding its tensors


def moved() -> None:
    """Note that a serving term's tensors were replaced (its ``_apply``: ``.to()``, ``.half()``, ...)."""
    global moves
    moves += 1


class DeltaTerm(nn.Module):
    """``x2 (M, K) -> x2 @ delta^T (M, N)`` in x2's dtype. The tensors are buffers (``.to()`` moves them);
    the default forward is the codec's ``matmul`` on the packed tensors."""

    def __init__(self, codec: "Codec", enc: Encoded, tensors: dict[str, Tensor] | None = None):
        super().__init__()
        if len(enc.shape) != 2:
            raise ValueError(f"DeltaTerm: a linear weight delta is 2-D, got shape {enc.shape}")
        self.impl = codec
        self.codec, self.shape, self.params = enc.codec, tuple(enc.shape), dict(enc.params)
        self.fields: list[str] = []
        self._enc: Encoded | None = None  # encoded() built from the buffers, until they move (_apply)
        for name, t in (enc.tensors if tensors is None else tensors).items():
            self._keep(name, t)

    def _keep(self, name: str, t: Tensor) -> None:
        self.register_buffer(f"t_{name}", t.contiguous(), persistent=False)
        self.fields.append(name)
        self._enc = None

    def _apply(self, fn, *args, **kwargs):
        self._enc = None  # .to() / .half() / ... replace the buffers: build the Encoded view again
        moved()
        return super()._apply(fn, *args, **kwargs)

    def tensor(self, name: str) -> Tensor:
        return getattr(self, f"t_{name}")

    def encoded(self) -> Encoded:
        """The term's tensors as an Encoded (kept between calls: a decode step calls every layer's term,
        and building it costs a lookup per field)."""
        enc = self._enc
        if enc is None:
            enc = self._enc = Encoded(self.codec, self.shape, {f: self.tensor(f) for f in self.fields}, self.params)
        return enc

    def forward(self, x2: Tensor) -> Tensor:
        return self.impl.matmul(x2, self.encoded()).to(x2.dtype)

    # -- fusing with the base matmul (one pass over the base weight and the packed delta) -------------
    def fuses_with(self, weight: Tensor) -> bool:
        """True when ``fused`` can compute ``x @ (weight + delta)^T`` in one pass for this weight."""
        return False

    def fused(self, x2: Tensor, weight: Tensor) -> Tensor:
        raise NotImplementedError(f"{self.codec}: no fused path")

    # -- a layer plan: the base layer and this term in one native call (deltacomp/plans.py) ---------------
    def layer_plan(self, weight: Tensor, bias: Tensor | None, extra: Tensor | None, mode: str, rows: int):
        """A ``plans`` plan of ``base(x2) + self(x2)`` (the base by ``mode``: "torch" or "own", see
        deltacomp/plans.py) or, mode "fused", ``fused(x2, weight) + bias``, then ``+ extra``, for inputs of
        ``rows`` rows on the CPU; or None (the default: no plan; the caller takes its Python path)."""
        return None
