"""tl4_pack: the TL4 repack of 1- and 2-bit codes in C++ (csrc/cpu/tl4_pack.cpp, ``ops_tl.pack_tl4``,
``ops_tl.pack_tl4_u``) against quant/tl4.py's torch version, byte for byte: random streams (their padding
bits random too), both bit widths, ranks 0, 1 and across tiles of 32, K across chunks of 128 and RTN groups
(odd group and chunk counts, a group wider than the row), U^T across chunks of the rank, a layer of a 7B
model's width, one and two threads; the errors of unsupported groups unchanged; the op's own checks;
opcheck; serving's lists built by the op."""
import itertools

import pytest
import torch

from deltacomp import ops, ops_tl
from deltacomp.codecs.svd_mixed import allocation as al
from deltacomp.codecs.svd_mixed.serving import tl4_lists
from deltacomp.quant import tl4

from test_ops_lowrank import _gen, needs_ext
from test_ops_lowrank_groups import _groups


def _stream(count: int, bits: int, seed: int) -> torch.Tensor:
    """A KBITS stream of ``count`` codes: random bytes, the unused bits of the last one included."""
    return torch.randint(0, 256, ((count * bits + 7) // 8,), generator=_gen(seed), dtype=torch.uint8)


def _scales(rows: int, groups: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, groups, generator=_gen(seed)).half()


def _same(got: tuple, want: tuple, what: str) -> None:
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a.dtype == b.dtype and torch.equal(a, b), f"{what}: output {i} differs"


@needs_ext
@pytest.mark.parametrize("bits", (1, 2))
def test_v_matches_reference(bits):
    for r, k, gs in itertools.product((0, 1, 2, 31, 32, 33, 65), (0, 1, 3, 4, 7, 128, 129, 300, 517),
                                      (4, 8, 12, 100, 128, 132, 1024)):
        seed = r * 1000 + k * 7 + gs
        vq, vs = _stream(r * k, bits, seed), _scales(r, (k + gs - 1) // gs, seed)
        _same(ops_tl.pack_tl4(vq, vs, bits, k, gs), tl4.pack_tl4(vq, vs, bits, k, gs),
              f"V {bits} bits r={r} k={k} gs={gs}")


@needs_ext
@pytest.mark.parametrize("bits", (1, 2))
def test_u_matches_reference(bits):
    for n, r, gs in itertools.product((1, 2, 31, 32, 33, 100, 300), (1, 2, 5, 127, 128, 129, 300), (32, 64, 256)):
        seed = n * 1000 + r * 7 + gs
        groups = (n + gs - 1) // gs
        uq, us, uz = _stream(r * n, bits, seed), _scales(r, groups, seed), _scales(r, groups, seed + 1)
        _same(ops_tl.pack_tl4_u(uq, us, uz, bits, n, gs), tl4.pack_tl4_u(uq, us, uz, bits, n, gs),
              f"U {bits} bits n={n} r={r} gs={gs}")


@needs_ext
@pytest.mark.parametrize("bits", (1, 2))
def test_layer_of_7b_width_and_threads(bits):
    """A 4096 x 11008 layer with svd-mixed's 16x allocation (its 2-bit group's rank, 1271), at one thread
    and two: the same bytes as the reference."""
    n, k, gs = 4096, 11008, 128
    r = dict(al.default_allocation((n, k), n * k * 2 // 16, gs))[2]
    vq, vs = _stream(r * k, bits, 1), _scales(r, k // gs, 1)
    uq, us, uz = _stream(r * n, bits, 2), _scales(r, n // gs, 2), _scales(r, n // gs, 3)
    want = tl4.pack_tl4(vq, vs, bits, k, gs), tl4.pack_tl4_u(uq, us, uz, bits, n, gs)
    threads = torch.get_num_threads()
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            _same(ops_tl.pack_tl4(vq, vs, bits, k, gs), want[0], f"V, {t} threads")
            _same(ops_tl.pack_tl4_u(uq, us, uz, bits, n, gs), want[1], f"U, {t} threads")
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("pack", (ops_tl.pack_tl4, tl4.pack_tl4))
def test_errors_unchanged(pack):
    """The wrapper refuses what the reference refuses, with the same errors (before the op sees it)."""
    args, _ = _groups((3,), (4,), 5, 16, 8, seed=1)
    with pytest.raises(ValueError, match="no TL4 layout of V for 3-bit codes with group_size 8"):
        pack(args[0][0], args[1][0], 3, 16, 8)
    args, _ = _groups((2,), (4,), 5, 16, 6, seed=1)
    with pytest.raises(ValueError, match="needs 1 or 2 bits and group_size % 4 == 0"):
        pack(args[0][0], args[1][0], 2, 16, 6)
    with pytest.raises(ValueError, match=r"unpack_bits: 64 codes of 2 bits need 16 bytes, got 15"):
        pack(args[0][0][:-1], args[1][0], 2, 16, 8)
    pack_u = ops_tl.pack_tl4_u if pack is ops_tl.pack_tl4 else tl4.pack_tl4_u
    with pytest.raises(ValueError, match="no TL4 layout of U for 2-bit codes with group_size 16"):
        pack_u(args[3][0], args[4][0], args[5][0], 2, 5, 16)
    empty, _ = _groups((2,), (0,), 5, 16, 32, seed=1)
    with pytest.raises(ValueError, match="no TL4 layout of U for 2-bit codes with group_size 32"):
        pack_u(empty[3][0], empty[4][0], empty[5][0], 2, 5, 32)  # rank 0: no U^T layout


@needs_ext
def test_op_checks_carry_values():
    f = torch.ops.deltacomp.tl4_pack
    q = torch.zeros(6, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="tl4_pack: no TL4 layout for 3-bit codes"):
        f(torch.zeros(9, dtype=torch.uint8), 3, 3, 8, 4, False)
    with pytest.raises(RuntimeError, match="tl4_pack: 3 x 16 codes of 2 bits need 12 bytes, but q has 6"):
        f(q, 2, 3, 16, 4, False)
    with pytest.raises(RuntimeError, match="tl4_pack: group_size must be >= 1, got 0"):
        f(q, 2, 3, 8, 0, False)
    with pytest.raises(RuntimeError, match="tl4_pack: q must be uint8, got Int"):
        f(q.int(), 2, 3, 8, 4, False)
    with pytest.raises(RuntimeError, match="tl4_pack: q must be 1-D"):
        f(q.reshape(2, 3), 2, 3, 8, 4, False)


@needs_ext
def test_opcheck():
    for bits, rows, length, gs, transposed in ((2, 33, 300, 128, False), (1, 40, 7, 4, False), (2, 45, 5, 5, True),
                                               (1, 1, 129, 129, True), (2, 0, 10, 4, False)):
        q = _stream(rows * length, bits, rows + length)
        torch.library.opcheck(torch.ops.deltacomp.tl4_pack.default, (q, bits, rows, length, gs, transposed))


def test_other_devices_take_the_reference(monkeypatch):
    """Only CPU codes go to the op (CUDA has no TL path): anything else is the torch version's."""
    q = _stream(64, 2, 0)
    assert not ops_tl._tl4_native(q.to("meta"), 2, 64)
    assert not ops_tl._tl4_native(q[:-1], 2, 64)  # the wrong size: the reference's error
    assert ops_tl._tl4_native(q, 2, 64) == ops.HAS_EXTENSION
    if torch.cuda.is_available():
        vs = _scales(4, 2, 0)
        got = ops_tl.pack_tl4(q.cuda(), vs.cuda(), 2, 16, 8)
        assert got[0].is_cuda and got[1].is_cuda
        _same(tuple(t.cpu() for t in got), tl4.pack_tl4(q, vs, 2, 16, 8), "CUDA")


@needs_ext
def test_serving_lists_are_the_reference(monkeypatch):
    """svd-mixed's serving term builds its lists with the op: the reference's bytes."""
    monkeypatch.setenv("DELTACOMP_ISA", "avx2")
    monkeypatch.delenv("DELTACOMP_LOWRANK_KERNEL", raising=False)
    if ops.cpu_isa() != "avx2":
        pytest.skip("no AVX2 on this CPU")
    args, _ = _groups((8, 3, 2, 1), (2, 5, 40, 9), 64, 1000, 32, seed=4)
    calls = []
    real = torch.ops.deltacomp.tl4_pack
    monkeypatch.setattr(torch.ops.deltacomp, "tl4_pack", lambda *a: calls.append(a[1:]) or real(*a), raising=False)
    got = tl4_lists((*args, 64, 1000, 32))
    assert calls == [(2, 40, 1000, 32, False), (2, 64, 40, 40, True), (1, 9, 1000, 32, False), (1, 64, 9, 9, True)]
    for g, b in ((2, 2), (3, 1)):
        want = (*tl4.pack_tl4(args[0][g], args[1][g], b, 1000, 32),
                *tl4.pack_tl4_u(args[3][g], args[4][g], args[5][g], b, 64, 32))
        _same(tuple(lst[g] for lst in got), want, f"group {g}")
