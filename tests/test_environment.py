"""The DELTACOMP_* variables: a bad value is one line naming the variable before any work; an unknown name is
a note; the modules that read a setting read it through ``environment.choice``."""

import os
import subprocess
import sys

import pytest
import torch

from deltacomp import environment, ops, plans
from deltacomp.cli.main import main
from deltacomp.errors import SettingsError
from deltacomp.serve import dispatch

RUNTIME = [v for v in environment.VARIABLES.values() if v.values and not v.build_time]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith(environment.PREFIX) and name != "DELTACOMP_CACHE":
            monkeypatch.delenv(name)


@pytest.mark.parametrize("var", RUNTIME, ids=lambda v: v.name)
def test_every_value_is_taken_and_garbage_is_refused(monkeypatch, var):
    for value in var.values:
        monkeypatch.setenv(var.name, value)
        assert environment.choice(var.name) == value
    monkeypatch.setenv(var.name, "")  # empty = unset
    assert environment.choice(var.name) is None
    monkeypatch.setenv(var.name, "garbage")
    with pytest.raises(SettingsError, match=rf"{var.name}='garbage': expected one of {', '.join(var.values)}"):
        environment.choice(var.name)
    with pytest.raises(SettingsError, match=var.name):
        environment.check()


def test_case_and_spaces():
    """Variables only Python reads take any case and spaces; those the C++ kernels read too must be written
    as the kernels compare them, or Python and C++ would disagree on the path."""
    os.environ["DELTACOMP_FUSED"] = " Never "
    try:
        assert dispatch.mode() == "never"
    finally:
        del os.environ["DELTACOMP_FUSED"]
    os.environ["DELTACOMP_ISA"] = "AVX2"
    try:
        with pytest.raises(SettingsError, match="exactly as written"):
            environment.choice("DELTACOMP_ISA")
    finally:
        del os.environ["DELTACOMP_ISA"]


def test_unknown_names_are_notes(monkeypatch):
    monkeypatch.setenv("DELTACOMP_FUSE", "never")
    monkeypatch.setenv("DELTACOMP_SOMETHING_ELSE", "1")
    notes = environment.check()
    assert notes == [
        "note: environment variable DELTACOMP_FUSE is not a deltacomp setting and is ignored "
        "(did you mean DELTACOMP_FUSED?)",
        "note: environment variable DELTACOMP_SOMETHING_ELSE is not a deltacomp setting and is ignored"]


def test_isa_the_cpu_lacks_is_a_note(monkeypatch):
    monkeypatch.setenv("DELTACOMP_ISA", "neon")
    assert environment.check(isa_now=lambda: "avx2") == [
        "note: DELTACOMP_ISA=neon: this CPU or build has no neon path; the kernels take avx2"]
    assert environment.check(isa_now=lambda: "neon") == []
    assert environment.check(isa_now=lambda: "torch") == []  # no extension: nothing to say about paths
    monkeypatch.delenv("DELTACOMP_ISA")
    asked = []
    assert environment.check(isa_now=lambda: asked.append(1) or "avx2") == [] and asked == []


def test_readers_refuse_garbage(monkeypatch):
    """Each module that used to read its variable with os.environ (a garbage value silently meant the default)."""
    from deltacomp import memory, ops_tl
    from deltacomp.codecs.svd_mixed import serving

    cases = [("DELTACOMP_CUDA_KERNELS", ops.cuda_kernels_enabled), ("DELTACOMP_LAYER_PLANS", plans.enabled),
             ("DELTACOMP_FUSED", dispatch.mode), ("DELTACOMP_MALLOC", memory.bounded_malloc)]
    if ops_tl.tables_path():  # the kernel settings are read where the int8 tables are an option
        cases.append(("DELTACOMP_SIGN_KERNEL", ops_tl.sign_tl_wanted))
        cases.append(("DELTACOMP_LOWRANK_KERNEL", lambda: serving.tl4_lists((None,) * 11)))
    monkeypatch.setattr(memory, "_done", False)
    for name, reader in cases:
        monkeypatch.setenv(name, "yes please")
        with pytest.raises(SettingsError, match=f"{name}='yes please'"):
            reader()
        monkeypatch.delenv(name)
    monkeypatch.setenv("DELTACOMP_LAYER_PLANS", "0")
    assert not plans.enabled()
    monkeypatch.setenv("DELTACOMP_CUDA_KERNELS", "0")
    assert not ops.cuda_kernels_enabled()


def test_cli_refuses_a_bad_value_in_one_line_before_work(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("DELTACOMP_SIGN_KERNEL", "exakt")
    out = tmp_path / "never.delta.safetensors"
    assert main(["compress", str(tmp_path / "no-base"), str(tmp_path / "no-ft"), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["deltacomp compress: error: environment variable DELTACOMP_SIGN_KERNEL='exakt': expected one of "
                   "tables, exact, simd, lut8 exactly as written, or unset"]
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_prints_notes_and_goes_on(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("DELTACOMP_LAYER_PLAN", "0")
    assert main(["inspect", str(tmp_path / "missing.delta.safetensors")]) == 2  # the command still runs
    err = capsys.readouterr().err
    assert ("deltacomp inspect: note: environment variable DELTACOMP_LAYER_PLAN is not a deltacomp setting and is "
            "ignored (did you mean DELTACOMP_LAYER_PLANS?)") in err
    assert "no such delta file" in err


def test_patch_model_checks_first(monkeypatch):
    from deltacomp.serve.patch import patch_model

    monkeypatch.setenv("DELTACOMP_LOWRANK_KERNEL", "fast")
    with pytest.raises(SettingsError, match="DELTACOMP_LOWRANK_KERNEL='fast'"):
        patch_model(torch.nn.Linear(4, 4), "never-read.delta.safetensors")


@pytest.mark.parametrize("value", ["yes", "2"])
def test_setup_refuses_a_bad_build_switch(value):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "DELTACOMP_OPENMP": value}
    run = subprocess.run([sys.executable, "setup.py", "--version"], cwd=root, env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1] == (
        f"deltacomp: environment variable DELTACOMP_OPENMP={value!r}: expected 0 or 1, or unset")


def test_readme_lists_every_setting_with_its_values():
    """The README's table names every variable users set (not the tests' own) with exactly its values."""
    import re

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = open(os.path.join(root, "README.md")).read()
    rows = dict(re.findall(r"^\| `(DELTACOMP_\w+)` \| (.*?) \| .* \|$", text, flags=re.M))
    wanted = {v.name: v for v in environment.VARIABLES.values() if not v.what.startswith("tests:")}
    assert set(rows) == set(wanted)
    for name, cell in rows.items():
        values = wanted[name].values
        assert (sorted(re.findall(r"`([^`]+)`", cell)) == sorted(values)) if values else "`" not in cell, name
