"""Peak memory does not grow with the number of layers: `compress` and `reconstruct` of a 2-layer and an
8-layer model (hidden 1024, so one layer's tensors, 14 MB each side, dwarf the interpreter's noise) run in
fresh subprocesses, whose peak RSS (VmHWM, which each child reads from /proc/self/status as it exits)
must not grow from 2 to 8 layers by MARGIN. The check is shown able to fail: the same runs with the checkpoint reader made to keep
every tensor it read (what a memory map of the whole file or loading the whole model amounts to) must
differ by more than MARGIN."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc to measure a "
                                "child's peak memory")

ROOT = Path(__file__).resolve().parent.parent
HIDDEN = 1024
LAYER_BYTES = 7 * HIDDEN * HIDDEN * 2  # q, k, v, o, gate, up, down at 1024x1024 in bf16: 14 MB
MARGIN = 12 * 2**20  # below one layer; six more layers held on both sides would add 168 MB
# The child reports its own VmHWM: the rusage of a child spawned by vfork (as subprocess does) also
# counts the parent's resident set at the spawn, which here holds the test's models.
RUN = """
import sys
from deltacomp.cli.main import main
if sys.argv[1] == "leak":  # a reader that keeps everything it read: memory grows with the model
    from deltacomp.checkpoint import Checkpoint
    kept, get = [], Checkpoint.get
    Checkpoint.get = lambda self, name: kept.append(get(self, name)) or kept[-1]
try:
    code = main(sys.argv[3:])
finally:
    with open("/proc/self/status") as f:
        hwm = [line.split()[1] for line in f if line.startswith("VmHWM:")]
    with open(sys.argv[2], "w") as f:
        f.write(hwm[0])
sys.exit(code)
"""


def _model(folder: Path, layers: int, pool: torch.Tensor, finetuned: bool) -> Path:
    """A Llama-shaped bf16 checkpoint whose tensors are slices of a random pool (fast to make)."""
    folder.mkdir()
    tensors, at = {}, 0
    shapes = [("model.embed_tokens.weight", (256, HIDDEN)), ("model.norm.weight", (HIDDEN,))]
    for i in range(layers):
        shapes += [(f"model.layers.{i}.{n}.weight", (HIDDEN, HIDDEN)) for n in
                   ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
        shapes += [(f"model.layers.{i}.input_layernorm.weight", (HIDDEN,))]
    for name, shape in shapes:
        n = torch.Size(shape).numel()
        at = (at + 7919) % (pool.numel() - n)
        t = pool[at:at + n] * 0.02 + (1.0 if len(shape) == 1 else 0.0)
        if finetuned and "layers" in name:
            t = t + pool[(at + 4099) % (pool.numel() - n):][:n] * 0.002
        tensors[name] = t.reshape(shape).to(torch.bfloat16)
    save_file(tensors, str(folder / "model.safetensors"))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
              "intermediate_size": HIDDEN, "num_hidden_layers": layers, "num_attention_heads": 8,
              "num_key_value_heads": 8, "vocab_size": 256, "torch_dtype": "bfloat16"}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _peak_rss(variant: str, args: list[str], report: Path) -> int:
    """Bytes: the child's peak resident set (its VmHWM, KB in /proc)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", RUN, variant, str(report), *args], cwd=ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    return int(report.read_text()) * 1024


@pytest.fixture(scope="module")
def peaks(tmp_path_factory) -> dict[tuple[str, str, int], int]:
    tmp = tmp_path_factory.mktemp("memflat")
    pool = torch.randn(4 * HIDDEN * HIDDEN + 8192, generator=torch.Generator().manual_seed(0))
    out = {}
    for layers in (2, 8):
        base, ft = _model(tmp / f"base{layers}", layers, pool, False), _model(tmp / f"ft{layers}", layers, pool, True)
        for variant in ("streamed", "leak"):
            delta = tmp / f"{variant}{layers}.delta.safetensors"
            out[variant, "compress", layers] = _peak_rss(
                variant, ["compress", str(base), str(ft), "-o", str(delta), "-q"], tmp / "hwm")
            out[variant, "reconstruct", layers] = _peak_rss(
                variant, ["reconstruct", str(base), str(delta), "-o", str(tmp / f"{variant}{layers}-rec"), "-q"],
                tmp / "hwm")
    return out


@pytest.mark.parametrize("command", ["compress", "reconstruct"])
def test_peak_memory_flat_in_layers(peaks, command):
    two, eight = peaks["streamed", command, 2], peaks["streamed", command, 8]
    # one-sided: the 2-layer peak comes out up to ~12 MB higher at times (allocator noise), never a leak
    assert eight - two < MARGIN, (f"{command}: peak RSS {two / 2**20:.1f} MB at 2 layers, {eight / 2**20:.1f} MB "
                                       f"at 8 (allowed difference {MARGIN / 2**20:.1f} MB)")


@pytest.mark.parametrize("command", ["compress", "reconstruct"])
def test_the_check_catches_a_reader_that_keeps_tensors(peaks, command):
    two, eight = peaks["leak", command, 2], peaks["leak", command, 8]
    assert eight - two > MARGIN, (two, eight)  # the flatness check above would fail
