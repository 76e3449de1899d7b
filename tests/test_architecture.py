"""The import arrows of docs/ARCHITECTURE.md, checked on the source (every import, function-level ones
too): a module imports only its own layer or the layers below it; nothing inside the package imports the
package root or cli/; and no module outside codecs/ compares a codec's name."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "deltacomp"

# lowest first; a module may import its own layer and any below it, never one above
LAYERS = [
    {"errors", "_version", "dtypes", "progress", "linalg", "storage", "tensorio", "devices", "memory",
     "environment"},  # leaves
    {"quant", "ops", "ops_tl", "plans", "zoo"},                         # shared primitives, bundled data
    {"delta_file", "checkpoint", "integrity"},                 # the file/format layer: knows no codec
    {"codecs"},                                                # everything about each method
    {"delta", "basecheck", "pairing", "plan", "auto", "summary",
     "modelnames", "modelcheck"},                              # reading deltas, pairing, planning, config vs weights
    {"api", "rowblocks", "lora", "calibrate", "many", "distributed"},  # compress/reconstruct/apply, export, calibration, compress-many (+ Ray)
    {"serve", "eval"},                                         # serving, evaluation
    {"cli"},                                                   # argument parsing and printing
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}
# packages and modules that must not name a codec (they ask the codec instead)
CODEC_FREE = ["serve", "eval", "cli", "api.py", "rowblocks.py", "many.py", "distributed.py", "summary.py", "pairing.py", "basecheck.py", "delta.py",
              "delta_file.py", "checkpoint.py", "integrity.py", "calibrate/distill.py", "calibrate/layerwise.py",
              "calibrate/options.py", "calibrate/blocktune.py"]
CODEC_NAMES = re.compile(r"\b(bitdelta|svd[-_]mixed|ternary|lowrank|dare|CodecName)\b|[\"'](raw|zero)[\"']")


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        yield path, rel, (rel.parts[0].removesuffix(".py") if len(rel.parts) else "")


def _imports(path: Path, rel: Path) -> set[str]:
    """Top-level deltacomp modules imported by ``path`` ("" = the package root)."""
    pkg = ["deltacomp", *rel.parts[:-1]]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - node.level + 1]
                parts = base + (node.module.split(".") if node.module else [])
            else:
                parts = (node.module or "").split(".")
            if parts[0] != "deltacomp":
                continue
            if len(parts) == 1:  # from . import x, y
                out.update(a.name.split(".")[0] for a in node.names)
            else:
                out.add(parts[1])
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == "deltacomp":
                    out.add(parts[1] if len(parts) > 1 else "")
    return out


def test_every_module_has_a_layer():
    missing = {top for _, _, top in _modules() if top not in RANK and top not in ("__init__", "_C")}
    assert not missing, f"add {sorted(missing)} to LAYERS here and to docs/ARCHITECTURE.md"


@pytest.mark.parametrize("path,rel,top", [m for m in _modules() if m[2] in RANK], ids=lambda v: str(v))
def test_imports_point_down(path, rel, top):
    for target in _imports(path, rel):
        assert target != "", f"{rel} imports the package root; import the module it needs"
        assert target != "cli" or top == "cli", f"{rel} imports cli: nothing may"
        if target in RANK:
            assert RANK[target] <= RANK[top], (f"{rel} (layer {RANK[top]}: {top}) imports {target} "
                                               f"(layer {RANK[target]}), which is above it")


def test_no_codec_name_outside_codecs():
    offenders = []
    for entry in CODEC_FREE:
        paths = [ROOT / entry] if entry.endswith(".py") else sorted((ROOT / entry).rglob("*.py"))
        for p in paths:
            for i, line in enumerate(p.read_text().splitlines(), 1):
                if CODEC_NAMES.search(line):
                    offenders.append(f"{p.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not offenders, "ask the codec instead of naming it:\n" + "\n".join(offenders)
