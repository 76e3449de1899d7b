"""Peak memory of `deltacomp compress` and `deltacomp reconstruct` on synthetic Llama-7B-width checkpoints
(hidden 4096, intermediate 11008, vocab 32000, sharded bf16 safetensors, a real config.json) with a few
layers: the point is how peak RSS moves with the number of layers (it should not).

Each pair is generated tensor by tensor (deterministic seeds; the header is written from the known shapes
first, so the generator holds one tensor), each command runs in a subprocess whose /proc/<pid>/status is
sampled (VmRSS, RssAnon, RssFile: file pages mapped into the process, e.g. an mmap-ed shard) and whose
rusage gives the exact peak RSS and CPU seconds. Several source trees can be measured on the same
checkpoints (before/after a change); the checkpoints are deleted at the end.

    python benchmarks/memory.py --layers 2 6 --tree main=/work/main --tree branch=. \
        --out benchmarks/results/memory_bitdelta.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HIDDEN, INTER, VOCAB = 4096, 11008, 32000
SHARD_BYTES = 2 * 1024**3
LAYER = [("self_attn.q_proj", (HIDDEN, HIDDEN)), ("self_attn.k_proj", (HIDDEN, HIDDEN)),
         ("self_attn.v_proj", (HIDDEN, HIDDEN)), ("self_attn.o_proj", (HIDDEN, HIDDEN)),
         ("mlp.gate_proj", (INTER, HIDDEN)), ("mlp.up_proj", (INTER, HIDDEN)), ("mlp.down_proj", (HIDDEN, INTER)),
         ("input_layernorm", (HIDDEN,)), ("post_attention_layernorm", (HIDDEN,))]
RUN = "import sys; from deltacomp.cli.main import main; sys.exit(main(sys.argv[1:]))"


def llama_shapes(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    out = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(layers):
        out += [(f"model.layers.{i}.{n}.weight", s) for n, s in LAYER]
    return out + [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]


def config(layers: int) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
            "intermediate_size": INTER, "num_hidden_layers": layers, "num_attention_heads": 32,
            "num_key_value_heads": 32, "vocab_size": VOCAB, "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5, "hidden_act": "silu", "torch_dtype": "bfloat16", "tie_word_embeddings": False}


def tensor(name: str, shape: tuple[int, ...], index: int, finetuned: bool, variant: int = 0) -> torch.Tensor:
    """The base tensor (norms near 1, weights ~0.02) or the fine-tune's: base + a small perturbation
    (``variant`` picks one of several fine-tunes of the same base)."""
    g = torch.Generator().manual_seed(1000 + index)
    base = torch.randn(shape, generator=g) * 0.02 + (1.0 if len(shape) == 1 else 0.0)
    if finetuned:
        g.manual_seed(5000 + index + 100_000 * variant)
        base += torch.randn(shape, generator=g) * 0.002
    return base.to(torch.bfloat16)


def write_checkpoint(folder: Path, layers: int, finetuned: bool, variant: int = 0) -> None:
    """A sharded HF folder, written tensor by tensor: each shard's header comes from the known shapes."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config(layers), indent=2))
    shapes = llama_shapes(layers)
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, shape) in enumerate(shapes):
        nbytes = 2 * int(torch.Size(shape).numel())
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += nbytes
    weight_map, total = {}, 0
    for k, members in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for i in members:
            name, shape = shapes[i]
            nbytes = 2 * int(torch.Size(shape).numel())
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = fname
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(folder / fname, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for i in members:
                name, shape = shapes[i]
                f.write(tensor(name, shape, i, finetuned, variant).reshape(-1).view(torch.uint8).numpy().tobytes())
        total += offset
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                    out[key] = int(value.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def measure(args: list[str], tree: str, interval: float = 0.05) -> dict:
    """Run the CLI from ``tree`` in a subprocess; peaks sampled from /proc and the exact peak RSS."""
    env = {**os.environ, "PYTHONPATH": tree}
    start = time.perf_counter()
    # cwd=tree: `python -c` puts the working directory first on sys.path, ahead of PYTHONPATH
    proc = subprocess.Popen([sys.executable, "-c", RUN, *args], env=env, cwd=tree, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    peaks = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        for k, v in _status(proc.pid).items():
            if k in peaks:
                peaks[k] = max(peaks[k], v)
        time.sleep(interval)
    wall = time.perf_counter() - start
    err = proc.stderr.read().decode(errors="replace")
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {err.strip()[-2000:]}")
    gb = 1024**3
    return {"peak_rss_gb": round(usage.ru_maxrss * 1024 / gb, 3), "sampled_rss_gb": round(peaks["VmRSS"] / gb, 3),
            "peak_anon_gb": round(peaks["RssAnon"] / gb, 3), "peak_file_gb": round(peaks["RssFile"] / gb, 3),
            "wall_s": round(wall, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 6])
    ap.add_argument("--tree", action="append", default=[], help="LABEL=PATH of a deltacomp source tree "
                    "(repeat to compare; default: this one)")
    ap.add_argument("--method", default="bitdelta")
    ap.add_argument("--workdir", default=None, help="where the checkpoints go (deleted after)")
    ap.add_argument("--out", default="benchmarks/results/memory.json")
    args = ap.parse_args()
    trees = [t.split("=", 1) for t in args.tree] or [["this", str(Path(__file__).resolve().parent.parent)]]
    trees = [(label, str(Path(path).resolve())) for label, path in trees]
    for label, path in trees:  # which deltacomp each label really runs
        where = subprocess.run([sys.executable, "-c", "import deltacomp; print(deltacomp.__file__)"], cwd=path,
                               env={**os.environ, "PYTHONPATH": path}, capture_output=True, text=True).stdout
        print(f"{label}: {where.strip()}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="deltacomp-mem-", dir=args.workdir))
    rows = []
    try:
        for layers in args.layers:
            base, ft = work / f"base{layers}", work / f"ft{layers}"
            t0 = time.perf_counter()
            write_checkpoint(base, layers, False)
            write_checkpoint(ft, layers, True)
            print(f"{layers} layers: pair written in {time.perf_counter() - t0:.0f}s", flush=True)
            for label, path in trees:
                delta, rec = work / f"{label}{layers}.delta.safetensors", work / f"{label}{layers}-rec"
                for command, cli in (("compress", ["compress", str(base), str(ft), "-o", str(delta), "-q",
                                                   "--method", args.method]),
                                     ("reconstruct", ["reconstruct", str(base), str(delta), "-o", str(rec), "-q"])):
                    row = {"tree": label, "layers": layers, "command": command, "method": args.method,
                           **measure(cli, path)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                shutil.rmtree(rec, ignore_errors=True)
                delta.unlink(missing_ok=True)
            shutil.rmtree(base)
            shutil.rmtree(ft)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": platform.machine(), "cpus": os.cpu_count(),
                                          "torch": torch.__version__, "hidden": HIDDEN, "intermediate": INTER,
                                          "shard_bytes": SHARD_BYTES, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
