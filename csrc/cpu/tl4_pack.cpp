// The TL4 repack (tl4_pack.h; layout in deltacomp/quant/tl4.py) in C++: run once per layer at load time,
// it took 0.33 s per 4096x11008 layer in torch (the reference, quant/tl4.py), over a minute for a 7B model.
//
// Per tile of 32 rows and per chunk (<= 128 positions of one RTN group), the 4 codes of each row at each
// position group p of the chunk (positions 4p .. 4p + 3 of it; past its end, and padding groups: code 0)
// become a byte nb[p][row] holding the row's nibble of plane 0 (low half) and, at 2 bits, of plane 1
// (high half). V: a row's chunk is one run of stream bits, read 64 at a time; U^T: per position, the
// tile's 32 codes are one run, and 4 such runs are interleaved into the rows' bytes. The nibbles of two
// rows (2 bits) or of two position groups (1 bit) then make one TL4 byte:
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

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the stream windows are read as little-endian words");

// A chunk of a row: positions [c0, c0 + n) (n <= kTlChunk, inside one RTN group), its position groups
// [p0, p0 + groups) of the row (groups = tl_chunk_groups(n), even; those past ceil(n / 4): padding).
struct Chunk {
  int64_t c0, n, p0;
  int groups;
};

// The row's chunks in order (quant/tl4.py `_positions`): every RTN group of gs cut into chunks of <= kTlChunk.
std::vector<Chunk> chunks_of(int64_t len, int64_t gs) {
  std::vector<Chunk> out;
  int64_t p0 = 0;
  for (int64_t g0 = 0; g0 < len; g0 += gs)
    for (int64_t c0 = g0, g1 = std::min(len, g0 + gs); c0 < g1; c0 += kTlChunk) {
      const int64_t n = std::min(kTlChunk, g1 - c0);
      out.push_back({c0, n, p0, static_cast<int>(lowrank::tl_chunk_groups(n))});
      p0 += out.back().groups;
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

// 64 stream bits from stream bit `bit` (bits past the stream's end read as 0).
inline uint64_t window64(const uint8_t* q, int64_t nbytes, int64_t bit) {
  const int64_t b = bit >> 3;
  const int sh = static_cast<int>(bit & 7);
  uint64_t lo;
  uint8_t hi;
  if (b + 9 <= nbytes) {
    std::memcpy(&lo, q + b, sizeof lo);
    hi = q[b + 8];
  } else {  // the stream's last bytes
    uint8_t buf[9] = {};
    std::memcpy(buf, q + b, static_cast<size_t>(nbytes - b));
    std::memcpy(&lo, buf, sizeof lo);
    hi = buf[8];
  }
  return sh == 0 ? lo : (lo >> sh) | (static_cast<uint64_t>(hi) << (64 - sh));
}

// The 8 fields of `bits` bits (1, 2) at the bottom of x, field e moved to bit 8e.
inline uint64_t spread8(uint64_t x, int bits) {
  if (bits == 2) {
    x &= 0xffff;
    x = (x | x << 24) & 0x000000ff000000ffull;
    x = (x | x << 12) & 0x000f000f000f000full;
    return (x | x << 6) & 0x0303030303030303ull;
  }
  x &= 0xff;
  x = (x | x << 28) & 0x0000000f0000000full;
  x = (x | x << 14) & 0x0003000300030003ull;
  return (x | x << 7) & 0x0101010101010101ull;
}

// The row's nb byte of a position group (4 codes, code t at bits t * bits): 2 bits through planes2.
inline uint8_t nibbles(uint32_t codes4, int bits) {
  return bits == 2 ? planes2()[codes4 & 0xff] : static_cast<uint8_t>(codes4 & 0xf);
}

// nb[p][i]: rows j0 + i < j0 + valid at the chunk's position group p (else 0). V: each row's chunk is one
// run of n * bits stream bits, read 64 at a time (8 position groups at 2 bits, 16 at 1 bit).
void row_chunk(const uint8_t* q, int64_t nbytes, int bits, int64_t len, int64_t j0, int valid, const Chunk& c,
               uint8_t (*nb)[kTlRows]) {
  std::memset(nb, 0, static_cast<size_t>(c.groups) * kTlRows);
  const int64_t span = c.n * bits, used = (c.n + 3) / 4;
  const int per = 16 / bits, fbits = 4 * bits;
  for (int i = 0; i < valid; ++i) {
    const int64_t bit0 = ((j0 + i) * len + c.c0) * bits;
    for (int64_t w0 = 0, p = 0; w0 < span; w0 += 64) {
      uint64_t w = window64(q, nbytes, bit0 + w0);
      if (span - w0 < 64) w &= (uint64_t{1} << (span - w0)) - 1;  // positions past the chunk: code 0
      for (int e = 0; e < per && p < used; ++e, ++p)
        nb[p][i] = nibbles(static_cast<uint32_t>(w >> (fbits * e)), bits);
    }
  }
}

// The same for U^T (element (j, x) at code x * rows + j): per position, one window of the tile's 32
// codes (consecutive in the stream); the 4 windows of a position group are interleaved 8 rows at a time
// (spread8) into one byte of 4 codes per row.
void column_chunk(const uint8_t* q, int64_t nbytes, int bits, int64_t rows, int64_t j0, int valid, const Chunk& c,
                  uint8_t (*nb)[kTlRows]) {
  std::memset(nb, 0, static_cast<size_t>(c.groups) * kTlRows);
  const uint64_t rmask = valid * bits >= 64 ? ~uint64_t{0} : (uint64_t{1} << (valid * bits)) - 1;
  for (int64_t p = 0; p < (c.n + 3) / 4; ++p) {
    const int64_t x0 = c.c0 + 4 * p;
    const int count = static_cast<int>(std::min<int64_t>(4, c.n - 4 * p));
    uint64_t acc[4] = {0, 0, 0, 0};  // rows 8m .. 8m + 7: byte e = the 4 codes of row 8m + e
    for (int t = 0; t < count; ++t) {
      const uint64_t w = window64(q, nbytes, ((x0 + t) * rows + j0) * bits) & rmask;
      for (int m = 0; m < 4; ++m) acc[m] |= spread8(w >> (8 * bits * m), bits) << (t * bits);
    }
    for (int m = 0; m < 4; ++m)
      for (int e = 0; e < 8; ++e) nb[p][8 * m + e] = nibbles(static_cast<uint32_t>(acc[m] >> (8 * e)), bits);
  }
}

}  // namespace

void tl4_pack(const uint8_t* q, int64_t nbytes, int bits, int64_t rows, int64_t len, int64_t gs, bool transposed,
              uint8_t* out) {
  const std::vector<Chunk> chunks = chunks_of(len, gs);
  const int64_t p_count = chunks.empty() ? 0 : chunks.back().p0 + chunks.back().groups;
  const int64_t tiles = (rows + kTlRows - 1) / kTlRows, tile_bytes = p_count * 16 * bits;
  (void)planes2();  // built before the threads
#pragma omp parallel for schedule(dynamic, 1) if (rows * len >= kParallelMinWork)
  for (int64_t ti = 0; ti < tiles; ++ti) {
    const int64_t j0 = ti * kTlRows;
    const int valid = static_cast<int>(std::min<int64_t>(kTlRows, rows - j0));
    alignas(32) uint8_t nb[kTlChunk / 4][kTlRows];
    for (const Chunk& c : chunks) {
      if (transposed) {
        column_chunk(q, nbytes, bits, rows, j0, valid, c, nb);
      } else {
        row_chunk(q, nbytes, bits, len, j0, valid, c, nb);
      }
      uint8_t* dst = out + ti * tile_bytes + c.p0 * 16 * bits;
      for (int p = 0; p < c.groups; p += 2) {
        const uint8_t *a = nb[p], *b = nb[p + 1];
        if (bits == 2) {  // groups p and p + 1: 32 bytes each
          for (int h = 0; h < 2; ++h) {
            const uint8_t* g = h == 0 ? a : b;
            uint8_t* d = dst + (p + h) * 32;
            for (int i = 0; i < 16; ++i) {
              d[2 * i] = static_cast<uint8_t>((g[i] & 15) | (g[16 + i] << 4));
              d[2 * i + 1] = static_cast<uint8_t>((g[i] >> 4) | (g[16 + i] & 0xf0));
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
}

}  // namespace cpu
}  // namespace deltacomp
