"""Helpers that damage or forge delta files the way a careless or hostile user would (for the tests)."""
from __future__ import annotations

import json
import struct
from pathlib import Path

from deltacomp.integrity import integrity_digest


def read_header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_header(path: Path, header: dict, data: bytes) -> None:
    new = json.dumps(header).encode()
    new += b" " * ((8 - len(new) % 8) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + data)


def manifest(header: dict) -> dict:
    return {k: (v["dtype"], tuple(v["shape"])) for k, v in header.items() if k != "__metadata__"}


def edit_metadata(path: Path, edit, reseal: bool = True, header_edit=None) -> None:
    """Apply ``edit(meta)`` to a single-file delta's metadata. ``reseal``: recompute the integrity digest
    as a forger would, so the checks behind it are reached; False: an edit the digest must catch."""
    header, data = read_header(path)
    meta = json.loads(header["__metadata__"]["deltacomp"])
    edit(meta)
    if header_edit is not None:
        header_edit(header)
    if reseal and isinstance(meta, dict) and isinstance(meta.get("integrity"), dict):
        meta["integrity"]["sha256"] = integrity_digest(meta, manifest(header))
    header["__metadata__"]["deltacomp"] = json.dumps(meta)
    write_header(path, header, data)


def rewrite_tensors(path: Path, edit_tensors, edit=lambda meta: None) -> None:
    """Rewrite a single-file delta with ``edit_tensors(dict)`` applied to its stored tensors, then fix
    up each parameter's checksum and byte count and the digest: a forger's well-formed file."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from deltacomp.delta_file import encoded_checksum

    with safe_open(str(path), framework="pt") as h:
        meta = json.loads(h.metadata()["deltacomp"])
        tensors = {k: h.get_tensor(k) for k in h.keys()}
    edit_tensors(tensors)
    edit(meta)
    for name, p in meta["params"].items():
        mine = {f: tensors[f"{name}.{f}"] for f in p["fields"] if f"{name}.{f}" in tensors}
        p["checksum"] = encoded_checksum(mine)
        p["nbytes"] = sum(t.numel() * t.element_size() for t in mine.values())
    save_file(tensors, str(path), metadata={"deltacomp": json.dumps(meta)})
    edit_metadata(path, lambda m: None, reseal=True)
