"""Peak memory of `deltacomp compress` and `deltacomp reconstruct` at real Llama widths: 7B (hidden 4096,
intermediate 11008, vocab 32000, 32 heads) and 70B (hidden 8192, intermediate 28672, vocab 128256, 64
heads, 8 KV heads), with 2 to 32 layers. The question is whether peak RSS stays flat in the number of
layers and bounded at 70B widths (a 128256x8192 embedding is 1.05 G elements).

Each pair is generated tensor by tensor and block by block (sharded bf16 safetensors, a real config.json;
the generator holds one block of at most 16 M elements). Base values are slices of one seeded pool of
N(0, 0.02) values at per-block offsets (drawing 10^10 normals would take longer than the runs measured);
the fine-tune moves each bf16 value by -4..4 units in the last place (also a seeded pool), so its delta
is small and exactly representable in bf16, as a real bf16 fine-tune's often is. Each command runs in a
subprocess sampled from /proc (VmRSS, RssAnon, RssFile) whose rusage gives the exact peak RSS (VmHWM)
and CPU seconds (memory.measure). That rusage also counts the parent's resident set at the spawn
(subprocess spawns with vfork), about 0.4 GB here (torch and the pools): a floor under every figure,
below all of them. Checkpoints are deleted after each size; the fine-tune is deleted before
`reconstruct` (it needs only the base and the delta), to keep the disk in use near 46 GB at 70B x 8.

    python benchmarks/scale.py --sizes 7b:2 7b:8 7b:32 70b:2 70b:8 --methods bitdelta ternary \
        --out benchmarks/results/scale_cpu.json
    python benchmarks/scale.py --sizes 7b:2 --methods bitdelta --no-reconstruct   # a quick check
    python benchmarks/scale.py --plot benchmarks/results/scale_cpu.json --plot-out docs/scale_memory.png
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import struct
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import measure  # noqa: E402  (the /proc sampler of the memory benchmark)

SHARD_BYTES = 5 * 1024**3  # Hugging Face's default shard size
BLOCK = 1 << 24           # elements generated at a time
GB = 1024**3


@dataclass(frozen=True)
class Width:
    hidden: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int


WIDTHS = {"7b": Width(4096, 11008, 32000, 32, 32), "70b": Width(8192, 28672, 128256, 64, 8)}
SLOW = {"svd-mixed": 2}  # method -> the most layers it is run at (svd-mixed is slow on a CPU)


def llama_shapes(w: Width, layers: int) -> list[tuple[str, tuple[int, ...]]]:
    kv = w.hidden // w.heads * w.kv_heads
    layer = [("self_attn.q_proj", (w.hidden, w.hidden)), ("self_attn.k_proj", (kv, w.hidden)),
             ("self_attn.v_proj", (kv, w.hidden)), ("self_attn.o_proj", (w.hidden, w.hidden)),
             ("mlp.gate_proj", (w.intermediate, w.hidden)), ("mlp.up_proj", (w.intermediate, w.hidden)),
             ("mlp.down_proj", (w.hidden, w.intermediate)), ("input_layernorm", (w.hidden,)),
             ("post_attention_layernorm", (w.hidden,))]
    out = [("model.embed_tokens.weight", (w.vocab, w.hidden))]
    for i in range(layers):
        out += [(f"model.layers.{i}.{n}.weight", s) for n, s in layer]
    return out + [("model.norm.weight", (w.hidden,)), ("lm_head.weight", (w.vocab, w.hidden))]


def config(w: Width, layers: int) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": w.hidden,
            "intermediate_size": w.intermediate, "num_hidden_layers": layers, "num_attention_heads": w.heads,
            "num_key_value_heads": w.kv_heads, "vocab_size": w.vocab, "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu", "torch_dtype": "bfloat16",
            "tie_word_embeddings": False}


class Pools:
    """Seeded pools the blocks are sliced from: base bf16 bit patterns and int16 ulp moves."""

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        base = (torch.randn(2 * BLOCK, generator=g) * 0.02).to(torch.bfloat16).view(torch.int16)
        tiny = (base & 0x7FFF) < 0x0100  # zeros and subnormals: a ulp move could flip the sign or make NaN
        self.base = torch.where(tiny, torch.full_like(base, 0x3C00), base)  # 0x3C00 = 2^-7
        self.move = torch.randint(-4, 5, (2 * BLOCK,), generator=g, dtype=torch.int16)
        self.gen = g

    def block(self, n: int, key: int, norm: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(base, fine-tune) bf16 blocks of n <= BLOCK elements; norms are 1 + small."""
        self.gen.manual_seed(key)
        a, b = (int(x) for x in torch.randint(0, BLOCK, (2,), generator=self.gen))
        base = self.base[a:a + n]
        if norm:
            base = (base.view(torch.bfloat16).float() + 1.0).to(torch.bfloat16).view(torch.int16)
        ft = base + self.move[b:b + n]
        return base.view(torch.bfloat16), ft.view(torch.bfloat16)


def _shards(shapes: list[tuple[str, tuple[int, ...]]]) -> list[list[int]]:
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, shape) in enumerate(shapes):
        nbytes = 2 * torch.Size(shape).numel()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += nbytes
    return shards


def write_pair(base: Path, ft: Path, w: Width, layers: int, pools: Pools) -> int:
    """Both checkpoints, shard by shard, tensor by tensor, block by block; returns the parameter count."""
    shapes = llama_shapes(w, layers)
    shards = _shards(shapes)
    maps: dict[str, str] = {}
    for folder in (base, ft):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps(config(w, layers), indent=2))
    total = 0
    for k, members in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for i in members:
            name, shape = shapes[i]
            nbytes = 2 * torch.Size(shape).numel()
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            maps[name] = fname
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(base / fname, "wb") as fb, open(ft / fname, "wb") as ff:
            for f in (fb, ff):
                f.write(struct.pack("<Q", len(raw)) + raw)
            for i in members:
                name, shape = shapes[i]
                numel = torch.Size(shape).numel()
                for j, start in enumerate(range(0, numel, BLOCK)):
                    b, f = pools.block(min(BLOCK, numel - start), 7919 * i + j, len(shape) == 1)
                    fb.write(b.view(torch.uint8).numpy().data)
                    ff.write(f.view(torch.uint8).numpy().data)
                total += numel
    index = {"metadata": {"total_size": 2 * total}, "weight_map": maps}
    for folder in (base, ft):
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def run_size(work: Path, tree: str, width: str, layers: int, methods: list[str], pools: Pools,
             reconstruct: bool) -> list[dict]:
    base, ft = work / "base", work / "ft"
    t0 = time.perf_counter()
    params = write_pair(base, ft, WIDTHS[width], layers, pools)
    print(f"{width} x {layers}: {params / 1e9:.2f} B parameters written in {time.perf_counter() - t0:.0f}s",
          flush=True)
    rows, deltas = [], {}
    common = {"width": width, "layers": layers, "params": params, **asdict(WIDTHS[width])}
    try:
        for method in methods:
            delta = work / f"{method}.delta.safetensors"
            row = {**common, "command": "compress", "method": method, "load_before": _load(),
                   **measure(["compress", str(base), str(ft), "-o", str(delta), "-q", "--method", method], tree)}
            row["delta_gb"] = round(sum(p.stat().st_size for p in work.glob(f"{method}*.delta.safetensors*")) / GB, 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
            deltas[method] = delta
        shutil.rmtree(ft)  # reconstruct needs the base and the delta only
        for method, delta in deltas.items() if reconstruct else ():
            rec = work / "rec"
            row = {**common, "command": "reconstruct", "method": method, "load_before": _load(),
                   **measure(["reconstruct", str(base), str(delta), "-o", str(rec), "-q"], tree)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            shutil.rmtree(rec)
    finally:
        for p in list(work.iterdir()):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    return rows


def plot(results: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = json.loads(results.read_text())["rows"]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    lines = sorted({(r["command"], r["method"]) for r in rows})
    for command, method in lines:
        pts = sorted((r["params"] / 1e9, r["peak_rss_gb"], r["width"]) for r in rows
                     if r["command"] == command and r["method"] == method)
        for width, marker in (("7b", "o"), ("70b", "s")):
            sel = [(x, y) for x, y, wd in pts if wd == width]
            if sel:
                ax.plot(*zip(*sel), marker=marker, linestyle="-" if command == "compress" else "--",
                        label=f"{command} {method} ({width} widths)")
    ax.axhline(8, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("parameters (billions)")
    ax.set_ylabel("peak RSS (GiB)")
    ax.set_ylim(bottom=0)
    ax.set_title("deltacomp peak memory vs model size (Llama widths, bf16)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["7b:2", "7b:8"], help="WIDTH:LAYERS, WIDTH in 7b, 70b")
    ap.add_argument("--methods", nargs="+", default=["bitdelta"])
    ap.add_argument("--no-reconstruct", action="store_true")
    ap.add_argument("--all-layers", action="store_true", help="run slow methods (svd-mixed) at every size too, "
                    f"not only up to {SLOW} layers")
    ap.add_argument("--tree", default=str(Path(__file__).resolve().parent.parent), help="deltacomp source tree")
    ap.add_argument("--workdir", default=None, help="where the checkpoints go (deleted after each size)")
    ap.add_argument("--out", default="benchmarks/results/scale.json", help="JSON results (rows are appended "
                    "to an existing file's, so sizes can be run one at a time)")
    ap.add_argument("--plot", type=Path, help="only plot this results file")
    ap.add_argument("--plot-out", type=Path, default=Path("docs/scale_memory.png"))
    args = ap.parse_args()
    if args.plot:
        plot(args.plot, args.plot_out)
        return
    sizes = []
    for s in args.sizes:
        width, _, layers = s.partition(":")
        if width not in WIDTHS or not layers.isdigit():
            ap.error(f"--sizes: {s!r} is not WIDTH:LAYERS with WIDTH one of {', '.join(WIDTHS)}")
        sizes.append((width, int(layers)))
    out = Path(args.out)
    doc = json.loads(out.read_text()) if out.is_file() else {
        "machine": platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
        "shard_bytes": SHARD_BYTES, "rows": []}
    pools = Pools()
    work = Path(tempfile.mkdtemp(prefix="deltacomp-scale-", dir=args.workdir))
    try:
        for width, layers in sizes:
            methods = [m for m in args.methods if args.all_layers or layers <= SLOW.get(m.split(":")[0], layers)]
            doc["rows"] += run_size(work, str(Path(args.tree).resolve()), width, layers, methods, pools,
                                    not args.no_reconstruct)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(doc, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
