import pytest
import torch

from deltacomp.quant.rtn import dequantize, quantize, quantized_nbytes


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("shape,group", [((1, 1), 128), ((3, 7), 4), ((5, 300), 128), ((33, 77), 32), ((2, 256), 128)])
def test_error_bound(bits, shape, group):
    g = torch.Generator().manual_seed(bits * 31 + shape[1])
    w = torch.rand(shape, generator=g) * 0.2 - 0.07
    w_copy = w.clone()
    codes, scale, zero = quantize(w, bits, group)
    assert torch.equal(w, w_copy)  # input untouched
    ng = -(-shape[1] // group)
    assert codes.dtype == torch.uint8 and codes.shape == shape
    assert scale.dtype == zero.dtype == torch.float16 and scale.shape == zero.shape == (shape[0], ng)
    assert int(codes.max()) < (1 << bits)
    w_hat = dequantize(codes, scale, zero, group)
    per_elem = scale.float().repeat_interleave(group, 1)[:, : shape[1]]
    err = (w - w_hat).abs()
    # rounding zero down and scale up in fp16 keeps the bound; 1e-6 covers float32 arithmetic
    # constant groups (scale 0) are off by their fp16 rounding only
    bound = torch.where(per_elem > 0, per_elem / 2, (w - w.half().float()).abs())
    assert (err <= bound + 1e-6).all(), float((err - bound).max())
    # scale is close to the ideal (max - min) / (2^b - 1): fp16 rounding only
    gw = torch.nn.functional.pad(w, (0, ng * group - shape[1]), value=float("nan")).reshape(shape[0], ng, group)
    ideal = (gw.nan_to_num(-1e9).amax(-1) - gw.nan_to_num(1e9).amin(-1)) / ((1 << bits) - 1)
    assert torch.allclose(scale.float(), ideal, rtol=2e-3, atol=1e-7)


@pytest.mark.parametrize("bits", [1, 2, 3, 8])
def test_constant_groups(bits):
    w = torch.full((3, 130), 0.125)
    w[1] = -0.3
    w[2, :128] = 0.0
    w[2, 128:] = 7.0
    codes, scale, zero = quantize(w, bits, 128)
    assert (scale == 0).all()
    assert torch.equal(dequantize(codes, scale, zero, 128), w.half().float())


def test_nbytes_and_errors():
    assert quantized_nbytes(3, 130, 3, 128) == (3 * 130 * 3 + 7) // 8 + 4 * 3 * 2
    with pytest.raises(ValueError, match="1..8"):
        quantize(torch.zeros(2, 2), 0)
    with pytest.raises(ValueError, match="2-D"):
        quantize(torch.zeros(4), 2)
    with pytest.raises(ValueError, match="fp16 range"):
        quantize(torch.full((1, 4), 1e6), 2)
