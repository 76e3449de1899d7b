"""A bounded, seeded fuzzer over single-file and sharded delta files: byte flips, truncations and
metadata edits (plain, or resealed as a forger would) through open, verify, inspect, reconstruct and
export-lora. Every case must end in deltacomp's own error, or (for damage that is not resealed) in a
reconstruction identical to the original: never another exception, never a silent difference.

Deterministic (fixed seeds) so a failure reproduces; ``DELTACOMP_FUZZ_CASES`` sets the cases per target
(default 750: 3,000 cases over the four files, about a minute)."""
from __future__ import annotations

import json
import os
import random
import shutil
import warnings

import pytest
import torch

import deltacomp
from deltacomp import DeltacompError
from deltacomp.integrity import LegacyDeltaWarning
from conftest import finetune_of, llama_tensors, write_folder
from forge import edit_metadata, read_header, write_header

CASES = int(os.environ.get("DELTACOMP_FUZZ_CASES", "750"))  # 4 targets: 3,000 cases, under a minute
ODD_VALUES = [None, -1, 0, 1, 1.5, 2**63, "", "x", "raw", [], [0], {}, {"a": 1}, True, "a" * 300]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    b = llama_tensors(0, tied=False)
    f = finetune_of(b, 1, touch=lambda n: True)
    base, ft = write_folder(root / "base", b), write_folder(root / "ft", f)
    files = {}
    for method, shard in (("bitdelta", None), ("svd-mixed", None), ("ternary", None), ("lowrank", 4000),
                          ("svd-sparse", None)):
        path = root / f"{method}.delta.safetensors"
        deltacomp.compress(base, ft, path, method=method, progress=False,
                           **({"max_shard_bytes": shard} if shard else {}))
        files[method] = path
    want = {m: _run(base, p, root / "lora") for m, p in files.items()}
    return root, base, files, want


def _run(base, path, lora_dir):
    """Everything a user can do with a delta file, returning what it produced."""
    from deltacomp import lora
    from deltacomp.summary import summarize

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LegacyDeltaWarning)
        with deltacomp.load_delta(path) as df:
            df.verify()
            summarize(df)
            out = {n: t.clone() for n, t in deltacomp.iter_reconstructed(base, df)}
            out["__files__"] = dict(df.files)
        try:
            lora.export_lora_from_delta(path, lora_dir, overwrite=True)
        except deltacomp.SettingsError:
            pass  # codecs without factors refuse, as they must
    return out


def _same(a, b) -> bool:
    if a.keys() != b.keys() or a["__files__"] != b["__files__"]:
        return False
    return all(torch.equal(a[k], b[k]) for k in a if k != "__files__")


def _files_of(path):
    idx = path.with_name(path.name + ".index.json")
    if idx.exists():
        return [idx] + sorted(path.parent.glob(path.name.replace(".delta.safetensors", "-0*")))
    return [path]


def _copy(src, dst_dir):
    dst_dir.mkdir(parents=True, exist_ok=True)
    for f in _files_of(src):
        shutil.copy(f, dst_dir / f.name)
    return dst_dir / src.name


def _random_path(rng, node, depth=0):
    """A random (container, key) inside a JSON tree."""
    container, key = None, None
    while isinstance(node, (dict, list)) and node and depth < 6:
        key = rng.choice(list(node)) if isinstance(node, dict) else rng.randrange(len(node))
        container, node = node, node[key]
        depth += 1
        if rng.random() < 0.3:
            break
    return container, key


def _mutate_json(rng, meta):
    container, key = _random_path(rng, meta)
    if container is None:
        return
    op = rng.random()
    if op < 0.2 and isinstance(container, dict):
        del container[key]
    elif op < 0.3 and isinstance(container, dict):
        container[rng.choice(["x", "codec", "tied_to", "../a", "model.safetensors"])] = rng.choice(ODD_VALUES)
    else:
        container[key] = rng.choice(ODD_VALUES)


def _damage(rng, path, kind):
    files = _files_of(path)
    target = rng.choice(files)
    raw = bytearray(target.read_bytes())
    if kind == "flip":
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(raw))
            raw[i] ^= 1 << rng.randrange(8)
        target.write_bytes(bytes(raw))
    elif kind == "truncate":
        target.write_bytes(bytes(raw[: rng.randrange(len(raw))]))
    elif target.name.endswith(".index.json"):  # metadata edit in an index
        index = json.loads(raw)
        meta = json.loads(index["metadata"]["deltacomp"])
        _mutate_json(rng, meta)
        index["metadata"]["deltacomp"] = json.dumps(meta)
        target.write_text(json.dumps(index))
    elif path == target:  # the metadata in a single file's header
        edit_metadata(target, lambda m: _mutate_json(rng, m), reseal=kind == "reseal")
    else:  # a shard's safetensors header: a tensor's dtype, shape or offsets
        header, data = read_header(target)
        name = rng.choice([k for k in header if k != "__metadata__"])
        key = rng.choice(["dtype", "shape", "data_offsets"])
        header[name][key] = rng.choice({"dtype": ["U8", "F16", "F32", "I64", "BOOL"],
                                        "shape": [[0], [1], [3, 1], [10**9]],
                                        "data_offsets": [[0, 0], [0, 4], [4, 8]]}[key])
        write_header(target, header, data)


@pytest.mark.parametrize("method", ["bitdelta", "svd-mixed", "ternary", "lowrank", "svd-sparse"])
def test_fuzz(corpus, tmp_path, method):
    root, base, files, want = corpus
    rng = random.Random(f"deltacomp-fuzz-{method}")
    outcomes = {"refused": 0, "identical": 0, "forged-accepted": 0}
    for case in range(CASES):
        kind = rng.choice(["flip", "flip", "truncate", "edit", "reseal"])
        path = _copy(files[method], tmp_path / f"c{case}")
        _damage(rng, path, kind)
        try:
            got = _run(base, path, tmp_path / f"c{case}" / "lora")
        except DeltacompError as exc:
            assert "\n" not in str(exc), f"case {case} ({kind}): multi-line error {exc!r}"
            outcomes["refused"] += 1
        except Exception as exc:  # noqa: BLE001 - exactly what the fuzzer hunts
            pytest.fail(f"{method} case {case} ({kind}): {type(exc).__name__}: {exc}")
        else:
            if _same(got, want[method]):
                outcomes["identical"] += 1
            else:
                assert kind == "reseal", f"{method} case {case} ({kind}): silent difference in the output"
                outcomes["forged-accepted"] += 1
        shutil.rmtree(tmp_path / f"c{case}")
    print(method, outcomes)
    assert outcomes["refused"] > CASES // 2, outcomes
