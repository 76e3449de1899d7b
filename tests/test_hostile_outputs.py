"""Outputs that would destroy something: an input of the same run (``--overwrite`` or not), a device or
pipe at the output name (a rename over ``/dev/null`` would replace the device for every program), a
folder output that holds the inputs. Each is refused before any work, with one line."""
from __future__ import annotations

import os
import shutil
import stat

import pytest

import deltacomp
from deltacomp import lora
from deltacomp.cli import main
from deltacomp.errors import OutputExistsError, OutputIsInputError
from conftest import finetune_of, llama_tensors, write_folder


@pytest.fixture
def made(tmp_path):
    b = llama_tensors(0, tied=False)
    base = write_folder(tmp_path / "base", b)
    ft = write_folder(tmp_path / "ft", finetune_of(b, 1))
    delta = tmp_path / "d.delta.safetensors"
    deltacomp.compress(base, ft, delta, method="lowrank", progress=False)
    return base, ft, delta


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize("which", ["base", "ft"])
def test_compress_output_is_an_input_file(made, which):
    base, ft, _ = made
    target = (base if which == "base" else ft) / "model.safetensors"
    before = target.read_bytes()
    for overwrite in (False, True):
        with pytest.raises(OutputExistsError, match="is an input of this run|exists; pass --overwrite"):
            deltacomp.compress(base, ft, target, progress=False, overwrite=overwrite)
    with pytest.raises(OutputIsInputError, match=f"{target}: is an input of this run.*choose another output"):
        deltacomp.compress(base, ft, target, progress=False, overwrite=True)
    assert target.read_bytes() == before


def test_compress_output_is_an_input_by_another_name(made, tmp_path):
    base, ft, _ = made
    link = tmp_path / "alias.delta.safetensors"
    os.link(ft / "config.json", link)  # a hard link: the same file under a delta's name
    with pytest.raises(OutputIsInputError, match="is an input"):
        deltacomp.compress(base, ft, link, progress=False, overwrite=True)


def test_reconstruct_over_its_inputs_refused(made, tmp_path):
    base, ft, delta = made
    before = _snapshot(base)
    for out in (base, tmp_path, delta):  # the base folder, a folder holding base and delta, the delta itself
        with pytest.raises(OutputExistsError, match="input of this run|not a folder"):
            deltacomp.reconstruct(base, delta, out, progress=False, overwrite=True)
    assert _snapshot(base) == before and delta.is_file()
    deltacomp.reconstruct(base, delta, tmp_path / "rec", progress=False)  # a new folder beside them is fine
    deltacomp.reconstruct(base, delta, tmp_path / "rec", progress=False, overwrite=True)


def test_export_lora_over_its_inputs_refused(made, tmp_path):
    base, ft, delta = made
    before = _snapshot(ft)
    with pytest.raises(OutputIsInputError, match="holds an input"):
        lora.export_lora(base, ft, ft, rank=4, overwrite=True, progress=False)
    with pytest.raises(OutputIsInputError, match="holds an input"):
        lora.export_lora_from_delta(delta, tmp_path, overwrite=True)
    assert _snapshot(ft) == before and delta.is_file()


def test_device_or_pipe_at_output_never_replaced(made, tmp_path, capsys):
    base, ft, delta = made
    pipe, pipe_dir = tmp_path / "p.delta.safetensors", tmp_path / "pdir"
    os.mkfifo(pipe)
    os.mkfifo(pipe_dir)
    with pytest.raises(OutputExistsError, match="device, pipe or socket"):
        deltacomp.compress(base, ft, pipe, progress=False, overwrite=True)
    with pytest.raises(OutputExistsError, match="device, pipe or socket"):
        deltacomp.reconstruct(base, delta, pipe_dir, progress=False, overwrite=True)
    assert main(["compress", str(base), str(ft), "-o", str(pipe), "-q", "--overwrite"]) == 2
    assert "device, pipe or socket" in capsys.readouterr().err
    assert stat.S_ISFIFO(os.lstat(pipe).st_mode) and stat.S_ISFIFO(os.lstat(pipe_dir).st_mode)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".p.", ".pdir"))]


def test_compress_many_output_over_an_input_refused(made, tmp_path):
    base, ft, _ = made
    from deltacomp.many import compress_many

    shutil.copy(ft / "config.json", tmp_path / "keep.json")
    # the output for fine-tune "model" would be written over the base's own weight file
    (tmp_path / "model.delta.safetensors").symlink_to(base / "model.safetensors")
    with pytest.raises(OutputIsInputError, match="is an input"):
        compress_many(base, {"model": ft}, tmp_path, overwrite=True, progress=False)
    assert (base / "model.safetensors").is_file() and (tmp_path / "model.delta.safetensors").is_symlink()


def test_eval_json_over_an_input_refused_before_running(made, tmp_path, capsys):
    base, ft, delta = made
    before = delta.read_bytes()
    text = tmp_path / "t.txt"
    text.write_text("w5 w6 w7 " * 20)
    assert main(["eval", str(base), str(ft), str(delta), "--text", str(text), "--json", str(delta), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is an input of this run" in err[0]
    assert delta.read_bytes() == before
    assert main(["eval", str(base), str(ft), str(delta), "--text", str(text), "--json", str(tmp_path), "-q"]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_inspect_plot_output_checked(made, tmp_path, capsys):
    """--plot over the delta being inspected is refused; a folder or a bare name is refused (matplotlib
    would write NAME.png beside it while we said we wrote NAME)."""
    pytest.importorskip("matplotlib")
    _, _, delta = made
    before = delta.read_bytes()
    for plot, want in ((delta, "is an input of this run"), (tmp_path, "image extension"),
                       (tmp_path / "layers", "image extension")):
        assert main(["inspect", str(delta), "--plot", str(plot)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and want in err[0], err
    assert delta.read_bytes() == before and not list(tmp_path.glob("*.png"))
    assert main(["inspect", str(delta), "--plot", str(tmp_path / "layers.png")]) == 0
    assert (tmp_path / "layers.png").is_file()


def test_atomic_text_write_leaves_no_temporary(tmp_path):
    from deltacomp.storage import write_text_atomic

    (tmp_path / "out.json").mkdir()
    (tmp_path / "out.json" / "x").write_text("keep")
    with pytest.raises(OutputExistsError, match="is a folder"):
        write_text_atomic(tmp_path / "out.json", "{}")
    target = tmp_path / "sub" / "r.json"
    with pytest.raises(OSError):
        write_text_atomic(target, "{}")  # no such folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


@pytest.mark.parametrize("below", ["x.delta.safetensors", "sub/x.delta.safetensors"])
def test_output_inside_a_file_names_that_file(made, tmp_path, capsys, below):
    base, ft, delta = made
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    assert main(["compress", str(base), str(ft), "-o", str(blocker / below), "-q"]) == 2
    assert main(["reconstruct", str(base), str(delta), "-o", str(blocker / "rec"), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"deltacomp {c}: error: {blocker}: is a file, so the output cannot be a folder or go inside "
                   "it; choose another output path" for c in ("compress", "reconstruct")]
    assert blocker.read_text() == "not a folder"
