"""Inputs a careless user gives (NaN weights, mismatched pairs, fp8) and the promises about outputs: one
line and exit 2 for user and environment errors, nothing half-written, no silent double writes, stale
temporary files cleaned, normal permissions."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import deltacomp
from deltacomp import CheckpointError, OutputExistsError
from deltacomp.cli import main
from deltacomp.errors import NonFiniteError, OutputBusyError
from deltacomp.storage import OutputLock
from conftest import finetune_of, llama_config, llama_tensors, write_folder
from forge import edit_metadata

ROOT = Path(__file__).resolve().parent.parent
UP = "model.layers.0.mlp.up_proj.weight"


def _bits(t):
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


# -- non-finite weights --------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["finetune", "base"])
def test_nonfinite_refused_naming_tensor(tmp_path, where):
    b = llama_tensors(0)
    f = finetune_of(b, 1)
    bad = f if where == "finetune" else b
    bad[UP] = bad[UP].clone()
    bad[UP][3, 5] = float("nan")
    bad[UP][4, 1] = float("inf")
    base, ft = write_folder(tmp_path / "b", b), write_folder(tmp_path / "f", f)
    out = tmp_path / "d.delta.safetensors"
    with pytest.raises(NonFiniteError, match=f"{UP}: 2 of 6144 values are NaN or Inf.*--allow-nonfinite"):
        deltacomp.compress(base, ft, out, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "f"]


def test_refused_run_takes_back_the_folders_it_made(tmp_path):
    """A run refused mid-way (a NaN in the second layer) into folders that did not exist leaves no empty
    folders behind; folders that were there before stay, and a run that writes keeps the ones it made."""
    b = llama_tensors(0)
    f = finetune_of(b, 1)
    f["model.layers.1.mlp.up_proj.weight"] = f["model.layers.1.mlp.up_proj.weight"].clone()
    f["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    base, ft = write_folder(tmp_path / "b", b), write_folder(tmp_path / "f", f)
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "other.txt").write_text("not ours")
    for out in (tmp_path / "new" / "deeper" / "d.delta.safetensors",
                tmp_path / "kept" / "new" / "d.delta.safetensors"):
        with pytest.raises(NonFiniteError, match="model.layers.1.mlp.up_proj.weight"):
            deltacomp.compress(base, ft, out, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "f", "kept"]
    assert [p.name for p in (tmp_path / "kept").iterdir()] == ["other.txt"]
    good = write_folder(tmp_path / "g", finetune_of(b, 1))
    out = tmp_path / "new" / "deeper" / "d.delta.safetensors"
    deltacomp.compress(base, good, out, progress=False)
    assert sorted(p.name for p in out.parent.iterdir()) == ["d.delta.safetensors"]


@pytest.mark.parametrize("method", ["bitdelta", "ternary:scope=global:scale=std:1.0"])
def test_allow_nonfinite_stores_whole_and_exact(tmp_path, method):
    b = llama_tensors(0)
    f = finetune_of(b, 1)
    f[UP] = f[UP].clone()
    f[UP][3, 5] = float("nan")
    base, ft = write_folder(tmp_path / "b", b), write_folder(tmp_path / "f", f)
    out = tmp_path / "d.delta.safetensors"
    deltacomp.compress(base, ft, out, method=method, progress=False, allow_nonfinite=True)
    rec = dict(deltacomp.iter_reconstructed(base, out))
    assert torch.equal(_bits(rec[UP]), _bits(f[UP]))  # NaN where it was, nothing else touched
    assert torch.isfinite(rec["model.layers.1.mlp.up_proj.weight"].float()).all()


# -- pairs that are not a base and its fine-tune ----------------------------------------------------
def test_finetune_missing_tensor(tmp_path, pair):
    base, _, b, f = pair
    f = dict(f)
    del f[UP]
    ft = write_folder(tmp_path / "f2", f)
    out = tmp_path / "d.delta.safetensors"
    with pytest.raises(CheckpointError, match=f"lacks 1 base tensor.*{UP}.*--allow-mismatch"):
        deltacomp.compress(base, ft, out, progress=False)
    with pytest.warns(UserWarning, match="lacks 1 base tensor"):
        deltacomp.compress(base, ft, out, progress=False, allow_mismatch=True)


def test_other_architecture(tmp_path, pair):
    base, _, b, f = pair
    cfg = {**llama_config(), "model_type": "mistral", "architectures": ["MistralForCausalLM"]}
    ft = write_folder(tmp_path / "f2", f, config=cfg)
    with pytest.raises(CheckpointError, match="model_type is 'mistral' in the fine-tune, 'llama' in the base"):
        deltacomp.compress(base, ft, tmp_path / "d.delta.safetensors", progress=False)


def test_nothing_in_common(tmp_path, pair):
    base, _, _, _ = pair
    ft = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file({"foo.weight": torch.zeros(3, 3)}, str(ft))
    with pytest.raises(CheckpointError, match="no tensor of the fine-tune pairs"):
        deltacomp.compress(base, ft, tmp_path / "d.delta.safetensors", progress=False)


def test_no_config_warns(tmp_path, pair):
    base, ft, _, _ = pair
    (ft / "config.json").unlink()
    with pytest.warns(UserWarning, match="no config.json to carry"):
        deltacomp.compress(base, ft, tmp_path / "d.delta.safetensors", progress=False)


def test_fp8_finetune_refused_before_writing(tmp_path, pair):
    base, _, b, f = pair
    f = dict(f)
    f[UP] = f[UP].to(torch.float8_e4m3fn)
    ft = write_folder(tmp_path / "f8", f)
    out = tmp_path / "d.delta.safetensors"
    with pytest.raises(CheckpointError, match=f"{UP}: dtype float8_e4m3fn cannot be stored"):
        deltacomp.compress(base, ft, out, progress=False)
    assert not out.exists() and not list(tmp_path.glob(".d.delta*"))


# -- outputs ---------------------------------------------------------------------------------------
def test_second_writer_refused_while_first_holds_lock(tmp_path, pair):
    base, ft, _, _ = pair
    out, rec = tmp_path / "d.delta.safetensors", tmp_path / "rec"
    locks = [OutputLock(out), OutputLock(rec)]
    try:
        with pytest.raises(OutputBusyError, match="another deltacomp run is writing it"):
            deltacomp.compress(base, ft, out, progress=False)
        deltacomp.compress(base, ft, tmp_path / "e.delta.safetensors", progress=False)
        with pytest.raises(OutputBusyError, match="rec: another deltacomp run"):
            deltacomp.reconstruct(base, tmp_path / "e.delta.safetensors", rec, progress=False)
    finally:
        for lock in locks:
            lock.release()
    deltacomp.compress(base, ft, out, progress=False)
    deltacomp.reconstruct(base, out, rec, progress=False)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".lock")]


def test_killed_run_leaves_nothing_and_next_run_cleans(tmp_path, pair):
    base, ft, _, _ = pair
    out = tmp_path / "d.delta.safetensors"
    script = textwrap.dedent(f"""
        import os, signal, torch
        from deltacomp.delta_file import DeltaWriter, ParamInfo
        w = DeltaWriter({str(out)!r})
        w.add(ParamInfo("a", "raw", (4,), "float32"), {{"values": torch.zeros(4)}})
        w._buffer.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    r = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == -9
    assert not out.exists()
    stale = [p.name for p in tmp_path.iterdir() if p.name.startswith(".d.delta")]
    assert stale and all(".tmp-" in n or n.endswith(".lock") for n in stale)
    deltacomp.compress(base, ft, out, progress=False)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".d.delta")]


def test_killed_reconstruct_cleaned_by_next_run(tmp_path, pair):
    base, ft, _, _ = pair
    out = tmp_path / "d.delta.safetensors"
    deltacomp.compress(base, ft, out, progress=False)
    (tmp_path / ".rec.tmp-dead").mkdir()
    (tmp_path / ".rec.tmp-dead" / "model.safetensors").write_bytes(b"half")
    deltacomp.reconstruct(base, out, tmp_path / "rec", progress=False)
    assert not (tmp_path / ".rec.tmp-dead").exists()
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "rec").stat().st_mode & 0o777 == 0o777 & ~umask


def test_file_size_limit_is_one_line(tmp_path, pair):
    base, ft, _, _ = pair
    out = tmp_path / "d.delta.safetensors"
    limit = textwrap.dedent("""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        from deltacomp.cli import main
        sys.exit(main(sys.argv[1:]))
    """)
    r = subprocess.run([sys.executable, "-c", limit, "compress", str(base), str(ft), "-o", str(out), "-q",
                        "--method", "bitdelta"],
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    lines = [ln for ln in r.stderr.splitlines() if "Warning" not in ln and ln.strip() and not ln.startswith(" ")]
    assert r.returncode == 2, r.stderr
    assert lines == [lines[0]] and lines[0].startswith("deltacomp compress: error: ")
    assert "File too large" in lines[0] and str(tmp_path) in lines[0] and "ulimit" in lines[0]
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".d.delta")]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_is_one_line(tmp_path, pair, capsys):
    base, ft, _, _ = pair
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert main(["compress", str(base), str(ft), "-o", str(ro / "d.delta.safetensors"), "-q"]) == 2
    finally:
        ro.chmod(0o755)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Permission denied" in err[0] and str(ro) in err[0]


def test_cli_damaged_file_one_line_exit_2(tmp_path, pair, capsys):
    base, ft, _, _ = pair
    out = tmp_path / "d.delta.safetensors"
    deltacomp.compress(base, ft, out, method="bitdelta", progress=False)
    edit_metadata(out, lambda m: m["params"][UP].update(shape=[96, 72]), reseal=True)
    for argv in (["inspect", str(out), "--no-verify"], ["reconstruct", str(base), str(out), "-o", str(tmp_path / "r")]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"deltacomp {argv[0]}: error: {out}: {UP}.signs")
    assert not (tmp_path / "r").exists()


def test_cli_unexpected_error_exit_1_and_debug(tmp_path, pair, capsys, monkeypatch):
    from deltacomp import api

    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(api, "compress", boom)
    argv = ["compress", "b", "f", "-o", str(tmp_path / "x.delta.safetensors")]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "internal error (RuntimeError: boom)" in err[0] and "--debug" in err[0]
    assert main(argv + ["--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_existing_output_appearing_during_run_not_replaced(tmp_path, pair, monkeypatch):
    base, ft, _, _ = pair
    out = tmp_path / "d.delta.safetensors"
    from deltacomp import delta_file

    real = delta_file._verify_written

    def meanwhile(path):
        real(path)
        out.write_bytes(b"someone else's")

    monkeypatch.setattr(delta_file, "_verify_written", meanwhile)
    with pytest.raises(OutputExistsError, match="appeared while this run was writing"):
        deltacomp.compress(base, ft, out, progress=False)
    assert out.read_bytes() == b"someone else's"


def test_disk_full_is_one_line_and_leaves_nothing(tmp_path, pair, capsys, monkeypatch):
    """A full disk while a shard is assembled reaches the user as one line naming the file."""
    import errno

    from deltacomp import tensorio

    base, ft, _, _ = pair

    def full(src, dst, offset, nbytes, path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(tensorio, "_copy", full)
    out = tmp_path / "d.delta.safetensors"
    assert main(["compress", str(base), str(ft), "-o", str(out), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device; the disk is full" in err[0] and str(tmp_path) in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "ft"]
    deltacomp_rec = tmp_path / "rec"
    monkeypatch.undo()
    deltacomp.compress(base, ft, out, progress=False)
    monkeypatch.setattr(tensorio, "_copy", full)
    assert main(["reconstruct", str(base), str(out), "-o", str(deltacomp_rec), "-q"]) == 2
    assert "the disk is full" in capsys.readouterr().err
    assert not deltacomp_rec.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".rec")]


def test_fp8_base_is_accepted(tmp_path):
    """A base stored in float8 (a fine-tune may not be: the file stores the fine-tune's dtype)."""
    b = llama_tensors(0)
    f = finetune_of(b, 1)
    b8 = {k: (v.to(torch.float8_e4m3fn) if "mlp" in k else v) for k, v in b.items()}
    base, ft = write_folder(tmp_path / "b", b8), write_folder(tmp_path / "f", f)
    out = tmp_path / "d.delta.safetensors"
    deltacomp.compress(base, ft, out, method="raw", progress=False)
    rec = dict(deltacomp.iter_reconstructed(base, out))
    assert all(torch.allclose(rec[k].float(), f[k].float(), atol=1e-2) for k in f)
