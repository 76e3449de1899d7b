"""Quality against size: how close a base + compressed delta comes to the fine-tune it replaces.

Per delta it reports bytes on disk and the compression ratio, the weight-space relative error
(||ft - recon||_F / ||ft - base||_F, per tensor and over all), perplexity, mean KL(fine-tune ||
reconstruction) per token, top-1 agreement with the fine-tune, and the gain recovered
(L_base - L_recon) / (L_base - L_ft) with L the mean next-token NLL.

Scoring windows. Text of N tokens gives N-1 targets (token 0 has no context). Window k feeds
``ids[s:e]`` with ``s = k*stride``, ``e = min(s + ctx, N-1)`` and so predicts targets ``s+1 .. e``;
it scores only the targets after the last one already scored. With stride == ctx (the default)
consecutive windows share one token (the last target of one is the first input of the next) and every
target is scored exactly once; with stride < ctx every target after the first window sees at least
ctx - stride tokens of context. Target t is row t-1 of every per-token array.

Reference cache (why it looks like this). KL needs the fine-tune's whole next-token distribution at
every scored position, and two models may never be in RAM together. So the fine-tune runs once and its
log-probs at the scored positions go to a float32 ``.npy`` file (rows = targets, columns = vocab),
read back memory-mapped window by window while each candidate (base, every reconstruction) is
streamed over the same windows. float32 rather than fp16: good reconstructions have a KL of 1e-3 nats
or less, and fp16 rounding of log-probs of size ~10 (error ~5e-3) would swamp it; being bitwise the
same computation also makes the KL of a model against itself exactly 0. Cost: 4 * vocab bytes per token
on disk (800 MB for 4k tokens of a 49k vocab: bound it with ``max_tokens``), one batch of logits in
RAM. The cache is keyed by the fine-tune's content hash, the token ids, ctx, stride, batch size, dtype
and device (batching changes float rounding), so sweeps and repeated evals reuse it; the base's summary
is cached beside it under the same key plus the base's hash.
"""
from __future__ import annotations

import gc
import hashlib
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from ..checkpoint import hf_folder
from ..devices import resolve_device
from ..errors import CheckpointError, ModelLayoutError, SettingsError
from ..modelcheck import check_folder, check_token_ids
from ..storage import write_text_atomic

CACHE_VERSION = 1
DEFAULT_CTX = 256  # tokens per window unless the models hold fewer positions
SAME_LOSS_TOL = 1e-9  # |L_base - L_ft| at or below this: gain recovered is undefined


# ----------------------------------------------------------------------------------------- windows
@dataclass(frozen=True)
class Window:
    """Input ``ids[start:end]``; scores targets ``first .. end`` (absolute token positions)."""

    start: int
    end: int
    first: int

    @property
    def rows(self) -> slice:
        """Rows of the per-token arrays (row = target - 1) this window fills."""
        return slice(self.first - 1, self.end)

    @property
    def logit_rows(self) -> slice:
        """Rows of this window's logits that predict its scored targets."""
        return slice(self.first - 1 - self.start, self.end - self.start)


def plan_windows(n_tokens: int, ctx: int, stride: int | None = None) -> list[Window]:
    """The windows that score each of the n_tokens - 1 targets exactly once (module docstring)."""
    stride = ctx if stride is None else stride
    if ctx < 1:
        raise SettingsError(f"ctx must be >= 1, got {ctx}")
    if not 1 <= stride <= ctx:
        raise SettingsError(f"stride must be in 1..ctx={ctx}, got {stride}: a larger stride skips tokens")
    if n_tokens < 2:
        raise SettingsError(f"the text has {n_tokens} token(s); at least 2 are needed to score one")
    last, done, start, out = n_tokens - 1, 0, 0, []
    while done < last:
        end = min(start + ctx, last)
        out.append(Window(start, end, max(done + 1, start + 1)))
        done = end
        start += stride
    return out


def tokenize(model_dir: str | os.PathLike, text: str | Sequence[int] | Tensor) -> Tensor:
    """1-D int64 token ids: a str goes through the model folder's tokenizer (with its default special
    tokens), a sequence of ints or a tensor is taken as already tokenized."""
    if isinstance(text, str):
        from transformers import AutoTokenizer

        with hf_folder(model_dir, "tokenizer"):
            tok = AutoTokenizer.from_pretrained(str(model_dir))
        ids = tok(text, verbose=False)["input_ids"]
    else:
        ids = text
    return torch.as_tensor(ids, dtype=torch.long).reshape(-1)


# ------------------------------------------------------------------------------------ fingerprints
_FP_MEMO: dict[tuple, str] = {}


def _weight_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors file in the folder; give a Hugging Face model folder")
    return files


def fingerprint(path: str | os.PathLike) -> str:
    """sha256 over the model's safetensors and config.json contents (memoized by size and mtime)."""
    path = Path(path)
    files = _weight_files(path) + ([path / "config.json"] if (path / "config.json").is_file() else [])
    key = tuple((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    if key not in _FP_MEMO:
        h = hashlib.sha256()
        for f in files:
            h.update(f.name.encode() + b"\0")
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 24), b""):
                    h.update(chunk)
        _FP_MEMO[key] = h.hexdigest()
    return _FP_MEMO[key]


def model_bytes(path: str | os.PathLike) -> int:
    """Bytes of a model's weight files on disk (all shards)."""
    return sum(f.stat().st_size for f in _weight_files(Path(path)))


# --------------------------------------------------------------------------------------- scoring
def load_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32, delta=None, device="cpu"):
    """A causal LM from a HF folder, with ``delta`` added into its weights when given (in place, on CPU,
    before moving: only this one model is ever in RAM)."""
    from transformers import AutoModelForCausalLM

    check_folder(path)  # config.json against the weights: no model built from a config that lies about them
    with hf_folder(path, "model"):
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    if delta is not None:
        from ..api import apply_delta_, reconstruct

        try:
            apply_delta_(model, delta)  # checks the base fingerprint tensor by tensor
        except ModelLayoutError:
            # transformers merges some checkpoint tensors on load (experts): the delta applies to the
            # checkpoint only, so load the fine-tune rebuilt on disk (removed once loaded)
            _free(model)
            with tempfile.TemporaryDirectory(prefix="deltacomp-eval-") as tmp:
                folder = reconstruct(path, delta, Path(tmp) / "model", progress=False)
                model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
    return model.to(device).eval()


def _free(model) -> None:
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def iter_logprobs(model, ids: Tensor, windows: list[Window], batch_size: int = 8, device="cpu",
                  progress: bool = True, desc: str = "") -> Iterator[tuple[Window, Tensor]]:
    """Yields (window, log-probs of its scored rows, [n, vocab] on CPU), in window order.

    Windows are batched and right-padded with token 0 without an attention mask: attention is causal,
    so padding after a window's last token cannot change the logits at its positions."""
    from tqdm.auto import tqdm

    bar = tqdm(total=len(windows), desc=desc, unit="win", disable=not progress, leave=False)
    with torch.no_grad():
        for i in range(0, len(windows), batch_size):
            group = windows[i:i + batch_size]
            batch = torch.zeros(len(group), max(w.end - w.start for w in group), dtype=torch.long)
            for j, w in enumerate(group):
                batch[j, : w.end - w.start] = ids[w.start:w.end]
            logits = model(input_ids=batch.to(device), use_cache=False).logits
            out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
            for j, w in enumerate(group):
                lp = torch.log_softmax(logits[j, w.logit_rows].to(out_dtype), dim=-1)
                if torch.isnan(lp).any():  # else KL and top-1 come out as 0 and 0, silently
                    raise CheckpointError(f"eval: the {desc} model's forward pass gives NaN log-probs on tokens "
                                          f"{w.start}:{w.end}; its config.json or weights make it non-finite")
                yield w, lp.cpu()
            bar.update(len(group))
    bar.close()


@dataclass
class Reference:
    """The fine-tune's cached outputs: log-probs [targets, vocab] (memory-mapped) and per-token NLL."""

    logprobs: np.ndarray
    nll: np.ndarray
    top1: np.ndarray

    @property
    def summary(self) -> dict[str, float]:
        nll = float(self.nll.mean())
        return {"nll": nll, "ppl": math.exp(nll)}


def _cache_key(**parts: Any) -> str:
    return hashlib.sha256(json.dumps({"v": CACHE_VERSION, **parts}, sort_keys=True).encode()).hexdigest()[:32]


def build_reference(model, ids: Tensor, windows: list[Window], path_stem: Path, batch_size: int = 8,
                    device="cpu", progress: bool = True) -> Reference:
    """Runs ``model`` over the windows and writes ``<stem>.logprobs.npy`` and ``<stem>.stats.npz``
    (temporary names renamed when complete, so a crash never leaves a cache that looks valid)."""
    n_rows = windows[-1].end
    nll = np.zeros(n_rows, dtype=np.float64)
    top1 = np.zeros(n_rows, dtype=np.int64)
    lp_path = path_stem.with_name(path_stem.name + ".logprobs.npy")
    tmp = lp_path.with_name(lp_path.name + ".tmp.npy")
    mm = None
    for w, lp in iter_logprobs(model, ids, windows, batch_size, device, progress, "fine-tune"):
        if mm is None:
            dt = np.float64 if lp.dtype == torch.float64 else np.float32
            mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=dt, shape=(n_rows, lp.shape[-1]))
        mm[w.rows] = lp.numpy()
        tgt = ids[w.first:w.end + 1]
        nll[w.rows] = -lp.gather(1, tgt[:, None])[:, 0].double().numpy()
        top1[w.rows] = lp.argmax(-1).numpy()
    mm.flush()
    del mm
    os.replace(tmp, lp_path)
    stats = path_stem.with_name(path_stem.name + ".stats.npz")
    tmp_stats = stats.with_name(stats.name + ".tmp.npz")
    np.savez(tmp_stats, nll=nll, top1=top1)
    os.replace(tmp_stats, stats)
    return open_reference(path_stem)


def open_reference(path_stem: Path) -> Reference | None:
    """The cached reference at ``path_stem``, or None when there is none (or it is incomplete)."""
    lp_path = path_stem.with_name(path_stem.name + ".logprobs.npy")
    stats = path_stem.with_name(path_stem.name + ".stats.npz")
    if not (lp_path.is_file() and stats.is_file()):
        return None
    with np.load(stats) as z:
        nll, top1 = z["nll"], z["top1"]
    return Reference(np.load(lp_path, mmap_mode="r"), nll, top1)


def score_against(model, ids: Tensor, windows: list[Window], ref: Reference, batch_size: int = 8,
                  device="cpu", progress: bool = True, desc: str = "") -> dict[str, float]:
    """Mean NLL, perplexity, mean KL(ref || model) in nats per token and top-1 agreement with ref.
    KL is summed over the vocab in float64 from the two sets of log-probs."""
    nll = np.zeros(len(ref.nll), dtype=np.float64)
    kl = np.zeros(len(ref.nll), dtype=np.float64)
    agree = np.zeros(len(ref.nll), dtype=bool)
    for w, lq in iter_logprobs(model, ids, windows, batch_size, device, progress, desc):
        lp = torch.from_numpy(np.array(ref.logprobs[w.rows])).double()  # a copy: the memmap is read-only
        if lp.shape != lq.shape:
            raise CheckpointError(f"{desc}: vocab of {lq.shape[-1]} logits, the fine-tune has {lp.shape[-1]}; "
                                  "compare models with the same tokenizer")
        lq64 = lq.double()
        p = lp.exp()
        # where p == 0 the term is 0 (0 * log 0 = 0), even if lq is -inf there
        kl[w.rows] = torch.where(p > 0, p * (lp - lq64), torch.zeros(())).sum(-1).numpy()
        tgt = ids[w.first:w.end + 1]
        nll[w.rows] = -lq64.gather(1, tgt[:, None])[:, 0].numpy()
        agree[w.rows] = lq.argmax(-1).numpy() == ref.top1[w.rows]
    mean_nll = float(nll.mean())
    return {"nll": mean_nll, "ppl": math.exp(mean_nll), "kl": float(kl.mean()),
            "top1": float(agree.mean())}


def gain_recovered(l_base: float, l_ft: float, l_recon: float) -> float | None:
    """(L_base - L_recon) / (L_base - L_ft); None when the fine-tune does not change the loss."""
    if abs(l_base - l_ft) <= SAME_LOSS_TOL:
        return None
    return (l_base - l_recon) / (l_base - l_ft) + 0.0  # + 0.0 turns -0.0 into 0.0


# ------------------------------------------------------------------------------ weight-space error
def weight_stats(base, finetuned, delta) -> dict[str, Any]:
    """Relative Frobenius error ||ft - recon|| / ||ft - base|| per tensor and over all, streamed one
    tensor at a time. The reconstruction is ``iter_reconstructed``'s (in the fine-tune's dtype), the one
    ``apply_delta_`` and ``reconstruct`` produce. Tensors absent from the base (or rows the fine-tune
    added) count against a base of zeros; tied copies are counted once. A per-tensor error is None where
    the fine-tune equals the base but the reconstruction does not (0 / 0 is reported as 0).

    Also the delta's own size summary: bytes and ratio over the compressed tensors only (codecs that
    compress, as ``deltacomp.summarize`` counts them) and bytes per codec."""
    from ..api import iter_reconstructed, load_delta, summarize
    from ..checkpoint import open_checkpoint

    per_tensor: dict[str, float | None] = {}
    err2 = ref2 = 0.0
    with open_checkpoint(base) as b, open_checkpoint(finetuned) as f, load_delta(delta) as d:
        for name, recon in iter_reconstructed(b, d):
            if d.params[name].tied_to is not None:
                continue
            ft = f.get(name).to(torch.float32)
            ref = torch.zeros_like(ft)
            if name in b:
                bt = b.get(name).to(torch.float32)
                if ft.dim() == 0 or bt.shape == ft.shape:
                    ref = bt.reshape(ft.shape)
                else:
                    ref[: bt.shape[0]] = bt  # the fine-tune added rows (tokens): compare the rows both have
            e = float(torch.linalg.vector_norm(ft - recon.to(torch.float32), dtype=torch.float64)) ** 2
            r = float(torch.linalg.vector_norm(ft - ref, dtype=torch.float64)) ** 2
            err2, ref2 = err2 + e, ref2 + r
            per_tensor[name] = math.sqrt(e / r) if r > 0 else (0.0 if e == 0 else None)
        summ = summarize(d)
    ct = summ["compressed_tensors"]
    return {"weight_rel_error": math.sqrt(err2 / ref2) if ref2 > 0 else (0.0 if err2 == 0 else None),
            "weight_rel_error_per_tensor": per_tensor,
            "compressed_ratio": ct["ratio"], "compressed_bytes": ct["nbytes"],
            "compressed_ft_bytes": ct["finetuned_bytes"], "bits_per_param": ct["bits_per_param"],
            "by_codec": {k: {"tensors": v["tensors"], "nbytes": v["nbytes"]} for k, v in summ["by_codec"].items()},
            "source": summ["source"]}


def check_base(base, delta) -> None:
    """Raises BaseMismatchError when ``base`` is not the model ``delta`` was made against (cheap next to
    an eval: hashes each base tensor the delta applies to, as apply/reconstruct do)."""
    from ..basecheck import check_base as check
    from ..checkpoint import open_checkpoint
    from ..delta import load_delta

    with open_checkpoint(base) as b, load_delta(delta) as d:
        check(b, d)


# -------------------------------------------------------------------------------------- evaluate
def eval_context(base, finetuned, ctx: int | None = None) -> int:
    """Checks both model folders against their weights (``check_folder``) and returns the window length:
    ``ctx``, or DEFAULT_CTX capped at the models' max_position_embeddings when None. A ``ctx`` above that
    limit is refused (the models have no positions for the tokens past it)."""
    if ctx is not None and (isinstance(ctx, bool) or not isinstance(ctx, int) or ctx < 1):
        raise SettingsError(f"ctx must be an integer >= 1, got {ctx!r}")
    limits = []
    for path in (finetuned, base):
        config = check_folder(path)
        limit = getattr(config, "max_position_embeddings", None) if config is not None else None
        if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
            limits.append((limit, Path(path) / "config.json"))
    if not limits:
        return DEFAULT_CTX if ctx is None else ctx
    limit, where = min(limits, key=lambda x: x[0])
    if ctx is None:
        return min(DEFAULT_CTX, limit)
    if ctx > limit:
        raise SettingsError(f"ctx {ctx} is above the model's max_position_embeddings {limit} ({where}); "
                            f"use --ctx {limit} or less")
    return ctx


def check_eval_settings(base, finetuned, ctx: int | None, batch_size: int, max_tokens: int | None,
                        stride: int | None, cache_dir: str | os.PathLike | None) -> int:
    """evaluate's settings, checked before any model runs (sweep checks them before it compresses);
    returns the window length (``eval_context``)."""
    if batch_size < 1:
        raise SettingsError(f"batch_size must be >= 1, got {batch_size}")
    if max_tokens is not None and max_tokens < 2:
        raise SettingsError(f"max_tokens must be >= 2, got {max_tokens}")
    ctx = eval_context(base, finetuned, ctx)
    if stride is not None and not 1 <= stride <= ctx:
        raise SettingsError(f"stride must be in 1..ctx={ctx}, got {stride}: a larger stride skips tokens")
    if cache_dir is not None and Path(cache_dir).exists() and not Path(cache_dir).is_dir():
        raise SettingsError(f"--cache-dir {cache_dir}: exists and is not a folder")
    return ctx


def evaluate(base, finetuned, deltas: Sequence[str | os.PathLike], text: str | Sequence[int] | Tensor,
             ctx: int | None = None, batch_size: int = 8, device: str = "cpu", max_tokens: int | None = None, *,
             stride: int | None = None, dtype: torch.dtype = torch.float32,
             cache_dir: str | os.PathLike | None = None, weight_metrics: bool = True,
             progress: bool = True) -> dict[str, Any]:
    """Evaluates every delta (made against ``base``) against the fine-tune on held-out ``text``.

    ``text`` is a str (tokenized with the fine-tune's tokenizer) or already tokenized ids. Models are
    loaded in ``dtype`` one at a time. ``cache_dir`` keeps the fine-tune's log-probs and the base's
    summary for later calls (default: a temporary folder removed on return). ``ctx``: tokens per window
    (default 256, or the models' max_position_embeddings when smaller; above it is refused, see
    ``eval_context``). Returns a JSON-able dict:
    ``text``, ``base``, ``finetuned`` and one entry per delta in ``deltas``."""
    from ..delta import load_delta

    t0 = time.perf_counter()
    device = resolve_device(device)
    ctx = check_eval_settings(base, finetuned, ctx, batch_size, max_tokens, stride, cache_dir)
    deltas = [Path(p) for p in deltas]
    for p in deltas:  # fail on a missing, corrupt or wrong-base delta before minutes of model runs
        check_base(base, p)
    ids = tokenize(finetuned, text)[:max_tokens]
    for path in (finetuned, base) if len(ids) else ():  # both models run on the fine-tune's tokens
        check_token_ids(int(ids.min()), int(ids.max()), check_folder(path), path,
                        f"the tokenizer of {finetuned}" if isinstance(text, str) else "the token ids given")
    windows = plan_windows(len(ids), ctx, stride)
    key = dict(ft=fingerprint(finetuned), tokens=hashlib.sha256(ids.numpy().tobytes()).hexdigest(),
               ctx=ctx, stride=stride or ctx, batch=batch_size, dtype=str(dtype),
               device=torch.device(device).type)
    with tempfile.TemporaryDirectory(prefix="deltacomp-eval-") as tmp:
        cdir = Path(cache_dir) if cache_dir is not None else Path(tmp)
        cdir.mkdir(parents=True, exist_ok=True)
        stem = cdir / f"ft-{_cache_key(**key)}"
        ref = open_reference(stem)
        if ref is None:
            model = load_model(finetuned, dtype, device=device)
            ref = build_reference(model, ids, windows, stem, batch_size, device, progress)
            _free(model)
        ft_summary = ref.summary

        base_file = cdir / f"base-{_cache_key(**key, base=fingerprint(base))}.json"
        if base_file.is_file():
            base_summary = json.loads(base_file.read_text())
        else:
            model = load_model(base, dtype, device=device)
            base_summary = score_against(model, ids, windows, ref, batch_size, device, progress, "base")
            _free(model)
            _write_json_atomic(base_summary, base_file)

        ft_bytes = model_bytes(finetuned)
        rows = []
        for p in deltas:
            t1 = time.perf_counter()
            model = load_model(base, dtype, delta=p, device=device)
            s = score_against(model, ids, windows, ref, batch_size, device, progress, p.name)
            _free(model)
            with load_delta(p) as d:
                nbytes = d.nbytes  # on disk: every shard, headers and metadata included
            row = {"path": str(p), "bytes": nbytes, "ratio": ft_bytes / nbytes, **s,
                   "gain_recovered": gain_recovered(base_summary["nll"], ft_summary["nll"], s["nll"])}
            if weight_metrics:
                row.update(weight_stats(base, finetuned, p))
            row["seconds"] = time.perf_counter() - t1
            rows.append(row)
        del ref
    return {
        "text": {"tokens": len(ids), "scored_tokens": len(ids) - 1, "ctx": ctx, "stride": stride or ctx,
                 "windows": len(windows), "sha256": key["tokens"]},
        "base": {"path": str(base), "bytes": model_bytes(base), **base_summary,
                 "gain_recovered": 0.0 if abs(base_summary["nll"] - ft_summary["nll"]) > SAME_LOSS_TOL
                 else None},
        "finetuned": {"path": str(finetuned), "bytes": ft_bytes, **ft_summary, "kl": 0.0, "top1": 1.0,
                      "gain_recovered": 1.0 if abs(base_summary["nll"] - ft_summary["nll"]) > SAME_LOSS_TOL
                      else None},
        "deltas": rows,
        "settings": {"batch_size": batch_size, "device": str(device), "dtype": str(dtype),
                     "max_tokens": max_tokens},
        "seconds": time.perf_counter() - t0,
    }


# ------------------------------------------------------------------------------------- reporting
def _fmt(x: Any, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def format_table(result: dict[str, Any]) -> str:
    """A markdown table: one row for the base, the fine-tune and each delta."""
    head = ("| model | bytes | ratio | weight rel. err | ppl | KL ft‖model (nats/tok) | top-1 agree | "
            "gain recovered |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]

    def line(label: str, r: dict[str, Any], ratio: Any, werr: Any) -> None:
        lines.append(f"| {label} | {r['bytes']:,} | {_fmt(ratio, '.1f')} | {_fmt(werr, '.4f')} | "
                     f"{r['ppl']:.4f} | {_fmt(r.get('kl'), '.5f')} | {_fmt(r.get('top1'), '.4f')} | "
                     f"{_fmt(r.get('gain_recovered'), '.3f')} |")

    line("base", result["base"], None, 1.0)
    line("fine-tune", result["finetuned"], 1.0, 0.0)
    for r in result["deltas"]:
        label = r.get("label") or Path(r["path"]).name
        line(label, r, r["ratio"], r.get("weight_rel_error"))
    t = result["text"]
    lines.append(f"\n{t['scored_tokens']:,} scored tokens, ctx {t['ctx']}, stride {t['stride']}; ratio = "
                 "fine-tune safetensors bytes / delta file bytes.")
    return "\n".join(lines) + "\n"


def _write_json_atomic(obj: Any, path: Path) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def write_json(result: dict[str, Any], path: str | os.PathLike) -> None:
    """Writes the result of ``evaluate``/``sweep`` as JSON (temporary file renamed; None -> null)."""
    _write_json_atomic(result, Path(path))
