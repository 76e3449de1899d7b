"""TL4: a run-time layout of svd-mixed's V codes (1 and 2 bits) for stage 1 at one x row by int8 lookup
tables and ``vpshufb`` (csrc/cpu/lowrank_tl_avx2.cpp). Built once per layer at load time from the
stored KBITS stream (``pack_tl4``: the torch reference; serving calls ``ops_tl.pack_tl4``, the same bytes by
the C++ op ``tl4_pack``, csrc/cpu/tl4_pack.cpp); never written to a file.

Layout, for r V rows of k codes of B bits (B = 1, 2) and RTN group size gs (a multiple of 4):

  positions: each RTN group [g*gs, min(k, (g+1)*gs)) is cut into chunks of at most CHUNK = 128
      positions; a chunk of len positions is ceil(len / 4) position groups of 4 consecutive positions,
      padded with empty position groups to an even count (``chunk_groups``). P = the row's position
      groups in order (``row_groups``). A position past a chunk's end (or past k) holds code 0.
  tiles: rows in tiles of ROWS = 32 (rows past r: codes 0, scales 0). The nibble of row j, plane b
      (bit b of the codes), position group p = sum over t < 4 of bit b of code(j, 4p + t) << t.
  ``v_tl`` uint8 (tiles * P * 16 * B,): tile after tile, each P * 16 * B bytes:
      B = 2: per position group p, 32 bytes; byte 16L + 2e + h (L < 2, e < 8, plane h < 2) holds, in its
             low nibble, row 8L + e of the tile and in its high nibble row 16 + 8L + e (plane h, group p);
      B = 1: per pair of position groups (2s, 2s + 1), 32 bytes; byte 16L + 2e + h holds row
             16h + 8L + e of the tile at group 2s (low nibble) and 2s + 1 (high nibble).
  ``v_tl_scale`` fp16 (tiles, ceil(k / gs), 32): v_scale of row 32 * tile + i, group g at [tile, g, i].

U^T of a group (stage 3, ``pack_tl4_u``; gs a multiple of 32) takes the same layout for the (n, r) matrix
of U's codes: the output columns are the rows (tiles of 32 columns, each inside one RTN group of U^T)
and the rank is the positions, as one RTN group of r.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .bitpack import unpack_bits

ROWS = 32
CHUNK = 128


def supports(bits: int, group_size: int) -> bool:
    """Whether a group of this width and RTN group size has a TL4 layout."""
    return bits in (1, 2) and group_size % 4 == 0


def chunk_groups(length: int) -> int:
    """Position groups a chunk of ``length`` positions takes (rounded up to even)."""
    return ((length + 3) // 4 + 1) // 2 * 2


def _positions(k: int, gs: int) -> Tensor:
    """Position of each of the row's P * 4 slots, -1 for a padding slot."""
    out = []
    for g0 in range(0, k, gs):
        g1 = min(k, g0 + gs)
        for c0 in range(g0, g1, CHUNK):
            n = min(CHUNK, g1 - c0)
            out.append(torch.arange(c0, c0 + n))
            out.append(torch.full((chunk_groups(n) * 4 - n,), -1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def row_groups(k: int, gs: int) -> int:
    """P: the position groups of one row."""
    return sum(chunk_groups(min(CHUNK, min(k, g0 + gs) - c0)) for g0 in range(0, k, gs)
               for c0 in range(g0, min(k, g0 + gs), CHUNK))


def _codes(q: Tensor, bits: int, count: int) -> Tensor:
    """``unpack_bits`` for 1- and 2-bit codes, a shift per code in a byte (4x faster: load time)."""
    if q.dtype != torch.uint8 or q.dim() != 1 or q.numel() != (count * bits + 7) // 8:
        return unpack_bits(q, bits, count)  # its checks and errors
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
    return ((q[:, None] >> shifts) & ((1 << bits) - 1)).reshape(-1)[:count]


def _pack_codes(codes: Tensor, bits: int, gs: int) -> Tensor:
    """The TL4 bytes of a (rows, k) uint8 code matrix (see the module docstring)."""
    rows, k = codes.shape
    tiles = (rows + ROWS - 1) // ROWS
    padded = torch.zeros(tiles * ROWS, k + 1, dtype=torch.uint8)  # column k: the code-0 padding slot
    padded[:rows, :k] = codes
    pos = _positions(k, gs)
    p = pos.numel() // 4  # explicit (not -1): no rows or no positions make empty tensors
    slots = padded[:, torch.where(pos < 0, k, pos)].reshape(tiles, ROWS, p, 4)  # (tiles, 32, P, 4)
    w = torch.tensor([1, 2, 4, 8], dtype=torch.uint8)
    nib = [((slots >> b) & 1).mul(w).sum(-1, dtype=torch.uint8) for b in range(bits)]  # (tiles, 32, P) each
    if bits == 2:  # rows 32 = (half a, lane L, e); bytes (P, L, e, h), half a=0 low nibble, a=1 high
        n = torch.stack(nib).reshape(2, tiles, 2, 2, 8, p)  # (h, tile, a, L, e, P)
        byte = n[:, :, 0] | (n[:, :, 1] << 4)  # (h, tile, L, e, P)
        out = byte.permute(1, 4, 2, 3, 0)  # (tile, P, L, e, h)
    else:  # rows 32 = (h, L, e); P = (s, pair): low nibble group 2s, high 2s + 1
        n = nib[0].reshape(tiles, 2, 2, 8, p // 2, 2)  # (tile, h, L, e, s, pair)
        byte = n[..., 0] | (n[..., 1] << 4)  # (tile, h, L, e, s)
        out = byte.permute(0, 4, 2, 3, 1)  # (tile, s, L, e, h)
    return out.contiguous().reshape(-1)


def check(what: str, bits: int, group_size: int, ok: bool) -> None:
    """The ValueError of a group with no TL4 layout of ``what`` ("V" or "U"; ``ok``: ``supports``/``supports_u``)."""
    if not ok:
        raise ValueError(f"tl4: no TL4 layout of {what} for {bits}-bit codes with group_size {group_size} (needs "
                         f"1 or 2 bits and group_size % {4 if what == 'V' else 32} == 0)")


def tile_scales(v_scale: Tensor) -> Tensor:
    """v_tl_scale: fp16 (tiles, groups, 32) of ``v_scale`` (r, groups), rows past r zero."""
    r, groups = v_scale.shape
    tiles = (r + ROWS - 1) // ROWS
    scale = torch.zeros(tiles * ROWS, groups, dtype=torch.float16)
    scale[:r] = v_scale.cpu()
    return scale.reshape(tiles, ROWS, groups).transpose(1, 2).contiguous().to(v_scale.device)


def pack_tl4(v_q: Tensor, v_scale: Tensor, bits: int, k: int, group_size: int) -> tuple[Tensor, Tensor]:
    """(v_tl, v_tl_scale) of one group's V (KBITS ``v_q`` of r * k codes, fp16 ``v_scale`` (r, groups)).
    In torch: the reference of the C++ repack ``ops_tl.pack_tl4``, which serving uses."""
    check("V", bits, group_size, supports(bits, group_size))
    r = v_scale.shape[0]
    codes = _codes(v_q.cpu(), bits, r * k).reshape(r, k)
    return _pack_codes(codes, bits, group_size).to(v_q.device), tile_scales(v_scale)


def supports_u(bits: int, group_size: int, r: int) -> bool:
    """Whether a group's U^T has a TL4 layout (its column tiles of 32 inside the RTN groups)."""
    return bits in (1, 2) and group_size % ROWS == 0 and r > 0


def pack_tl4_u(u_q: Tensor, u_scale: Tensor, u_zero: Tensor, bits: int, n: int,
               group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """(u_tl, u_tl_scale, u_tl_zero) of one group's U^T (KBITS ``u_q`` of r * n codes, fp16 (r, groups)
    scales and zeros): the TL4 bytes of the (n, r) matrix U (the output columns as rows, the rank as the
    positions, one RTN group of r), and the scales and zeros transposed to (groups, r). In torch: the
    reference of ``ops_tl.pack_tl4_u``."""
    r = u_scale.shape[0]
    check("U", bits, group_size, supports_u(bits, group_size, r))
    codes = _codes(u_q.cpu(), bits, r * n).reshape(r, n).T
    return (_pack_codes(codes, bits, r).to(u_q.device), u_scale.T.contiguous(), u_zero.T.contiguous())


def unpack_tl4(v_tl: Tensor, bits: int, r: int, k: int, group_size: int) -> Tensor:
    """Inverse of pack_tl4's codes: (r, k) uint8 (for tests)."""
    tiles = (r + ROWS - 1) // ROWS
    p = row_groups(k, group_size)
    if bits == 2:
        byte = v_tl.reshape(tiles, p, 2, 8, 2).permute(4, 0, 2, 3, 1)  # (h, tile, L, e, P)
        n = torch.stack([byte & 15, byte >> 4], dim=2)  # (h, tile, a, L, e, P)
        planes = n.reshape(2, tiles * ROWS, p)
    else:
        byte = v_tl.reshape(tiles, p // 2, 2, 8, 2).permute(0, 4, 2, 3, 1)  # (tile, h, L, e, s)
        planes = torch.stack([byte & 15, byte >> 4], dim=-1).reshape(1, tiles * ROWS, p)
    codes = torch.zeros(tiles * ROWS, p * 4, dtype=torch.uint8)
    for b in range(bits):
        for t in range(4):
            codes[:, t::4] |= ((planes[b] >> t) & 1) << b
    pos = _positions(k, group_size)
    return codes[:r, pos >= 0]


def supports_signs(k: int) -> bool:
    """Whether signs of rows of k weights have a TL4 layout (``pack_tl4_signs``)."""
    return k > 0 and k % 4 == 0


def pack_tl4_signs(packed: Tensor, k: int) -> Tensor:
    """The TL4 bytes of a SIGNS matrix (n, ceil(k / 8)) uint8 (bit c % 8 of byte c // 8 set: +1) as 1-bit
    codes with one RTN group per row (gs = k), for ``sign_matmul_tl``: sign . x = 2 (bits . x) - sum(x)."""
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != (k + 7) // 8 or not supports_signs(k):
        raise ValueError(f"tl4: no TL4 layout of signs of shape {tuple(packed.shape)} ({packed.dtype}) for k={k} "
                         "(needs uint8 (n, ceil(k / 8)) and k a positive multiple of 4)")
    n, nb = packed.shape
    codes = _codes(packed.cpu().reshape(-1), 1, n * nb * 8).reshape(n, nb * 8)[:, :k]  # each row's padding cut
    return _pack_codes(codes.contiguous(), 1, k)

