"""Method specs, rules, --ratio, and the CLI's exit codes and one-line errors."""
from __future__ import annotations

import json

import pytest

from deltacomp import SettingsError
from deltacomp.cli import main, parse_size
from deltacomp.plan import Plan, parse_method, parse_rule


def test_parse_method():
    assert parse_method("bitdelta") == ("bitdelta", {})
    assert parse_method("BitDelta:masks=2,scale=row") == ("bitdelta", {"masks": "2", "scale": "row"})
    assert parse_method("raw:dtype=bfloat16") == ("raw", {"dtype": "bfloat16"})
    with pytest.raises(SettingsError, match="is not key=value"):
        parse_method("bitdelta:oops")
    with pytest.raises(SettingsError, match="unknown method"):
        parse_method("nope:x=1")


def test_rules_first_match_and_defaults():
    plan = Plan("bitdelta", rules=["mlp\\.=bitdelta:masks=2", "up_proj=raw"])
    assert plan.assign("model.layers.0.mlp.up_proj.weight", (8, 8), 2, False).settings["masks"] == 2
    assert plan.assign("model.layers.0.self_attn.q_proj.weight", (8, 8), 2, False).codec == "bitdelta"
    assert plan.assign("model.embed_tokens.weight", (8, 8), 2, False).codec == "raw"
    assert plan.assign("model.layers.0.input_layernorm.weight", (8,), 2, False).codec == "raw"
    assert plan.assign("model.layers.0.self_attn.q_proj.weight", (8, 8), 2, True).codec == "zero"
    # a user rule wins even on an unchanged tensor
    assert Plan("bitdelta", ["q_proj=raw"]).assign("a.q_proj.weight", (8, 8), 2, True).codec == "raw"
    assert parse_rule("embed_tokens=raw").method == "raw"


def test_ratio_picks_masks():
    # 16-bit weights at 1/4 -> 4 bits per parameter: 4 masks (each 512 sign bytes + a 4-byte scale; the
    # scales may overshoot the 2048-byte budget by one scale per mask) -> 3.97x
    plan = Plan("bitdelta", ratio=4)
    assert plan.assign("x.q_proj.weight", (64, 64), 2, False).settings["masks"] == 4
    assert Plan("bitdelta", ratio=4.5).assign("x.q_proj.weight", (64, 64), 2, False).settings["masks"] == 3
    with pytest.raises(SettingsError, match="below one sign mask"):
        Plan("bitdelta", ratio=32).assign("x.q_proj.weight", (64, 64), 2, False)
    with pytest.raises(SettingsError, match="--ratio must be > 1"):
        Plan("bitdelta", ratio=0.5)


def test_parse_size():
    assert parse_size("5GB") == 5_000_000_000
    assert parse_size("2GiB") == 2 * 1024**3
    assert parse_size("1000") == 1000


def test_cli_end_to_end(tmp_path, pair, capsys):
    base, ft, _, _ = pair
    out = tmp_path / "d.delta.safetensors"
    assert main(["compress", str(base), str(ft), "-o", str(out), "--method", "bitdelta", "-q"]) == 0
    assert "ratio" in capsys.readouterr().out
    assert main(["inspect", str(out), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["format"] == "deltacomp/1" and s["by_codec"]["bitdelta"]["tensors"] == 14
    assert main(["inspect", str(out), "--tensors"]) == 0
    assert "model.layers.0.mlp.up_proj.weight" in capsys.readouterr().out
    assert main(["reconstruct", str(base), str(out), "-o", str(tmp_path / "rec"), "-q"]) == 0
    assert (tmp_path / "rec" / "model.safetensors").is_file()


@pytest.mark.parametrize("argv,msg", [
    (["compress", "{b}", "{f}", "-o", "{o}", "--method", "nope"], "unknown method 'nope'"),
    (["compress", "{b}", "/nonexistent", "-o", "{o}"], "/nonexistent: no such file or folder"),
    (["inspect", "/nonexistent.delta.safetensors"], "no such delta file"),
])
def test_cli_errors_are_one_line(tmp_path, pair, capsys, argv, msg):
    base, ft, _, _ = pair
    argv = [a.format(b=base, f=ft, o=tmp_path / "o.delta.safetensors") for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and "\n" not in err and "Traceback" not in err


def test_ratio_and_explicit_size_setting_conflict():
    with pytest.raises(SettingsError, match="masks= and --ratio both fix the size"):
        Plan("bitdelta:masks=2", ratio=4).assign("x.q_proj.weight", (64, 64), 2, False)


def test_bitdelta_ratio_16_is_one_mask(tmp_path, pair):
    import deltacomp

    base, ft, _, _ = pair
    assert Plan("bitdelta", ratio=16).assign("x.q_proj.weight", (576, 576), 2, False).settings["masks"] == 1
    s = deltacomp.compress(base, ft, tmp_path / "d.delta.safetensors", method="bitdelta", ratio=16,
                           progress=False)
    assert 15.8 <= s["compressed_tensors"]["ratio"] < 16  # tiny tensors: 4 scale bytes on 768
