import math

import pytest
import torch

from deltacomp.quant.bitpack import pack_bits, packed_nbytes, unpack_bits


def _ref_pack(codes, bits):
    """Bit-by-bit reference of the KBITS layout (plain Python)."""
    flat = codes.reshape(-1).tolist()
    out = [0] * math.ceil(len(flat) * bits / 8)
    for i, c in enumerate(flat):
        for j in range(bits):
            p = i * bits + j
            out[p // 8] |= ((c >> j) & 1) << (p % 8)
    return torch.tensor(out, dtype=torch.uint8)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("count", [0, 1, 7, 33, 1000, 128 * 33])
def test_round_trip(bits, count):
    g = torch.Generator().manual_seed(bits * 10007 + count)
    codes = torch.randint(0, 1 << bits, (count,), generator=g, dtype=torch.int64).to(torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == math.ceil(count * bits / 8) == packed_nbytes(count, bits)
    assert torch.equal(unpack_bits(packed, bits, count), codes)


@pytest.mark.parametrize("bits", [1, 3, 5, 8])
def test_matches_reference_layout(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (7, 5), generator=g).to(torch.uint8)
    assert torch.equal(pack_bits(codes, bits), _ref_pack(codes, bits))


def test_known_3bit_layout():
    # codes 1..8 (mod 8) -> stream bits little-endian: 001 010 011 100 101 110 111 000 (LSB first)
    codes = torch.tensor([1, 2, 3, 4, 5, 6, 7, 0], dtype=torch.uint8)
    # value = sum code_i << 3i = 0o07654321 -> bytes little-endian
    v = sum(c << (3 * i) for i, c in enumerate(codes.tolist()))
    assert pack_bits(codes, 3).tolist() == [v & 255, (v >> 8) & 255, (v >> 16) & 255]


def test_errors():
    with pytest.raises(ValueError, match="does not fit in 2 bits"):
        pack_bits(torch.tensor([4], dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match="1..8"):
        pack_bits(torch.tensor([1], dtype=torch.uint8), 9)
    with pytest.raises(TypeError, match="uint8"):
        pack_bits(torch.tensor([1]), 2)
    with pytest.raises(ValueError, match="need 2 bytes"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 3, 5)
