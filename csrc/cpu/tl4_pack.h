// The TL4 repack of 1- and 2-bit KBITS codes (layout: deltacomp/quant/tl4.py, whose torch version is the
// reference; csrc/cpu/lowrank_tl_avx2.cpp reads it). Raw pointers only, no torch (tl4_pack.cpp;
// lowrank_ops.cpp wraps it as torch.ops.deltacomp.tl4_pack).
#pragma once
#include <cstdint>

namespace deltacomp {
namespace cpu {

// out: the TL4 bytes, tiles(rows) * tl_groups(len, gs) * 16 * bits, of the (rows, len) matrix of `bits`-bit
// (1, 2) codes held by the KBITS stream q (nbytes = ceil(rows * len * bits / 8) bytes):
//   transposed = false: element (j, x) is code j * len + x (V: rows = r, len = k, gs its RTN group size);
//   transposed = true:  element (j, x) is code x * rows + j (U^T stored as (r, n): rows = n, len = gs = r).
// Every byte of out is written. Parallel over the tiles of 32 rows (OpenMP, past kParallelMinWork codes).
void tl4_pack(const uint8_t* q, int64_t nbytes, int bits, int64_t rows, int64_t len, int64_t gs, bool transposed,
              uint8_t* out);

}  // namespace cpu
}  // namespace deltacomp
