"""A catalogue of damaged, edited and forged delta files, each refused with one typed error line.

Edits are made two ways: plain (an accident or a careless edit: the integrity digest must catch it) and
resealed (a forger recomputes the digest, so the schema, consistency and codec checks behind it are
reached). deltacomp does not authenticate files: a resealed file that is consistent is accepted."""
from __future__ import annotations

import base64
import json
import shutil
import zlib

import pytest
import torch

import deltacomp
from deltacomp import DeltaFormatError
from deltacomp.integrity import LegacyDeltaWarning
from forge import edit_metadata, read_header, rewrite_tensors, write_header

UP = "model.layers.0.mlp.up_proj.weight"
DOWN = "model.layers.1.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def made(tmp_path_factory, request):
    """One delta per method used below, made once: {method: (base, ft, delta path)}."""
    from conftest import finetune_of, llama_tensors, write_folder

    root = tmp_path_factory.mktemp("adv")
    b = llama_tensors(0)
    base, ft = write_folder(root / "base", b), write_folder(root / "ft", finetune_of(b, 1))
    out = {}
    for method in ("bitdelta", "svd-mixed", "ternary:storage=zstd"):
        path = root / f"{method.split(':')[0]}.delta.safetensors"
        deltacomp.compress(base, ft, path, method=method, progress=False)
        out[method] = (base, ft, path)
    return out


@pytest.fixture
def copy(made, tmp_path):
    def get(method="bitdelta"):
        base, ft, path = made[method]
        dst = tmp_path / path.name
        shutil.copy(path, dst)
        return base, ft, dst
    return get


def _refused(path, match):
    with pytest.raises(DeltaFormatError, match=match) as info:
        with deltacomp.load_delta(path) as df:
            df.verify()
    assert "\n" not in str(info.value) and path.name.split(".")[0] in str(info.value)


# -- edits the digest catches (no reseal) ----------------------------------------------------------
PLAIN_EDITS = {
    "deleted parameter": lambda m: m["params"].pop(UP),
    "changed setting": lambda m: m["params"][UP]["settings"].update(masks=2),
    "changed shape": lambda m: m["params"][UP].update(shape=[64, 96]),
    "changed dtype": lambda m: m["params"][UP].update(dtype="float16"),
    "flipped byte in embedded config": lambda m: m["files"].update(
        {"config.json": m["files"]["config.json"].replace("hidden_size", "hidden_sizf")}),
    "removed embedded file": lambda m: m["files"].pop("generation_config.json"),
    "base fingerprint edited": lambda m: m["base"]["tensors"].update({UP: "0" * 32}),
    "tied_to added": lambda m: m["params"]["model.norm.weight"].update(tied_to=UP),
    "source edited": lambda m: m["source"].update(method="ternary"),
    "integrity record malformed": lambda m: m.update(integrity={"sha256": 5}),
    "integrity record a string": lambda m: m.update(integrity="ok"),
}


@pytest.mark.parametrize("what", PLAIN_EDITS)
def test_plain_edit_refused_by_digest(copy, what):
    _, _, path = copy()
    edit_metadata(path, PLAIN_EDITS[what], reseal=False)
    _refused(path, "integrity digest mismatch|metadata ")


def test_header_manifest_edit_refused_by_digest(copy):
    _, _, path = copy()
    header, data = read_header(path)
    key = f"{UP}.scale"  # swap two stored tensors' places: same bytes, other meaning
    other = f"{DOWN}.scale"
    header[key], header[other] = header[other], header[key]
    write_header(path, header, data)
    _refused(path, "integrity digest mismatch|checksum mismatch")


# -- forged (resealed) edits: schema, consistency, codec checks -----------------------------------
FORGED = [
    ("deleted base section", lambda m: m.pop("base"), "'base' is a required property"),
    ("base is a list", lambda m: m.update(base=[]), "metadata base: "),
    ("params not an object", lambda m: m.update(params=[1]), "metadata params"),
    ("deleted parameter", lambda m: m["params"].pop(UP), "belongs to no parameter"),
    ("deleted base fingerprint", lambda m: m["base"]["tensors"].pop(UP), "no fingerprint for it"),
    ("overall fingerprint edited", lambda m: m["base"].update(fingerprint="0" * 64), "base fingerprint does not match"),
    ("shape is a string", lambda m: m["params"][UP].update(shape="96,64"), r"shape: '96,64' is not allowed"),
    ("negative dim", lambda m: m["params"][UP].update(shape=[-96, 64]), "shape/0"),
    ("9-D shape", lambda m: m["params"][UP].update(shape=[1] * 9), "shape"),
    ("numel above bound", lambda m: m["params"][UP].update(shape=[2**30, 2**30]), "above the bound"),
    ("null codec", lambda m: m["params"][UP].update(codec=None), "codec: None is not allowed"),
    ("codec is a number", lambda m: m["params"][UP].update(codec=3), "codec"),
    ("unknown codec", lambda m: m["params"][UP].update(codec="magic"), "unknown codec 'magic'"),
    ("non-integer nbytes", lambda m: m["params"][UP].update(nbytes=1.5), "nbytes: 1.5"),
    ("float dim", lambda m: m["params"][UP].update(shape=[96.0, 64]), r"shape/0: 96.0 is not allowed"),
    ("nbytes off by one", lambda m: m["params"][UP].update(nbytes=m["params"][UP]["nbytes"] + 1), "stored tensors hold"),
    ("checksum not hex", lambda m: m["params"][UP].update(checksum="xyz"), "checksum"),
    ("has_base a string", lambda m: m["params"][UP].update(has_base="yes"), "has_base"),
    ("fields not a list", lambda m: m["params"][UP].update(fields="signs"), "fields"),
    ("field with a dot", lambda m: m["params"][UP].update(fields=["a.b"]), "fields/0"),
    ("unknown param key", lambda m: m["params"][UP].update(evil=1), "evil"),
    ("zero mask count", lambda m: m["params"][UP]["settings"].update(masks=0), "masks=0 must be between 1 and 16"),
    ("fractional mask count", lambda m: m["params"][UP]["settings"].update(masks=1.5), "masks=1.5 is not a int"),
    ("mask count a bool", lambda m: m["params"][UP]["settings"].update(masks=True), "masks=True is not a int"),
    ("settings not an object", lambda m: m["params"][UP].update(settings=[]), "settings"),
    ("forged shape", lambda m: m["params"][UP].update(shape=[96, 72]), r"expected .*\[96, 9\]|\.signs0"),
    ("base_rows above rows", lambda m: m["params"][UP].update(base_rows=500), "base_rows 500 outside"),
    ("base_rows zero", lambda m: m["params"][UP].update(base_rows=0), "base_rows"),
    ("base_rows without new rows", lambda m: m["params"][UP].update(base_rows=50), "base_rows and a stored new_rows"),
    ("tied to another shape", lambda m: m["params"][UP].update(tied_to=DOWN, codec=None, fields=[], nbytes=0),
     r"shape \[96, 64\], but tied to .* of shape \[64, 96\]"),
    ("tied_to cycle", lambda m: (m["params"][UP].update(tied_to=DOWN, codec=None, fields=[], nbytes=0),
                                 m["params"][DOWN].update(tied_to=UP, codec=None, fields=[], nbytes=0)),
     "tied_to .* is not a stored parameter"),
    ("tied_to itself", lambda m: m["params"][UP].update(tied_to=UP, codec=None, fields=[], nbytes=0),
     "tied_to .* not a stored parameter"),
    ("tied_to missing", lambda m: m["params"][UP].update(tied_to="nope", codec=None, fields=[], nbytes=0),
     "tied_to 'nope'"),
    ("embedded model.safetensors", lambda m: m["files"].update({"model.safetensors": "x"}), "model.safetensors"),
    ("embedded path traversal", lambda m: m["files"].update({"../evil.json": "x"}), "evil"),
    ("embedded subfolder", lambda m: m["files"].update({"a/config.json": "x"}), "a/config.json"),
    ("renamed embedded file", lambda m: m["files"].update({"config.jsom": m["files"].pop("config.json")}), "config.jsom"),
    ("embedded file a number", lambda m: m["files"].update({"config.json": 5}), "config.json"),
    ("embedded base64 invalid", lambda m: m["files"].update({"config.json": {"base64": "!!!"}}), "cannot be decoded"),
    ("embedded zlib truncated", lambda m: m["files"].update(
        {"config.json": {"zlib_base64": base64.b64encode(zlib.compress(b"x" * 5000)[:-4]).decode()}}), "truncated"),
    ("unknown top-level key", lambda m: m.update(filez={}), "filez"),
    ("format missing", lambda m: m.pop("format"), "unknown format None"),
    ("format a number", lambda m: m.update(format=1), "unknown format 1"),
]


@pytest.mark.parametrize("what,edit,match", FORGED, ids=[f[0] for f in FORGED])
def test_forged_metadata_refused(copy, what, edit, match):
    _, _, path = copy()
    edit_metadata(path, edit, reseal=True)
    _refused(path, match)


def test_metadata_not_an_object(copy):
    _, _, path = copy()
    header, data = read_header(path)
    header["__metadata__"]["deltacomp"] = "[1, 2]"
    write_header(path, header, data)
    _refused(path, "unknown format")


def test_zero_group_size(copy):
    _, _, path = copy("svd-mixed")
    edit_metadata(path, lambda m: m["params"][UP]["settings"].update(group_size=0), reseal=True)
    _refused(path, "group_size=0")


def test_extra_tensor_refused(copy):
    _, _, path = copy()
    rewrite_tensors(path, lambda t: t.update({"stowaway.weight": torch.zeros(4)}))
    _refused(path, "stowaway.weight belongs to no parameter")


# -- bombs -----------------------------------------------------------------------------------------
def test_zlib_bomb_in_embedded_file(copy):
    _, _, path = copy()
    bomb = base64.b64encode(zlib.compress(b"\0" * (65 * 2**20), 9)).decode()
    edit_metadata(path, lambda m: m["files"].update({"tokenizer.json": {"zlib_base64": bomb}}), reseal=True)
    _refused(path, "tokenizer.json inflates beyond 67108864 bytes")


def _zmask_param(path):
    with deltacomp.load_delta(path) as df:
        return next(n for n, i in df.params.items() if "zmask" in i.fields)


@pytest.mark.parametrize("declared", [True, False])
def test_zstd_bomb_in_position_mask(copy, declared):
    import zstandard

    _, _, path = copy("ternary:storage=zstd")
    name = _zmask_param(path)
    blob = zstandard.ZstdCompressor(write_content_size=declared).compress(b"\xff" * (2**30))
    rewrite_tensors(path, lambda t: t.update({f"{name}.zmask": torch.frombuffer(bytearray(blob), dtype=torch.uint8)}))
    with deltacomp.load_delta(path) as df, pytest.raises(DeltaFormatError, match=f"{path.name}: {name}: zstd storage"):
        df.decode(name)


def test_zstd_garbage_mask_names_file_and_tensor(copy):
    _, _, path = copy("ternary:storage=zstd")
    name = _zmask_param(path)
    rewrite_tensors(path, lambda t: t.update({f"{name}.zmask": torch.arange(40, dtype=torch.uint8)}))
    with deltacomp.load_delta(path) as df, pytest.raises(DeltaFormatError, match=f"{path.name}: {name}: zstd"):
        df.decode(name)


def test_kept_count_forged(copy):
    _, _, path = copy("ternary:storage=zstd")
    name = _zmask_param(path)
    edit_metadata(path, lambda m: m["params"][name]["settings"].update(kept=10**12), reseal=True)
    with deltacomp.load_delta(path) as df, pytest.raises(DeltaFormatError, match=f"{name}: kept count"):
        df.decode(name)


# -- truncation and byte flips -----------------------------------------------------------------------
@pytest.mark.parametrize("keep", [0, 4, 8, 100, 0.5, 0.9, -1])
def test_truncated_anywhere(copy, keep):
    _, _, path = copy()
    raw = path.read_bytes()
    n = keep if isinstance(keep, int) and keep >= 0 else int(len(raw) * keep) if keep > 0 else len(raw) - 1
    path.write_bytes(raw[:n])
    _refused(path, "truncated|corrupted|checksum|missing")


def test_header_length_huge(copy):
    _, _, path = copy()
    raw = bytearray(path.read_bytes())
    raw[:8] = (2**62).to_bytes(8, "little")
    path.write_bytes(bytes(raw))
    _refused(path, "truncated or corrupted")


# -- files written before the integrity record -------------------------------------------------------
def test_legacy_file_loads_with_one_warning(copy):
    base, ft, path = copy()
    edit_metadata(path, lambda m: m.pop("integrity"), reseal=False)
    with pytest.warns(LegacyDeltaWarning, match="no integrity record"):
        df = deltacomp.load_delta(path)
    df.verify()
    df.close()
    # the checks that need no record still run on legacy files
    edit_metadata(path, lambda m: m["params"].pop(UP), reseal=False)
    _refused(path, "belongs to no parameter")


# -- sharded files and model folders ---------------------------------------------------------------
@pytest.fixture
def sharded(made, tmp_path):
    base, ft, _ = made["bitdelta"]
    out = tmp_path / "s.delta.safetensors"
    deltacomp.compress(base, ft, out, max_shard_bytes=3000, progress=False)
    return base, ft, out, tmp_path / "s.delta.safetensors.index.json"


@pytest.mark.parametrize("edit,match", [
    (lambda ix: [ix], "not a deltacomp index"),
    (lambda ix: {**ix, "weight_map": [1]}, "not a deltacomp index"),
    (lambda ix: {**ix, "metadata": {"deltacomp": {"a": 1}}}, "not a deltacomp index"),
    (lambda ix: {**ix, "weight_map": {**ix["weight_map"], UP + ".signs": "../s-00001-of-00002.delta.safetensors"}},
     "outside the folder"),
    (lambda ix: {**ix, "weight_map": {k: v for k, v in list(ix["weight_map"].items())[1:]}}, "does not map"),
    (lambda ix: {**ix, "metadata": {"deltacomp": ix["metadata"]["deltacomp"].replace("hidden_size", "hidden_sizf")}},
     "integrity digest mismatch"),
])
def test_sharded_index_damage(sharded, edit, match):
    _, _, out, idx = sharded
    idx.write_text(json.dumps(edit(json.loads(idx.read_text()))))
    _refused(out, match)


def test_sharded_round_trip_and_missing_shard(sharded):
    base, ft, out, idx = sharded
    shards = sorted(out.parent.glob("s-0*"))
    assert len(shards) > 1
    with deltacomp.load_delta(out) as df:
        assert df.integrity_checked
    shards[-1].unlink()
    _refused(out, "missing or outside the folder")


@pytest.mark.parametrize("content,match", [("[]", "not a valid safetensors index"),
                                           ('{"weight_map": {"a": "../x.safetensors"}}', "outside"),
                                           ('{"weight_map": {"a": 5}}', "not a valid safetensors index")])
def test_model_folder_index_damage(tmp_path, made, content, match):
    from conftest import llama_tensors, write_folder

    base, _, _ = made["bitdelta"]
    ft = write_folder(tmp_path / "ft", llama_tensors(1), shards=2)
    (ft / "model.safetensors.index.json").write_text(content)
    with pytest.raises(deltacomp.CheckpointError, match=match):
        deltacomp.compress(base, ft, tmp_path / "d.delta.safetensors", progress=False)
