"""``--method auto``: one byte budget spread over tensors and codecs.

Two passes over the model, one tensor in memory at a time:

1. ``tensor_table``: every registered codec offers settings for the tensor (``Codec.candidates``); each is
   encoded, its real ``nbytes`` taken and its distortion measured; only the Pareto front of
   (bytes, distortion) is kept (a few dozen numbers per tensor, never the encodings).
2. ``allocate``: the Lagrangian choice over all tables (each tensor minimises distortion + lambda * bytes,
   walked along the convex hulls by falling slope until the next step would pass the budget), then a
   greedy fill of what is left with the best distortion drop per byte among any front points that fit,
   and pair exchanges (one tensor down, another up) while they lower the distortion within the budget.
   The caller then encodes each tensor once more with its chosen settings.

The distortion, data-free: the weight-space squared error ||D - D^||_F^2 of the tensor's delta, every
tensor weighted the same. With an input Gram matrix H per tensor (--calib): the layer's output error
trace((D - D^) H (D - D^)^T). With H and the diagonal Fisher f of the layer's outputs (--calib; see
calibrate/sensitivity.py): the predicted KL to the fine-tune, 1/2 sum_i f_i ((D - D^) H (D - D^)^T)_ii, in
nats per token. All are additive over tensors, so the Lagrangian is exact on the hulls (docs/auto.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import Tensor

from .codecs import auto_defaults, get_codec
from .codecs.base import Encoded, Rung
from .errors import SettingsError
from .progress import progress_bar

DISTORTION = "weight squared error ||D - D^||_F^2 (data-free, every tensor weighted 1)"
DISTORTION_CALIB = "output error trace((D - D^) H (D - D^)^T), H = x^T x / tokens of the layer input (--calib)"
DISTORTION_SEQUENCE = ("predicted KL 1/2 sum_w <D - D^, J_w>^2, J_w = window w's weight gradient of the log-likelihood of "
                       "labels sampled from the fine-tune, scaled by 1/sqrt(tokens) (--calib)")
DISTORTION_FISHER = ("predicted KL 1/2 sum_i f_i ((D - D^) H (D - D^)^T)_ii, H = x^T x / tokens of the layer "
                     "input, f_i = E[(d log p / d y_i)^2] of its output channel i (--calib)")


@dataclass(frozen=True)
class Candidate:
    codec: str
    settings: dict[str, Any]
    nbytes: int        # the real size of its encoding (sum of the encoded tensors' nbytes)
    distortion: float  # ||D - D^||_F^2, or the output error / predicted KL with --calib (see _error)


def pareto(cands: list[Candidate]) -> list[Candidate]:
    """The candidates no other beats on both bytes and distortion, by rising bytes (falling distortion)."""
    out: list[Candidate] = []
    for c in sorted(cands, key=lambda c: (c.nbytes, c.distortion)):
        if not out or c.distortion < out[-1].distortion:
            out.append(c)
    return out


def hull(front: list[Candidate]) -> list[int]:
    """Indices (into a Pareto ``front``) of its lower convex hull: the points some lambda makes optimal."""
    idx: list[int] = []
    for i, c in enumerate(front):
        while len(idx) >= 2:
            a, b = front[idx[-2]], front[idx[-1]]
            # drop b when it lies on or above the segment a -> c (cross product of the two steps)
            above = (b.distortion - a.distortion) * (c.nbytes - a.nbytes)
            if above >= (c.distortion - a.distortion) * (b.nbytes - a.nbytes):
                idx.pop()
            else:
                break
        idx.append(i)
    return idx


def _error(codec, delta: Tensor, enc: Encoded, gram: Tensor | None, fisher: Tensor | None = None) -> float:
    """||E||_F^2, or trace(E H E^T) = sum((E H) * E) with the input Gram H: E's error on the layer's
    outputs over the calibration tokens (per token); with the output Fisher diagonal f too, the predicted
    KL 1/2 sum_i f_i (E H E^T)_ii (calibrate/sensitivity.py); with per-window weight gradients J_w
    instead (a 3-D ``fisher``), the sequence-level predicted KL 1/2 sum_w <E, J_w>^2 (calibrate/seqfisher.py)."""
    cpu = Encoded(enc.codec, enc.shape, {k: v.cpu() for k, v in enc.tensors.items()}, enc.params)
    e = (delta.cpu() - codec.decode(cpu).reshape(delta.shape)).double()
    if fisher is not None and fisher.dim() == 3:  # per-window weight gradients (calibrate/seqfisher.py)
        dots = fisher.reshape(fisher.shape[0], -1) @ e.reshape(-1).float()
        return 0.5 * float((dots.double() ** 2).sum())
    if gram is None:
        return float((e ** 2).sum())
    rows = ((e @ gram.double()) * e).sum(1)  # (E H E^T)_ii: output channel i's mean squared error
    return float(rows.sum()) if fisher is None else 0.5 * float((fisher.double() * rows).sum())


class _Reconstructed:
    """Stands for the codec in ``_error``: the rung's reconstruction, kept by the ladder or decoded from
    its packed form (``Rung.reconstruction``)."""

    def __init__(self, codec, rung: Rung):
        self.codec, self.rung = codec, rung

    def decode(self, enc: Encoded) -> Tensor:
        return self.rung.reconstruction(self.codec)


def tensor_table(delta: Tensor, budget_hint: float, device: torch.device | None = None,
                 gram: Tensor | None = None, fisher: Tensor | None = None,
                 codecs: Iterable[str] | None = None) -> list[Candidate]:
    """Every codec's offers for ``delta`` (float32, 2-D), encoded and measured (weight error, or output
    error with ``gram``, the layer's input Gram matrix, weighted per output channel by ``fisher``, its
    output Fisher diagonal); the Pareto front. ``codecs``: only these codecs' offers (default: ``auto_defaults()``)."""
    shape = tuple(delta.shape)
    if fisher is not None and fisher.dim() != 3 and gram is None:
        raise SettingsError("--method auto: a per-channel output Fisher needs the layer's input Gram too")
    rungs = []
    # the distortion is the weight error: what the ladders know of it prunes (see _Beaten, _undominated)
    beaten = _Beaten() if gram is None and fisher is None else None
    names = auto_defaults() if codecs is None else list(codecs)
    for codec in sorted((get_codec(n) for n in names), key=lambda c: (c.LADDER_PASS, c.name)):
        dev = device if device is not None and device.type in codec.encode_devices else torch.device("cpu")
        # the codec's whole ladder from shared work (one SVD, one sort, ...): the same bytes and
        # reconstructions as encoding rung by rung; rungs this tensor cannot take are left out
        for rung in codec.ladder(delta.to(dev), codec.candidates(shape, max(1, int(budget_hint))), beaten):
            rungs.append((codec, rung))
            if beaten is not None and rung.weight_error is not None:
                beaten.points.append((rung.nbytes, rung.weight_error))
    if not rungs:
        raise SettingsError(f"--method auto: no codec{'' if codecs is None else ' of ' + '+'.join(names)} offers "
                            f"any encoding for shape {shape}")
    if beaten is not None:
        rungs = _undominated(rungs)
    cands = [Candidate(codec.name, dict(r.settings), r.nbytes,
                       _error(_Reconstructed(codec, r), delta, Encoded(codec.name, shape, {}, r.settings), gram,
                              fisher))
             for codec, r in rungs]
    return pareto(cands)


# A rung whose weight error the ladder reported is skipped when another has no more bytes and an error
# lower by more than this fraction (the ladders' errors are within 1e-5 of _error's; see Rung).
PRUNE_MARGIN = 1e-3


class _Beaten:
    """``prune`` for the ladders (data-free only): a rung of ``nbytes`` whose weight error is at least
    ``floor`` is beaten when a finished rung with a known weight error has no more bytes and an error
    lower by PRUNE_MARGIN. Such a rung cannot be on the Pareto front, so it is not even built."""

    def __init__(self):
        self.points: list[tuple[int, float]] = []

    def __call__(self, nbytes: int, floor: float) -> bool:
        return any(b <= nbytes and e < floor * (1 - PRUNE_MARGIN) for b, e in self.points)


def _undominated(rungs: list[tuple[Any, Rung]]) -> list[tuple[Any, Rung]]:
    """The rungs no other rung with a known weight error beats on both bytes and (by PRUNE_MARGIN) error:
    the others cannot be on the Pareto front of the measured distortions, so they are never measured.
    Rungs without a known error are all kept."""
    known = sorted((r.nbytes, r.weight_error, i) for i, (_, r) in enumerate(rungs) if r.weight_error is not None)
    drop, best = set(), float("inf")
    for _, err, i in known:  # by rising bytes: ``best`` is the lowest error at no more bytes
        if best < err * (1 - PRUNE_MARGIN):
            drop.add(i)
        best = min(best, err)
    return [cr for i, cr in enumerate(rungs) if i not in drop]


def allocate(fronts: list[list[Candidate]], budget: int) -> list[int]:
    """Index of the chosen point of each Pareto front: total bytes <= ``budget``, distortion as low as
    the Lagrangian on the convex hulls plus a greedy fill of the remainder make it."""
    floor = sum(f[0].nbytes for f in fronts)
    if floor > budget:
        raise SettingsError(f"--method auto: the smallest encoding of every tensor takes {floor} bytes, over the "
                            f"budget of {budget}; use a lower --ratio or more --bits")
    hulls = [hull(f) for f in fronts]
    # every hull step (tensor, from-index, to-index) with its slope; a hull's slopes fall, so taking steps
    # by globally falling slope takes each tensor's steps in order: this walks lambda from +inf down
    steps = []
    for t, (f, h) in enumerate(zip(fronts, hulls)):
        for a, b in zip(h, h[1:]):
            gain = f[a].distortion - f[b].distortion
            steps.append((gain / (f[b].nbytes - f[a].nbytes), t, a, b))
    steps.sort(key=lambda s: -s[0])
    choice = [h[0] for h in hulls]
    used = floor
    for _, t, a, b in steps:
        if choice[t] != a:
            continue
        extra = fronts[t][b].nbytes - fronts[t][a].nbytes
        if used + extra > budget:
            break  # the Lagrangian solution: lambda stops at this slope
        choice[t], used = b, used + extra
    choice = _fill(fronts, choice, budget - used)
    return _exchange(fronts, choice, budget)


def _exchange(fronts: list[list[Candidate]], choice: list[int], budget: int,
              max_rounds: int | None = None) -> list[int]:
    """Pairs of moves the hull walk cannot make: one tensor steps down its front (up to 3 points) so that
    another can step up (to any point), taken while the pair lowers the total distortion within the
    budget. Hulls leave gaps (a step of a whole sign mask); this is what lands a small model's budget
    closely. Vectorised over all (down, up) pairs; each round takes the best one, then refills."""
    rounds = max_rounds if max_rounds is not None else 4 * len(fronts) + 16
    for _ in range(rounds):
        slack = budget - sum(f[i].nbytes for f, i in zip(fronts, choice))
        # moves as (tensor, point, change of bytes, change of distortion), from plain floats
        ups, downs = [], []
        for t, f in enumerate(fronts):
            cur = f[choice[t]]
            ups += [(t, j, f[j].nbytes - cur.nbytes, f[j].distortion - cur.distortion)
                    for j in range(choice[t] + 1, len(f))]
            downs += [(t, j, f[j].nbytes - cur.nbytes, f[j].distortion - cur.distortion)
                      for j in range(max(0, choice[t] - 3), choice[t])]
        if not ups or not downs:
            return choice
        u = torch.tensor([m[2:] for m in ups], dtype=torch.float64)
        d = torch.tensor([m[2:] for m in downs], dtype=torch.float64)
        ut, dt = torch.tensor([m[0] for m in ups]), torch.tensor([m[0] for m in downs])
        gain = u[:, 1:2] + d[None, :, 1]  # change of total distortion (negative is better)
        ok = ((u[:, 0:1] + d[None, :, 0]) <= slack) & (ut[:, None] != dt[None, :])
        gain = torch.where(ok, gain, torch.full_like(gain, float("inf")))
        best = int(torch.argmin(gain))
        i, k = divmod(best, gain.shape[1])
        total = sum(f[c].distortion for f, c in zip(fronts, choice))
        # a pair must lower the distortion by more than rounding, or the loop could cycle
        if not float(gain[i, k]) < -1e-12 * max(1.0, total):
            return choice
        choice[ups[i][0]], choice[downs[k][0]] = ups[i][1], downs[k][1]
        choice = _fill(fronts, choice, budget - sum(f[c].nbytes for f, c in zip(fronts, choice)))
    return choice


def _fill(fronts: list[list[Candidate]], choice: list[int], slack: int) -> list[int]:
    """Spend the bytes the Lagrangian left: repeatedly take the move to a larger front point that fits
    with the best distortion drop per byte (any front point, not only the hull's)."""
    while True:
        best = None
        for t, f in enumerate(fronts):
            cur = f[choice[t]]
            for j in range(choice[t] + 1, len(f)):
                extra = f[j].nbytes - cur.nbytes
                if extra > slack:
                    break  # fronts rise in bytes
                rate = (cur.distortion - f[j].distortion) / max(extra, 1)
                if best is None or rate > best[0]:
                    best = (rate, t, j, extra)
        if best is None:
            return choice
        _, t, j, extra = best
        choice[t], slack = j, slack - extra


def choose(items: Iterable[tuple[str, Tensor, float]], device: torch.device | None = None,
           progress: bool = False,
           grams: dict[str, Tensor] | None = None,
           fishers: dict[str, Tensor] | None = None,
           codecs: Iterable[str] | None = None,
           total: int | None = None) -> tuple[dict[str, Candidate], dict[str, Any]]:
    """``items`` yields (tensor name, float32 delta, its even share of the budget in bytes), one at a time.
    ``grams``: the input Gram matrix per tensor name (--calib; every item needs one); ``fishers``: the
    output Fisher diagonal per tensor name (with ``grams``), or without ``grams`` a mapping to each tensor's
    per-window weight gradients (calibrate/seqfisher.py); every item needs one. ``codecs``: the codecs
    whose offers are weighed (default: every registered one); ``total``: the most items, for the progress
    bar. Returns the chosen
    candidate per tensor and a report for the file's ``source``."""
    sequence = fishers is not None and grams is None  # per-window weight gradients: no Gram needed
    names, fronts, budget = [], [], 0.0
    for name, delta, hint in progress_bar(items, desc="auto: candidates", unit="tensor", enable=progress,
                                           total=total):
        if grams is not None and name not in grams:
            raise SettingsError(f"{name}: --method auto --calib found no linear layer for it in the model")
        if fishers is not None and name not in fishers:
            raise SettingsError(f"{name}: --method auto --calib has no output sensitivity for it")
        try:
            fronts.append(tensor_table(delta, hint, device, None if grams is None else grams[name],
                                       None if fishers is None else fishers[name], codecs))
        except SettingsError as exc:
            raise SettingsError(f"{name}: {exc}") from None
        names.append(name)
        budget += hint
    budget_bytes = int(budget)
    if fronts and budget_bytes < len(fronts):
        # every tensor could be left at the base (0 bytes), but a budget under a byte per tensor is a
        # mistyped ratio, not a request for the base model
        raise SettingsError(f"--method auto: a budget of {budget_bytes} bytes for {len(fronts)} tensors is "
                            "below one byte each; use a lower --ratio or more --bits")
    picks = allocate(fronts, budget_bytes) if fronts else []
    chosen = {n: f[i] for n, f, i in zip(names, fronts, picks)}
    report = {"budget_bytes": budget_bytes, "allocated_bytes": sum(c.nbytes for c in chosen.values()),
              "distortion": (DISTORTION_SEQUENCE if sequence else DISTORTION if grams is None else
                             DISTORTION_CALIB if fishers is None else DISTORTION_FISHER),
              "predicted_distortion": sum(c.distortion for c in chosen.values()),
              "tensors": len(chosen), "codecs": sorted(auto_defaults() if codecs is None else codecs),
              "by_codec": {c: sum(1 for x in chosen.values() if x.codec == c)
                           for c in sorted({x.codec for x in chosen.values()})}}
    return chosen, report
