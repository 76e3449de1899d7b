// The TL4 repack (tl4_pack.h; layout in deltacomp/quant/tl4.py) in C++: run once per layer at load time,
// it took 0.33 s per 4096x11008 layer in torch (the reference, quant/tl4.py), over a minute for a 7B model.
//
// Per tile of 32 rows and per position group p (positions x0 .. x0 + count - 1, count <= 4; 0 for a
// padding group), each row's 4 codes are read as one window of 4 * bits stream bits (V: consecutive in the
// row; U^T: one 32-row window of the stream per position, the rows being consecutive there) and turned
// into a byte `nb` holding the row's nibble of plane 0 (low half) and, at 2 bits, of plane 1 (high half).
// The nibbles of two rows (2 bits) or of two position groups (1 bit) then make one TL4 byte:
//   2 bits, per p, 32 bytes: byte 2i + h (i = 8L + e < 16) = plane h of row i | plane h of row 16 + i << 4;
//   1 bit, per pair (2s, 2s + 1), 32 bytes: byte 2i + h = row 16h + i at group 2s | at group 2s + 1 << 4.
// Raw pointers only, no torch.
#include "tl4_pack.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <vector>

#include "lowrank_isa.h"

namespace deltacomp {
namespace cpu {
namespace {

using lowrank::kTlChunk;
using lowrank::kTlRows;

// A position group of a row: positions x0 .. x0 + count - 1 (count 0: padding, codes 0).
struct PosGroup {
  int64_t x0;
  int count;
};

// The row's position groups in order (quant/tl4.py `_positions`): every RTN group of gs cut into chunks
// of <= kTlChunk positions, each chunk ceil(len / 4) groups padded to an even count.
std::vector<PosGroup> position_groups(int64_t len, int64_t gs) {
  std::vector<PosGroup> out;
  for (int64_t g0 = 0; g0 < len; g0 += gs)
    for (int64_t c0 = g0, g1 = std::min(len, g0 + gs); c0 < g1; c0 += kTlChunk) {
      const int64_t n = std::min(kTlChunk, g1 - c0), groups = lowrank::tl_chunk_groups(n);
      for (int64_t p = 0; p < groups; ++p)
        out.push_back({c0 + 4 * p, static_cast<int>(std::clamp<int64_t>(n - 4 * p, 0, 4))});
    }
  return out;
}

// 4 two-bit codes (code t at bits 2t, 2t + 1) -> plane 0's nibble | plane 1's nibble << 4.
const std::array<uint8_t, 256>& planes2() {
  static const std::array<uint8_t, 256> lut = [] {
    std::array<uint8_t, 256> t{};
    for (int w = 0; w < 256; ++w)
      for (int c = 0; c < 4; ++c)
        t[w] |= static_cast<uint8_t>((((w >> (2 * c)) & 1) << c) | (((w >> (2 * c + 1)) & 1) << (4 + c)));
    return t;
  }();
  return lut;
}

// 16 stream bits from stream bit `bit` (bits past the stream's end read as 0).
inline uint32_t window16(const uint8_t* q, int64_t nbytes, int64_t bit) {
  const int64_t b = bit >> 3;
  uint32_t w = q[b];
  if (b + 1 < nbytes) w |= static_cast<uint32_t>(q[b + 1]) << 8;
  return w >> (bit & 7);
}

// 64 stream bits from stream bit `bit` (bits past the stream's end read as 0).
inline uint64_t window64(const uint8_t* q, int64_t nbytes, int64_t bit) {
  const int64_t b = bit >> 3;
  const int sh = static_cast<int>(bit & 7);
  uint8_t buf[16] = {};
  std::memcpy(buf, q + b, static_cast<size_t>(std::min<int64_t>(9, nbytes - b)));
  uint64_t lo;
  std::memcpy(&lo, buf, sizeof lo);
  return sh == 0 ? lo : (lo >> sh) | (static_cast<uint64_t>(buf[8]) << (64 - sh));
}

// nb[i], i < 32: rows j0 + i at position group g (rows past `valid`: 0). V: each row's window.
void row_nibbles(const uint8_t* q, int64_t nbytes, int bits, int64_t len, int64_t j0, int valid, PosGroup g,
                 uint8_t* nb) {
  std::memset(nb, 0, kTlRows);
  if (g.count == 0) return;
  const uint32_t mask = (1u << (g.count * bits)) - 1u;
  const auto& lut = planes2();
  for (int i = 0; i < valid; ++i) {
    const uint32_t w = window16(q, nbytes, ((j0 + i) * len + g.x0) * bits) & mask;
    nb[i] = static_cast<uint8_t>(bits == 2 ? lut[w] : w);
  }
}

// The same for U^T (element (j, x) at code x * rows + j): one window of the 32 rows per position.
void column_nibbles(const uint8_t* q, int64_t nbytes, int bits, int64_t rows, int64_t j0, int valid, PosGroup g,
                    uint8_t* nb) {
  std::memset(nb, 0, kTlRows);
  if (g.count == 0) return;
  const uint64_t rmask = valid * bits >= 64 ? ~uint64_t{0} : (uint64_t{1} << (valid * bits)) - 1u;
  const uint32_t cmask = (1u << bits) - 1u;
  uint64_t win[4];
  for (int t = 0; t < g.count; ++t) win[t] = window64(q, nbytes, ((g.x0 + t) * rows + j0) * bits) & rmask;
  const auto& lut = planes2();
  for (int i = 0; i < valid; ++i) {
    uint32_t w = 0;
    for (int t = 0; t < g.count; ++t) w |= (static_cast<uint32_t>(win[t] >> (i * bits)) & cmask) << (t * bits);
    nb[i] = static_cast<uint8_t>(bits == 2 ? lut[w] : w);
  }
}

}  // namespace

void tl4_pack(const uint8_t* q, int64_t nbytes, int bits, int64_t rows, int64_t len, int64_t gs, bool transposed,
              uint8_t* out) {
  const std::vector<PosGroup> groups = position_groups(len, gs);
  const int64_t p_count = static_cast<int64_t>(groups.size());  // even: every chunk's count is
  const int64_t tiles = (rows + kTlRows - 1) / kTlRows, tile_bytes = p_count * 16 * bits;
#pragma omp parallel for schedule(dynamic, 1) if (rows * len >= kParallelMinWork)
  for (int64_t ti = 0; ti < tiles; ++ti) {
    const int64_t j0 = ti * kTlRows;
    const int valid = static_cast<int>(std::min<int64_t>(kTlRows, rows - j0));
    uint8_t* dst = out + ti * tile_bytes;
    alignas(32) uint8_t a[kTlRows], b[kTlRows];
    const auto nibbles = [&](PosGroup g, uint8_t* nb) {
      if (transposed) {
        column_nibbles(q, nbytes, bits, rows, j0, valid, g, nb);
      } else {
        row_nibbles(q, nbytes, bits, len, j0, valid, g, nb);
      }
    };
    for (int64_t p = 0; p < p_count; p += 2) {
      nibbles(groups[p], a);
      nibbles(groups[p + 1], b);
      if (bits == 2) {  // groups p and p + 1: 32 bytes each
        for (int h = 0; h < 2; ++h) {
          const uint8_t* nb = h == 0 ? a : b;
          uint8_t* d = dst + (p + h) * 32;
          for (int i = 0; i < 16; ++i) {
            d[2 * i] = static_cast<uint8_t>((nb[i] & 15) | (nb[16 + i] << 4));
            d[2 * i + 1] = static_cast<uint8_t>((nb[i] >> 4) | (nb[16 + i] & 0xf0));
          }
        }
      } else {  // the pair (p, p + 1): 32 bytes
        uint8_t* d = dst + (p / 2) * 32;
        for (int h = 0; h < 2; ++h)
          for (int i = 0; i < 16; ++i) d[2 * i + h] = static_cast<uint8_t>(a[16 * h + i] | (b[16 * h + i] << 4));
      }
    }
  }
}

}  // namespace cpu
}  // namespace deltacomp
