// bnn-distill native kernels: an onnxruntime custom-op library with a bit-packed binary convolution.
//
// Op ai.bnn_distill::BinaryConv2d (version 1), channels-last ("flat") tensors:
//
//   inputs   0 X      float  (B, H*W, C)        the conv input; its sign is taken here (sign(0) = +1)
//            1 Wbits  uint64 (OCp/8, k*k, CW, 8) sign bits of the +-1 weights (bit 1 = -1), 64 input
//                                               channels per word, 8 output channels per group
//            2 corr   int32  (16, OCp)          zero-padding correction per border class (see below)
//            3 scale  float  (OC,)              per-output-channel multiplier (weight scale x BN)
//            4 shift  float  (OC,)              per-output-channel shift (BN)
//            5 R      float                     optional residual, added before the activation:
//                                               residual=0: (B, Ho*Wo, OC), added as it is;
//                                               residual=1: (B, H*W, C) like X, the parameter-free
//                                               shortcut: s x s average pool (stride s = the conv's,
//                                               ceil mode, in-image divisor) then zero channels up to OC
//   output   0 Y      float  (B, Ho*Wo, OC)     clip(dot * scale + shift + R, act_min, act_max)
//            1 S      uint64 (B, Ho*Wo, CWo)    optional: Y's signs packed as the next conv takes them
//                                               (bit 1 where Y < 0, CWo = ceil(OC/64)), written by the
//                                               epilogue, so a BinaryConv2dFromBits that reads S (with
//                                               Y as its residual R) needs no packing pass of its own
//   attributes in_h, in_w, in_c, out_c, kernel (1 or 3), stride, pad (0 or kernel/2), act (0 none,
//            1 clip to [act_min, act_max]), residual (0 or 1, as above; default 0)
//
// Ops ai.bnn_distill::BinaryConv2dToBits and BinaryConv2dFromBits are the same convolution where
// a conv's output only feeds the next conv's sign: ToBits takes (X, Wbits, corr, T int32 (OC,)) and
// outputs packed sign bits (B, Ho*Wo, ceil(OC/64)) uint64, bit = dot < T[oc] (the BatchNorm, the
// activation and the sign folded into one integer threshold, computed at export); FromBits takes
// such bits as X and is otherwise BinaryConv2d (its pooled residual, residual=1, is pooled from R, the
// float tensor the bits were taken from).
//
// dot is the exact integer +-1 dot product of the conv: with the input's sign bits a and the
// weights' bits w over N = k*k*C bits, dot = N - 2 * popcount(a XOR w) - corr[class][oc]. The
// packed input has a border of all-zero words (+1 values); corr[class] removes what those
// border taps added (the sum of the +-1 weights over the taps that fall outside the image) for
// the output positions of each border class (top/bottom/left/right taps outside). Channel
// padding bits are 0 in both operands, so they never count.
//
// Kernels: AVX-512 VPOPCNTDQ (8 output channels per zmm), AVX2 (nibble-table popcount on operands
// stored split into nibbles, a VPSADBW table pair, 4 pixels x 8 channels per register tile; the
// constant weights are split once, at kernel creation), portable (__builtin_popcountll). The best one
// this CPU runs is chosen at kernel creation; BNN_DISTILL_NATIVE_ISA=avx512|avx2|portable forces one
// (an unsupported choice is an error). BNN_DISTILL_NATIVE_AVX2_PIXELS=1..4 sets the AVX2 tile's width
// (default 4), BNN_DISTILL_NATIVE_PHASES=1 prints per-node packing and conv times when a session ends.
// Work is split over (image, output row, block of 32 output channels) with onnxruntime's intra-op
// thread pool (KernelContext_ParallelFor), so the session's thread setting bounds it;
// BNN_DISTILL_NATIVE_POOL=own runs each conv (packing included) as one job on the library's own
// spinning pool instead (see SpinPool). Outputs are bit-identical whichever kernel, tile or pool runs.

#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT

#include <immintrin.h>

#include <algorithm>
#include <thread>
#include <condition_variable>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

enum class Isa { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

const char* IsaName(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512_vpopcntdq";
    case Isa::kAvx2: return "avx2";
    default: return "portable";
  }
}

bool CpuHasAvx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vpopcntdq") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl");
}

bool CpuHasAvx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2");
}

Isa BestIsa() { return CpuHasAvx512() ? Isa::kAvx512 : (CpuHasAvx2() ? Isa::kAvx2 : Isa::kPortable); }

Isa ChooseIsa() {
  const char* env = std::getenv("BNN_DISTILL_NATIVE_ISA");
  if (env == nullptr || *env == '\0' || std::string(env) == "auto") return BestIsa();
  std::string want(env);
  if (want == "portable") return Isa::kPortable;
  if (want == "avx2") {
    if (!CpuHasAvx2()) throw std::runtime_error("BNN_DISTILL_NATIVE_ISA=avx2 but this CPU has no AVX2");
    return Isa::kAvx2;
  }
  if (want == "avx512") {
    if (!CpuHasAvx512()) throw std::runtime_error("BNN_DISTILL_NATIVE_ISA=avx512 but this CPU lacks AVX-512 VPOPCNTDQ");
    return Isa::kAvx512;
  }
  throw std::runtime_error("BNN_DISTILL_NATIVE_ISA='" + want + "' is not one of auto, avx512, avx2, portable");
}

constexpr int kTileGroups = 4;  // output-channel groups of 8 per work item (32 channels)
constexpr int kTilePixels = 6;  // output pixels of one row per register tile

struct Geometry {
  int64_t B, H, W, C, CW, OC, OCp, K, S, P, Ho, Wo, Hp, Wp;
  int64_t groups() const { return OCp / 8; }
  int64_t taps() const { return K * K; }
};

// ------------------------------------------------------------------ sign packing

// One pixel's C floats -> CW words, bit c%64 of word c/64 set when x[c] < 0 (so sign(0) = +1).
inline void PackPixelPortable(const float* x, int64_t C, int64_t CW, uint64_t* out) {
  for (int64_t w = 0; w < CW; ++w) {
    uint64_t word = 0;
    const int64_t c0 = w * 64, c1 = std::min<int64_t>(C, c0 + 64);
    for (int64_t c = c0; c < c1; ++c) word |= static_cast<uint64_t>(x[c] < 0.0f) << (c - c0);
    out[w] = word;
  }
}

__attribute__((target("avx512f,avx512bw,avx512dq")))
void PackPixelAvx512(const float* x, int64_t C, int64_t CW, uint64_t* out) {
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t w = 0; w < CW; ++w) {
    uint64_t word = 0;
    for (int q = 0; q < 4; ++q) {
      const int64_t c0 = w * 64 + q * 16;
      if (c0 >= C) break;
      const int64_t n = std::min<int64_t>(16, C - c0);
      const __mmask16 lanes = static_cast<__mmask16>(n == 16 ? 0xFFFF : ((1u << n) - 1));
      const __m512 v = _mm512_maskz_loadu_ps(lanes, x + c0);
      const __mmask16 neg = _mm512_mask_cmp_ps_mask(lanes, v, zero, _CMP_LT_OQ);
      word |= static_cast<uint64_t>(neg) << (q * 16);
    }
    out[w] = word;
  }
}

// The same, written in the AVX2 kernels' split form: per word, [word & 0x0F.., (word >> 4) & 0x0F..].
__attribute__((target("avx2")))
void PackPixelAvx2Split(const float* x, int64_t C, int64_t CW, uint64_t* out) {
  const __m256 zero = _mm256_setzero_ps();
  for (int64_t w = 0; w < CW; ++w) {
    uint64_t word = 0;
    const int64_t c0 = w * 64, c1 = std::min<int64_t>(C, c0 + 64);
    int64_t c = c0;
    for (; c + 8 <= c1; c += 8) {
      const int m = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + c), zero, _CMP_LT_OQ));
      word |= static_cast<uint64_t>(static_cast<unsigned>(m)) << (c - c0);
    }
    for (; c < c1; ++c) word |= static_cast<uint64_t>(x[c] < 0.0f) << (c - c0);
    out[2 * w] = word & 0x0F0F0F0F0F0F0F0Full;
    out[2 * w + 1] = (word >> 4) & 0x0F0F0F0F0F0F0F0Full;
  }
}

// ------------------------------------------------------------------ the epilogue

// Work items of neighbouring output-channel blocks share a packed output word: OR atomically.
inline void OrBits(uint64_t* word, uint64_t bits) {
  if (bits) __atomic_fetch_or(word, bits, __ATOMIC_RELAXED);
}

struct Epilogue {
  const Geometry* g;
  const int32_t* corr;   // (16, OCp)
  const float* scale;    // (OC,)
  const float* shift;    // (OC,)
  const float* residual; // (B, Ho*Wo, OC) or null (a pooled residual is computed into this shape first)
  const int32_t* thresh; // (OC,): bits output (sign bit = dot < thresh[oc]) instead of y, or null
  uint64_t* ybits;       // (B, Ho*Wo, ceil(OC/64)), zeroed before the conv, when thresh is set
  float* y;              // (B, Ho*Wo, OC)
  uint8_t* ysign;        // (B, Ho*Wo, ceil(OC/64)) words as bytes: y's packed signs (output 1), or null
  int act;
  float lo, hi;

  int BorderClass(int64_t oy, int64_t ox) const {
    const int64_t iy = oy * g->S - g->P, ix = ox * g->S - g->P;
    const int top = iy < 0, bottom = iy + g->K > g->H, left = ix < 0, right = ix + g->K > g->W;
    return (top | (bottom << 1)) * 4 + (left | (right << 1));
  }

  // pc: popcounts of 8 * ngroups output channels starting at group g0, for pixel (b, oy, ox)
  void Store(int64_t b, int64_t oy, int64_t ox, int64_t g0, int ngroups, const uint64_t* pc) const {
    const int64_t n_bits = g->taps() * g->C;
    const int32_t* cr = corr + static_cast<int64_t>(BorderClass(oy, ox)) * g->OCp;
    const int64_t pix = (b * g->Ho + oy) * g->Wo + ox;
    if (thresh) {
      const int64_t cwo = (g->OC + 63) / 64;
      const int64_t oc0 = g0 * 8, oc1 = std::min<int64_t>(g->OC, oc0 + 8 * ngroups);
      uint64_t bits = 0;
      for (int64_t oc = oc0; oc < oc1; ++oc) {
        const int64_t dot = n_bits - 2 * static_cast<int64_t>(pc[oc - oc0]) - cr[oc];
        bits |= static_cast<uint64_t>(dot < thresh[oc]) << (oc - oc0);
      }
      OrBits(ybits + pix * cwo + oc0 / 64, bits << (oc0 % 64));  // oc0 % 64 + 32 <= 64: one word
      return;
    }
    float* out = y + pix * g->OC;
    const float* res = residual ? residual + pix * g->OC : nullptr;
    const int64_t oc0 = g0 * 8, oc1 = std::min<int64_t>(g->OC, oc0 + 8 * ngroups);
    uint8_t* sign = ysign ? ysign + pix * ((g->OC + 63) / 64) * 8 : nullptr;
    for (int64_t oc = oc0; oc < oc1; ++oc) {
      const int64_t dot = n_bits - 2 * static_cast<int64_t>(pc[oc - oc0]) - cr[oc];
      float v = static_cast<float>(dot) * scale[oc];
      v = v + shift[oc];
      if (res) v = v + res[oc];
      if (act) v = std::min(std::max(v, lo), hi);
      out[oc] = v;
      // each byte (8 channels) belongs to one work item: set bit by bit, no other thread writes it
      if (sign && v < 0.0f) sign[oc / 8] = static_cast<uint8_t>(sign[oc / 8] | (1u << (oc % 8)));
    }
  }
};

// ------------------------------------------------------------------ conv kernels
// Each computes one work item: output row oy of image b, output-channel groups [g0, g0 + ng).
// A: packed padded input (B, Hp, Wp, CW); Wb: packed weights (OCp/8, taps, CW, 8).

struct Item {
  const Geometry* g;
  const uint64_t* A;
  const uint64_t* Wb;
  const Epilogue* ep;
};

template <int P, int G>
void TilePortable(const Item& it, int64_t b, int64_t oy, int64_t ox0, int64_t g0) {
  const Geometry& g = *it.g;
  uint64_t acc[P][G * 8] = {};
  const int64_t tapw = g.CW * 8, gstride = g.taps() * tapw;
  for (int64_t ky = 0; ky < g.K; ++ky) {
    const uint64_t* arow = it.A + ((b * g.Hp + oy * g.S + ky) * g.Wp) * g.CW;
    for (int64_t kx = 0; kx < g.K; ++kx) {
      const int64_t tap = ky * g.K + kx;
      for (int64_t cw = 0; cw < g.CW; ++cw) {
        for (int p = 0; p < P; ++p) {
          const uint64_t a = arow[((ox0 + p) * g.S + kx) * g.CW + cw];
          for (int gi = 0; gi < G; ++gi) {
            const uint64_t* w = it.Wb + (g0 + gi) * gstride + tap * tapw + cw * 8;
            for (int l = 0; l < 8; ++l) acc[p][gi * 8 + l] += __builtin_popcountll(a ^ w[l]);
          }
        }
      }
    }
  }
  for (int p = 0; p < P; ++p) it.ep->Store(b, oy, ox0 + p, g0, G, acc[p]);
}

// AVX2 has no vector popcount. Both operands are stored split into nibbles: word & 0x0F.. ("lo") and
// (word >> 4) & 0x0F.. ("hi"), so every byte of lo ^ lo' and hi ^ hi' is already a 4-bit VPSHUFB index
// (no shift and no masks in the inner loop). Two tables turn that into one VPSADBW: with
// TA[i] = 8 + popcount(i) and TB[i] = 8 - popcount(i), |TA[lo] - TB[hi]| = popcount(lo) + popcount(hi)
// per byte, and VPSADBW sums the 8 bytes of each 64-bit lane: the popcount of the 64-bit XOR.
// Per 4 output channels x 64 input bits: 2 XOR, 2 VPSHUFB, 1 VPSADBW, 1 VPADDQ.
//
// Split layouts: packed input (B, Hp, Wp, CW, 2) words [lo, hi]; weights (OCp/8, taps*CW, 2, 8): per group
// of 8 output channels and input word, the 8 lo words, then the 8 hi words (two ymm each).
constexpr uint64_t kNibbles = 0x0F0F0F0F0F0F0F0Full;

inline void SplitWord(uint64_t w, uint64_t* out) {
  out[0] = w & kNibbles;
  out[1] = (w >> 4) & kNibbles;
}

#define BNN_AVX2_TABLES                                                                             \
  const __m256i ta = _mm256_setr_epi8(8, 9, 9, 10, 9, 10, 10, 11, 9, 10, 10, 11, 10, 11, 11, 12, 8, 9, \
                                      9, 10, 9, 10, 10, 11, 9, 10, 10, 11, 10, 11, 11, 12);          \
  const __m256i tb = _mm256_setr_epi8(8, 7, 7, 6, 7, 6, 6, 5, 7, 6, 6, 5, 6, 5, 5, 4, 8, 7, 7, 6, 7, \
                                      6, 6, 5, 7, 6, 6, 5, 6, 5, 5, 4)

// The AVX2 epilogue of one group of 8 output channels, its per-channel operands loaded once per row.
struct Avx2Epi {
  __m256 scale, shift, lo, hi;
  __m256i thresh, mask, n_bits;
  int64_t lanes;  // valid channels in the group (8 but in the last group)
};

__attribute__((target("avx2"))) inline Avx2Epi Avx2EpiFor(const Epilogue& ep, int64_t oc) {
  const Geometry& g = *ep.g;
  Avx2Epi e;
  e.lanes = std::min<int64_t>(8, g.OC - oc);
  e.mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(e.lanes)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  e.n_bits = _mm256_set1_epi32(static_cast<int>(g.taps() * g.C));
  e.lo = _mm256_set1_ps(ep.lo);
  e.hi = _mm256_set1_ps(ep.hi);
  e.thresh = ep.thresh ? _mm256_maskload_epi32(ep.thresh + oc, e.mask) : _mm256_setzero_si256();
  e.scale = ep.scale ? _mm256_maskload_ps(ep.scale + oc, e.mask) : _mm256_setzero_ps();
  e.shift = ep.shift ? _mm256_maskload_ps(ep.shift + oc, e.mask) : _mm256_setzero_ps();
  return e;
}

// Epilogue modes, fixed per row so the per-pixel code has no branches: kBits (packed signs out through
// thresholds) or float out, with or without a residual, with or without the clip, all 8 channels valid
// or a masked last group.
enum : int { kEpiBits = 1, kEpiRes = 2, kEpiAct = 4, kEpiFull = 8, kEpiSign = 16 };

// One pixel: acc0 / acc1 hold the popcounts of channels oc..oc+3 / oc+4..oc+7 as 64-bit lanes. The same
// float32 operations, in the same order, as Epilogue::Store (and so as the standard graph).
// cr, out, res, bits: this pixel's corrections, outputs, residual and packed-bits word, each already
// offset to the group's first channel (bits: its word; shift: the group's bit offset in it). sign: the
// byte of the pixel's packed output signs that holds the group (kEpiSign), written whole.
template <int M>
__attribute__((target("avx2"), always_inline)) inline void StoreAvx2(const Avx2Epi& e, const int32_t* cr, float* out,
                                                                     const float* res, uint64_t* bits, int shift,
                                                                     uint8_t* sign, __m256i acc0, __m256i acc1) {
  const __m256 q = _mm256_shuffle_ps(_mm256_castsi256_ps(acc0), _mm256_castsi256_ps(acc1), _MM_SHUFFLE(2, 0, 2, 0));
  const __m256i pc = _mm256_permute4x64_epi64(_mm256_castps_si256(q), _MM_SHUFFLE(3, 1, 2, 0));
  const __m256i corr = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(cr));  // OCp entries: always 8
  const __m256i dot = _mm256_sub_epi32(_mm256_sub_epi32(e.n_bits, _mm256_add_epi32(pc, pc)), corr);
  if (M & kEpiBits) {
    const unsigned neg = static_cast<unsigned>(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(e.thresh, dot)))) &
                         ((1u << e.lanes) - 1);
    OrBits(bits, static_cast<uint64_t>(neg) << shift);
    return;
  }
  __m256 v = _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(dot), e.scale), e.shift);
  if (M & kEpiRes) v = _mm256_add_ps(v, (M & kEpiFull) ? _mm256_loadu_ps(res) : _mm256_maskload_ps(res, e.mask));
  if (M & kEpiAct) v = _mm256_min_ps(_mm256_max_ps(v, e.lo), e.hi);
  if (M & kEpiFull) {
    _mm256_storeu_ps(out, v);
  } else {
    _mm256_maskstore_ps(out, e.mask, v);
  }
  if (M & kEpiSign) {  // the same test as the packer's: x < 0 (ordered)
    const unsigned neg = static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_LT_OQ)));
    *sign = static_cast<uint8_t>(neg & ((1u << e.lanes) - 1));
  }
}

// P output pixels x the 8 output channels of one group: a: the first pixel's window (split words, row ky = 0),
// pstep: split words between neighbouring pixels' windows, arow: between kernel rows; w: the group's
// split weights. acc[p][0..1] get the popcounts. The weights are memory operands (L1-resident: one
// group's are at most taps*CW*128 bytes), so 2P accumulators, the two tables and a broadcast pair fit
// in the 16 ymm registers.
template <int P>
__attribute__((target("avx2"), always_inline)) inline void Avx2Core(const uint64_t* a, int64_t pstep, int64_t arow,
                                                                    const uint64_t* w, int64_t K, int64_t run,
                                                                    __m256i (&acc)[P][2]) {
  BNN_AVX2_TABLES;
  for (int p = 0; p < P; ++p) acc[p][0] = acc[p][1] = _mm256_setzero_si256();
  for (int64_t ky = 0; ky < K; ++ky, a += arow) {
    const uint64_t* ap = a;
    for (int64_t j = 0; j < run; ++j, ap += 2, w += 16) {
      const __m256i* wv = reinterpret_cast<const __m256i*>(w);
      const __m256i w0l = _mm256_loadu_si256(wv), w1l = _mm256_loadu_si256(wv + 1);
      for (int p = 0; p < P; ++p) {
        // The lo weights stay in registers; the hi ones are reloaded for every pixel (memory operands of
        // VPXOR, L1 hits: the pointer is laundered so the compiler cannot keep them too), which leaves
        // enough registers for 2P accumulators without spilling.
        const __m256i* wh = wv + 2;
        asm volatile("" : "+r"(wh));
        const __m256i al = _mm256_set1_epi64x(static_cast<long long>(ap[p * pstep]));
        const __m256i ah = _mm256_set1_epi64x(static_cast<long long>(ap[p * pstep + 1]));
        acc[p][0] = _mm256_add_epi64(acc[p][0], _mm256_sad_epu8(_mm256_shuffle_epi8(ta, _mm256_xor_si256(al, w0l)),
                                                                _mm256_shuffle_epi8(tb, _mm256_xor_si256(ah, _mm256_loadu_si256(wh)))));
        acc[p][1] = _mm256_add_epi64(acc[p][1], _mm256_sad_epu8(_mm256_shuffle_epi8(ta, _mm256_xor_si256(al, w1l)),
                                                                _mm256_shuffle_epi8(tb, _mm256_xor_si256(ah, _mm256_loadu_si256(wh + 1)))));
      }
    }
  }
}

// Everything a row of tiles needs, read once from the geometry and the epilogue into locals (the
// output stores could alias the structs as far as the compiler knows).
struct Avx2RowCtx {
  const uint64_t* a;  // the row's first window (split words, kernel row 0)
  const uint64_t* w;  // the group's split weights
  int64_t pstep, arow, K, run;
  const int32_t* corr;  // border class (top/bottom of this row, left = right = 0), group's first channel
  int64_t OCp, OC, S, P, Kw, W;
  float* out;           // pixel 0 of the row, group's first channel (or null: bits out)
  const float* res;
  uint64_t* bits;       // pixel 0's packed word holding the group (or null)
  int64_t cwo;
  int shift;
  uint8_t* sign;        // pixel 0's byte of the packed output signs holding the group (or null)
};

template <int P, int M>
__attribute__((target("avx2"), always_inline)) inline void Avx2Tile(const Avx2RowCtx& c, const Avx2Epi& e, int64_t ox0) {
  __m256i acc[P][2];
  Avx2Core<P>(c.a + ox0 * c.pstep, c.pstep, c.arow, c.w, c.K, c.run, acc);
  for (int p = 0; p < P; ++p) {
    const int64_t ox = ox0 + p, ix = ox * c.S - c.P;
    const int64_t cls = (ix < 0) | ((ix + c.Kw > c.W) << 1);
    StoreAvx2<M>(e, c.corr + cls * c.OCp, c.out + ox * c.OC, c.res + ox * c.OC, c.bits + ox * c.cwo, c.shift,
                 c.sign + ox * c.cwo * 8, acc[p][0], acc[p][1]);
  }
}

template <int P, int M>
__attribute__((target("avx2"))) void Avx2RowTiles(const Avx2RowCtx& c, const Avx2Epi& e, int64_t Wo) {
  int64_t ox = 0;
  for (; ox + P <= Wo; ox += P) Avx2Tile<P, M>(c, e, ox);
  switch (Wo - ox) {
    case 0: break;
    case 1: Avx2Tile<1, M>(c, e, ox); break;
    case 2: Avx2Tile<2, M>(c, e, ox); break;
    default: Avx2Tile<3, M>(c, e, ox); break;
  }
}

constexpr int kAvx2MaxPixels = 4;

// One output row of image b for the 8 output channels of group grp, in tiles of P pixels (P of them
// at a time, the rest in one smaller tile).
template <int P>
__attribute__((target("avx2"))) void Avx2Row(const Item& it, int64_t b, int64_t oy, int64_t grp) {
  const Geometry& g = *it.g;
  const Epilogue& ep = *it.ep;
  const int64_t oc = grp * 8, pix0 = (b * g.Ho + oy) * g.Wo, iy = oy * g.S - g.P;
  const int64_t row_cls = ((iy < 0) | ((iy + g.K > g.H) << 1)) * 4;
  Avx2RowCtx c;
  c.a = it.A + 2 * ((b * g.Hp + oy * g.S) * g.Wp) * g.CW;
  c.w = it.Wb + grp * g.taps() * g.CW * 16;
  c.pstep = 2 * g.S * g.CW, c.arow = 2 * g.Wp * g.CW, c.K = g.K, c.run = g.K * g.CW;
  c.corr = ep.corr + row_cls * g.OCp + oc;
  c.OCp = g.OCp, c.OC = g.OC, c.S = g.S, c.P = g.P, c.Kw = g.K, c.W = g.W;
  c.out = ep.y ? ep.y + pix0 * g.OC + oc : nullptr;
  c.res = ep.residual ? ep.residual + pix0 * g.OC + oc : nullptr;
  c.cwo = (g.OC + 63) / 64;
  c.bits = ep.thresh ? ep.ybits + pix0 * c.cwo + oc / 64 : nullptr;
  c.shift = static_cast<int>(oc % 64);
  c.sign = ep.ysign ? ep.ysign + pix0 * c.cwo * 8 + oc / 8 : nullptr;
  const Avx2Epi e = Avx2EpiFor(ep, oc);
  const int mode = ep.thresh ? kEpiBits
                             : ((ep.residual ? kEpiRes : 0) | (ep.act ? kEpiAct : 0) | (e.lanes == 8 ? kEpiFull : 0) |
                                (ep.ysign ? kEpiSign : 0));
  switch (mode) {
#define BNN_AVX2_MODE(M) \
  case M: Avx2RowTiles<P, M>(c, e, g.Wo); break;
#define BNN_AVX2_FLOAT_MODES(S)                                                                       \
  BNN_AVX2_MODE(S) BNN_AVX2_MODE(S | kEpiRes) BNN_AVX2_MODE(S | kEpiAct) BNN_AVX2_MODE(S | kEpiRes | kEpiAct) \
  BNN_AVX2_MODE(S | kEpiFull) BNN_AVX2_MODE(S | kEpiFull | kEpiRes) BNN_AVX2_MODE(S | kEpiFull | kEpiAct)    \
  BNN_AVX2_MODE(S | kEpiFull | kEpiRes | kEpiAct)
    BNN_AVX2_MODE(kEpiBits)
    BNN_AVX2_FLOAT_MODES(0)
    BNN_AVX2_FLOAT_MODES(kEpiSign)
#undef BNN_AVX2_FLOAT_MODES
#undef BNN_AVX2_MODE
    default: throw std::logic_error("BinaryConv2d: no AVX2 epilogue for this mode");
  }
}

using Avx2RowFn = void (*)(const Item&, int64_t, int64_t, int64_t);

Avx2RowFn Avx2RowFor(int p) {
  static const Avx2RowFn t[kAvx2MaxPixels] = {Avx2Row<1>, Avx2Row<2>, Avx2Row<3>, Avx2Row<4>};
  return t[p - 1];
}

// Weights (OCp/8, taps, CW, 8) -> the split layout (OCp/8, taps*CW, 2, 8).
void SplitWeights(const uint64_t* wb, int64_t groups, int64_t taps_cw, uint64_t* out) {
  for (int64_t gi = 0; gi < groups; ++gi)
    for (int64_t j = 0; j < taps_cw; ++j) {
      const uint64_t* src = wb + (gi * taps_cw + j) * 8;
      uint64_t* dst = out + (gi * taps_cw + j) * 16;
      for (int l = 0; l < 8; ++l) {
        uint64_t two[2];
        SplitWord(src[l], two);
        dst[l] = two[0];
        dst[8 + l] = two[1];
      }
    }
}

template <int P, int G>
__attribute__((target("avx512f,avx512vl,avx512vpopcntdq"))) void TileAvx512(const Item& it, int64_t b, int64_t oy, int64_t ox0,
                                                                 int64_t g0) {
  const Geometry& g = *it.g;
  __m512i acc[P][G];
  for (int p = 0; p < P; ++p)
    for (int gi = 0; gi < G; ++gi) acc[p][gi] = _mm512_setzero_si512();
  const int64_t tapw = g.CW * 8, gstride = g.taps() * tapw;
  const int64_t run = g.K * g.CW;         // one kernel row: K taps x CW words, contiguous in A and Wb
  const int64_t pstep = g.S * g.CW;       // words between neighbouring output pixels' windows
  const uint64_t* wbase = it.Wb + g0 * gstride;
  for (int64_t ky = 0; ky < g.K; ++ky) {
    const uint64_t* ap = it.A + ((b * g.Hp + oy * g.S + ky) * g.Wp + ox0 * g.S) * g.CW;
    const uint64_t* wp = wbase + ky * run * 8;
    for (int64_t j = 0; j < run; ++j, ++ap, wp += 8) {
      __m512i w[G];
      for (int gi = 0; gi < G; ++gi) w[gi] = _mm512_loadu_si512(wp + gi * gstride);
      for (int p = 0; p < P; ++p) {
        const __m512i a = _mm512_set1_epi64(static_cast<long long>(ap[p * pstep]));
        for (int gi = 0; gi < G; ++gi)
          acc[p][gi] = _mm512_add_epi64(acc[p][gi], _mm512_popcnt_epi64(_mm512_xor_si512(a, w[gi])));
      }
    }
  }
  // epilogue, 16 output channels (two groups) per step: dot = N - 2 pc - corr;
  // y = clip(dot * scale + shift + R), in float32 in that order (no fused multiply-add).
  // Everything it reads from the Epilogue is copied to locals first: the output stores could
  // alias the struct as far as the compiler knows, and would force a reload per step.
  const Epilogue& ep = *it.ep;
  const int32_t* const corr_base = ep.corr;
  const float* const scale = ep.scale;
  const float* const shift = ep.shift;
  const float* const residual = ep.residual;
  float* const y = ep.y;
  uint8_t* const ysign = ep.ysign;
  const bool act = ep.act != 0;
  const int32_t* const thresh = ep.thresh;
  const int64_t OC = g.OC, OCp = g.OCp, CWo = (g.OC + 63) / 64;
  const __m512i n_bits = _mm512_set1_epi32(static_cast<int>(g.taps() * g.C));
  const __m512 lo = _mm512_set1_ps(ep.lo), hi = _mm512_set1_ps(ep.hi);
  const int64_t row_pix = (b * g.Ho + oy) * g.Wo;
  for (int p = 0; p < P; ++p) {
    const int64_t ox = ox0 + p, pix = row_pix + ox;
    const int32_t* cr = corr_base + static_cast<int64_t>(ep.BorderClass(oy, ox)) * OCp;
    float* out = y ? y + pix * OC : nullptr;
    const float* res = residual ? residual + pix * OC : nullptr;
    for (int gi = 0; gi < G; gi += 2) {
      const int64_t oc = (g0 + gi) * 8;
      const int64_t lanes = std::min<int64_t>(gi + 1 < G ? 16 : 8, OC - oc);
      const __mmask16 m = static_cast<__mmask16>(lanes >= 16 ? 0xFFFF : ((1u << lanes) - 1));
      __m512i pc = _mm512_castsi256_si512(_mm512_cvtepi64_epi32(acc[p][gi]));
      if (gi + 1 < G) pc = _mm512_inserti64x4(pc, _mm512_cvtepi64_epi32(acc[p][gi + 1]), 1);
      const __m512i corr = _mm512_maskz_loadu_epi32(m, cr + oc);
      const __m512i dot = _mm512_sub_epi32(_mm512_sub_epi32(n_bits, _mm512_add_epi32(pc, pc)), corr);
      if (thresh) {  // the next layer only needs the sign: integer threshold, packed bits out
        const __mmask16 neg = _mm512_mask_cmplt_epi32_mask(m, dot, _mm512_maskz_loadu_epi32(m, thresh + oc));
        OrBits(ep.ybits + pix * CWo + oc / 64, static_cast<uint64_t>(neg) << (oc % 64));
        continue;
      }
      __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(dot), _mm512_maskz_loadu_ps(m, scale + oc));
      v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, shift + oc));
      if (res) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, res + oc));
      if (act) v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
      _mm512_mask_storeu_ps(out + oc, m, v);
      if (ysign) {  // the bytes of these 8 or 16 channels: this work item's alone
        const unsigned neg = _mm512_mask_cmp_ps_mask(m, v, _mm512_setzero_ps(), _CMP_LT_OQ);
        uint8_t* sb = ysign + pix * CWo * 8 + oc / 8;
        sb[0] = static_cast<uint8_t>(neg);
        if (lanes > 8) sb[1] = static_cast<uint8_t>(neg >> 8);
      }
    }
  }
}

using TileFn = void (*)(const Item&, int64_t, int64_t, int64_t, int64_t);

#define BNN_TILE_TABLE(NAME, FN)                                                              \
  TileFn NAME##Table(int p, int gcount) {                                                      \
    static const TileFn t[kTilePixels][kTileGroups] = {                                        \
        {FN<1, 1>, FN<1, 2>, FN<1, 3>, FN<1, 4>}, {FN<2, 1>, FN<2, 2>, FN<2, 3>, FN<2, 4>},    \
        {FN<3, 1>, FN<3, 2>, FN<3, 3>, FN<3, 4>}, {FN<4, 1>, FN<4, 2>, FN<4, 3>, FN<4, 4>},    \
        {FN<5, 1>, FN<5, 2>, FN<5, 3>, FN<5, 4>}, {FN<6, 1>, FN<6, 2>, FN<6, 3>, FN<6, 4>}};   \
    return t[p - 1][gcount - 1];                                                               \
  }

BNN_TILE_TABLE(Portable, TilePortable)
BNN_TILE_TABLE(Avx512, TileAvx512)

TileFn Tile(Isa isa, int p, int gcount) {
  switch (isa) {
    case Isa::kAvx512: return Avx512Table(p, gcount);
    default: return PortableTable(p, gcount);
  }
}

// ------------------------------------------------------------------ the kernel

struct PackJob {
  const Geometry* g;
  const float* x;        // float input, or
  const uint64_t* bits;  // already packed input (B, H*W, CW)
  uint64_t* A;
  Isa isa;
};

void PackRow(void* data, size_t index) {  // one padded input row (b, y) of the packed buffer
  const PackJob& j = *static_cast<const PackJob*>(data);
  const Geometry& g = *j.g;
  const int64_t b = static_cast<int64_t>(index) / g.H, y = static_cast<int64_t>(index) % g.H;
  if (j.isa == Isa::kAvx2) {  // the split layout: [lo, hi] nibble words per input word
    uint64_t* dst = j.A + 2 * ((b * g.Hp + y + g.P) * g.Wp + g.P) * g.CW;
    if (j.bits) {
      const uint64_t* src = j.bits + (b * g.H + y) * g.W * g.CW;
      for (int64_t i = 0; i < g.W * g.CW; ++i) SplitWord(src[i], dst + 2 * i);
      return;
    }
    const float* src = j.x + (b * g.H + y) * g.W * g.C;
    for (int64_t x = 0; x < g.W; ++x, dst += 2 * g.CW, src += g.C) PackPixelAvx2Split(src, g.C, g.CW, dst);
    return;
  }
  uint64_t* dst = j.A + ((b * g.Hp + y + g.P) * g.Wp + g.P) * g.CW;
  if (j.bits) {
    std::memcpy(dst, j.bits + (b * g.H + y) * g.W * g.CW, static_cast<size_t>(g.W * g.CW) * sizeof(uint64_t));
    return;
  }
  const float* src = j.x + (b * g.H + y) * g.W * g.C;
  for (int64_t x = 0; x < g.W; ++x, dst += g.CW, src += g.C) {
    switch (j.isa) {
      case Isa::kAvx512: PackPixelAvx512(src, g.C, g.CW, dst); break;
      default: PackPixelPortable(src, g.C, g.CW, dst);
    }
  }
}

// The parameter-free shortcut for one output row (b, oy): each output pixel's channels are the mean
// of the input's in-image s x s window (summed in row order from 0, then divided, as PyTorch's
// avg_pool2d does), and 0 for channels C..OC-1.
struct PoolJob {
  const Geometry* g;
  const float* x;  // (B, H*W, C)
  float* out;      // (B, Ho*Wo, OC)
};

// The same loop compiled for AVX2 (8 channels per instruction, the same float operations in the same order).
template <int kVariant>
inline __attribute__((always_inline)) void PoolRowBody(void* data, size_t index) {
  const PoolJob& j = *static_cast<const PoolJob*>(data);
  const Geometry& g = *j.g;
  const int64_t b = static_cast<int64_t>(index) / g.Ho, oy = static_cast<int64_t>(index) % g.Ho;
  const int64_t y0 = oy * g.S, y1 = std::min(y0 + g.S, g.H);
  for (int64_t ox = 0; ox < g.Wo; ++ox) {
    const int64_t x0 = ox * g.S, x1 = std::min(x0 + g.S, g.W);
    float* o = j.out + ((b * g.Ho + oy) * g.Wo + ox) * g.OC;
    std::fill(o, o + g.OC, 0.0f);
    for (int64_t yy = y0; yy < y1; ++yy)
      for (int64_t xx = x0; xx < x1; ++xx) {
        const float* src = j.x + ((b * g.H + yy) * g.W + xx) * g.C;
        for (int64_t c = 0; c < g.C; ++c) o[c] = o[c] + src[c];
      }
    const float count = static_cast<float>((y1 - y0) * (x1 - x0));
    for (int64_t c = 0; c < g.C; ++c) o[c] = o[c] / count;
  }
}

void PoolRow(void* data, size_t index) { PoolRowBody<0>(data, index); }
__attribute__((target("avx2"))) void PoolRowAvx2(void* data, size_t index) { PoolRowBody<1>(data, index); }

using ItemFn = void (*)(void*, size_t);

// Phase a of a conv: items [0, pool_rows) pool the residual, the rest pack the input's rows.
struct PrepJob {
  ItemFn pool_fn;
  PoolJob* pool;
  int64_t pool_rows;
  PackJob* pack;
};

void PrepItem(void* data, size_t index) {
  const PrepJob& j = *static_cast<const PrepJob*>(data);
  const int64_t i = static_cast<int64_t>(index);
  if (i < j.pool_rows) {
    j.pool_fn(j.pool, index);
  } else {
    PackRow(j.pack, static_cast<size_t>(i - j.pool_rows));
  }
}

struct ConvJob {
  Item item;
  Isa isa;
  int64_t blocks;      // output-channel blocks of kTileGroups groups
  int avx2_pixels;     // AVX2: output pixels per register tile
};

void ConvItem(void* data, size_t index) {
  const ConvJob& j = *static_cast<const ConvJob*>(data);
  const Geometry& g = *j.item.g;
  // Block-major order: the thread pool hands out contiguous index ranges, so each thread works on
  // its own output channels and reads only their weights (the deep layers' weights are the
  // largest operand).
  const int64_t rows = g.B * g.Ho;
  const int64_t blk = static_cast<int64_t>(index) / rows;
  const int64_t row = static_cast<int64_t>(index) % rows;
  const int64_t b = row / g.Ho, oy = row % g.Ho;
  const int64_t g0 = blk * kTileGroups;
  const int gcount = static_cast<int>(std::min<int64_t>(kTileGroups, g.groups() - g0));
  if (j.isa == Isa::kAvx2) {  // tiles of 8 output channels x avx2_pixels pixels, a group's weights stay in L1
    const Avx2RowFn row_fn = Avx2RowFor(j.avx2_pixels);
    for (int64_t grp = g0; grp < g0 + gcount; ++grp) row_fn(j.item, b, oy, grp);
    return;
  }
  for (int64_t ox = 0; ox < g.Wo; ox += kTilePixels) {
    const int p = static_cast<int>(std::min<int64_t>(kTilePixels, g.Wo - ox));
    Tile(j.isa, p, gcount)(j.item, b, oy, ox, g0);
  }
}

// ------------------------------------------------------------------ threads
//
// onnxruntime's intra-op pool wakes its workers once per ParallelFor; with spinning off (the bench's and
// many servers' setting) a wake-up costs tens of microseconds, about as much as a whole conv of a deep
// layer at batch 1. With BNN_DISTILL_NATIVE_POOL=own the convs run on a small pool of their own, with as many threads as the session's
// intra-op pool has (found once per kernel, see ProbeThreads): a job is two phases (packing / pooling the
// input, then the conv) with a spinning barrier between them, so each conv is one wake-up or none. After
// a job the workers spin for BNN_DISTILL_NATIVE_SPIN_US (default 100) microseconds, then sleep: during an
// inference they stay awake from one conv to the next, an idle session costs nothing after that.
// Items are handed out from per-thread contiguous ranges (thread t starts on range t: its own output
// channels, so its own weights), and a thread that finishes its range helps with the others.
// It is not the default yet: on the 2-core dev machine, shared with other jobs, it was slower than
// onnxruntime's pool at 2 threads (a worker that is descheduled leaves the caller to do its share
// after spinning for it); a quiet machine has not been measured.

struct Phase {
  ItemFn fn = nullptr;
  void* data = nullptr;
  int64_t total = 0;
};

// Waits for pred with a short spin, then yielding the core: on a machine with more runnable threads
// than cores the thread we wait for may need ours.
template <typename Pred>
inline void WaitFor(Pred pred) {
  for (int i = 0; !pred(); ++i) {
    if (i < 4096) {
      _mm_pause();
    } else {
      std::this_thread::yield();
    }
  }
}

class SpinPool {
 public:
  static SpinPool& Get() {
    static SpinPool* pool = new SpinPool();  // never destroyed: workers may outlive static destructors
    return *pool;
  }

  // Runs phase a, then (once every item of a is done) phase b, on up to `threads` threads (the caller
  // and threads - 1 workers). Returns false, having run nothing, when another job holds the pool.
  // A worker that is slow to wake (or descheduled) never holds the job up: the caller takes its items,
  // and only workers that joined the job are waited for.
  bool Run(int threads, const Phase& a, const Phase& b) {
    std::unique_lock<std::mutex> job(job_mutex_, std::try_to_lock);
    if (!job.owns_lock()) return false;
    Grow(threads - 1);
    threads = std::min(threads, static_cast<int>(threads_.size()) + 1);
    n_.store(threads, std::memory_order_relaxed);
    phase_[0] = a, phase_[1] = b;
    for (int p = 0; p < 2; ++p) {
      completed_[p].v.store(0, std::memory_order_relaxed);
      for (int t = 0; t < threads; ++t) {
        const int64_t lo = phase_[p].total * t / threads, hi = phase_[p].total * (t + 1) / threads;
        next_[p][t].v.store(lo, std::memory_order_relaxed);
        end_[p][t] = hi;
      }
    }
    state_.fetch_and(~kClosed, std::memory_order_seq_cst);  // open (nobody is inside: see below)
    gen_.fetch_add(1, std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      { std::lock_guard<std::mutex> lk(m_); }
      cv_.notify_all();
    }
    Work(0);
    WaitFor([&] { return completed_[1].v.load(std::memory_order_acquire) >= phase_[1].total; });
    state_.fetch_or(kClosed, std::memory_order_seq_cst);  // no new joiners; wait for those inside
    WaitFor([&] { return (state_.load(std::memory_order_acquire) & ~kClosed) == 0; });
    return true;
  }

 private:
  static constexpr int kMaxThreads = 64;
  static constexpr int64_t kClosed = int64_t{1} << 40;
  struct alignas(64) Counter {
    std::atomic<int64_t> v{0};
  };

  SpinPool() {
    const char* env = std::getenv("BNN_DISTILL_NATIVE_SPIN_US");
    spin_us_ = env ? std::max(0, std::atoi(env)) : 100;
  }

  void Grow(int workers) {
    workers = std::min(workers, kMaxThreads - 1);
    while (static_cast<int>(threads_.size()) < workers) {
      const int id = static_cast<int>(threads_.size()) + 1;
      const uint64_t seen = gen_.load(std::memory_order_acquire);  // before the job that needs it is published
      threads_.emplace_back([this, id, seen] { Loop(id, seen); });
      threads_.back().detach();
    }
  }

  void RunPhase(int p, int t, int n) {
    const Phase& ph = phase_[p];
    for (int k = 0; k < n; ++k) {
      const int r = (t + k) % n;
      for (;;) {
        const int64_t i = next_[p][r].v.fetch_add(1, std::memory_order_relaxed);
        if (i >= end_[p][r]) break;
        ph.fn(ph.data, static_cast<size_t>(i));
        completed_[p].v.fetch_add(1, std::memory_order_release);
      }
    }
  }

  void Work(int t) {
    const int n = n_.load(std::memory_order_relaxed);
    if (phase_[0].total > 0) {
      RunPhase(0, t, n);
      WaitFor([&] { return completed_[0].v.load(std::memory_order_acquire) >= phase_[0].total; });
    }
    RunPhase(1, t, n);
  }

  void Loop(int id, uint64_t seen) {
    for (;;) {
      const auto t0 = std::chrono::steady_clock::now();
      int polls = 0;
      while (gen_.load(std::memory_order_acquire) == seen) {
        _mm_pause();
        if (++polls % 64 == 0 &&
            std::chrono::steady_clock::now() - t0 > std::chrono::microseconds(spin_us_)) {
          std::unique_lock<std::mutex> lk(m_);
          sleepers_.fetch_add(1, std::memory_order_seq_cst);
          cv_.wait(lk, [&] { return gen_.load(std::memory_order_seq_cst) != seen; });
          sleepers_.fetch_sub(1, std::memory_order_relaxed);
        }
      }
      seen = gen_.load(std::memory_order_acquire);
      // Join the job that is open now (if any, and if it wants this many threads). Whatever job that
      // is, its items, phases and counters are the current ones, and the caller waits for everyone
      // counted inside before it touches them again.
      if (state_.fetch_add(1, std::memory_order_seq_cst) & kClosed) {
        state_.fetch_sub(1, std::memory_order_seq_cst);
        continue;
      }
      if (id < n_.load(std::memory_order_acquire)) Work(id);
      state_.fetch_sub(1, std::memory_order_seq_cst);
    }
  }

  std::mutex job_mutex_, m_;
  std::condition_variable cv_;
  std::vector<std::thread> threads_;
  std::atomic<uint64_t> gen_{0};
  std::atomic<int> sleepers_{0};
  std::atomic<int64_t> state_{kClosed};  // kClosed bit | number of workers inside the current job
  std::atomic<int> n_{1};
  int spin_us_ = 100;
  Phase phase_[2];
  Counter completed_[2];
  Counter next_[2][kMaxThreads];
  int64_t end_[2][kMaxThreads] = {};
};

// How many threads the session's intra-op pool runs a ParallelFor on: every thread that takes an item
// registers, and the first item of each thread waits until no new thread has come for a while (at most
// a few milliseconds, once per kernel, on its first run).
struct ThreadProbe {
  std::mutex m;
  std::vector<std::thread::id> ids;
  std::chrono::steady_clock::time_point start, last;
};

void ProbeItem(void* data, size_t) {
  ThreadProbe& p = *static_cast<ThreadProbe*>(data);
  {
    std::lock_guard<std::mutex> lk(p.m);
    const auto id = std::this_thread::get_id();
    if (std::find(p.ids.begin(), p.ids.end(), id) != p.ids.end()) return;
    p.ids.push_back(id);
    p.last = std::chrono::steady_clock::now();
  }
  for (;;) {
    std::this_thread::sleep_for(std::chrono::microseconds(50));
    std::lock_guard<std::mutex> lk(p.m);
    const auto now = std::chrono::steady_clock::now();
    if (now - p.last > std::chrono::microseconds(1500) || now - p.start > std::chrono::milliseconds(8)) return;
  }
}

int ProbeThreads(const Ort::KernelContext& ctx) {
  ThreadProbe p;
  p.start = p.last = std::chrono::steady_clock::now();
  ctx.ParallelFor(ProbeItem, 256, 0, &p);
  return std::max<int>(1, static_cast<int>(p.ids.size()));
}

// Packing and pooling are a few percent of the conv's work. On small tensors they run on the
// calling thread, so each op wakes the intra-op pool once (a wake-up costs more than they would
// save); on large ones (a big batch: memory-bound passes over megabytes) they are split too.
constexpr int64_t kParallelFloats = int64_t{1} << 18;

void RunRows(const Ort::KernelContext& ctx, void (*fn)(void*, size_t), int64_t rows, int64_t floats, void* job) {
  if (floats >= kParallelFloats) {
    ctx.ParallelFor(fn, static_cast<size_t>(rows), 0, job);
  } else {
    for (int64_t r = 0; r < rows; ++r) fn(job, static_cast<size_t>(r));
  }
}

struct BinaryConvKernel {
  // in_bits: input 0 is packed sign bits (B, H*W, ceil(C/64)) uint64 from a ...ToBits node.
  // out_bits: the output is packed sign bits; input 3 is the integer thresholds (OC,) int32.
  BinaryConvKernel(const OrtKernelInfo* info, bool in_bits, bool out_bits) : in_bits_(in_bits), out_bits_(out_bits) {
    Ort::ConstKernelInfo ki(info);
    in_h_ = ki.GetAttribute<int64_t>("in_h");
    in_w_ = ki.GetAttribute<int64_t>("in_w");
    in_c_ = ki.GetAttribute<int64_t>("in_c");
    out_c_ = ki.GetAttribute<int64_t>("out_c");
    k_ = ki.GetAttribute<int64_t>("kernel");
    s_ = ki.GetAttribute<int64_t>("stride");
    p_ = ki.GetAttribute<int64_t>("pad");
    act_ = 0;
    lo_ = hi_ = 0.0f;
    res_mode_ = 0;
    if (!out_bits_) {
      act_ = static_cast<int>(ki.GetAttribute<int64_t>("act"));
      lo_ = ki.GetAttribute<float>("act_min");
      hi_ = ki.GetAttribute<float>("act_max");
      try {
        res_mode_ = static_cast<int>(ki.GetAttribute<int64_t>("residual"));
      } catch (const Ort::Exception&) {  // absent: an output-shaped residual
      }
    }
    if (res_mode_ != 0 && res_mode_ != 1) throw std::runtime_error("BinaryConv2d: residual must be 0 or 1");
    if (res_mode_ == 1 && in_c_ > out_c_) throw std::runtime_error("BinaryConv2d: a pooled residual needs in_c <= out_c");
    if (!((k_ == 3 && p_ == 1) || (k_ == 1 && p_ == 0)))
      throw std::runtime_error("BinaryConv2d: only kernel 3 with pad 1 and kernel 1 with pad 0 are supported");
    if (s_ < 1 || in_h_ < 1 || in_w_ < 1 || in_c_ < 1 || out_c_ < 1)
      throw std::runtime_error("BinaryConv2d: stride, sizes and channel counts must be positive");
    isa_ = ChooseIsa();
    if (const char* env = std::getenv("BNN_DISTILL_NATIVE_PHASES")) phases_ = std::string(env) == "1";
    if (phases_) name_ = ki.GetNodeName();
    if (const char* env = std::getenv("BNN_DISTILL_NATIVE_POOL")) {
      const std::string v(env);
      if (v == "own") {
        pool_mode_ = 2;
      } else if (!v.empty() && v != "ort") {
        throw std::runtime_error("BNN_DISTILL_NATIVE_POOL='" + v + "' is not one of own, ort");
      }
    }
    avx2_pixels_ = 4;
    if (const char* env = std::getenv("BNN_DISTILL_NATIVE_AVX2_PIXELS")) {  // a tuning knob for benchmarks and tests
      const int v = std::atoi(env);
      if (v < 1 || v > kAvx2MaxPixels) throw std::runtime_error("BNN_DISTILL_NATIVE_AVX2_PIXELS must be 1..4");
      avx2_pixels_ = v;
    }
    if (isa_ == Isa::kAvx2) {  // constant weights (the usual case) are split into nibbles once, here
      int is_const = 0;
      Ort::ConstValue w = ki.GetTensorConstantInput(1, &is_const);
      const int64_t cw = (in_c_ + 63) / 64, groups = (out_c_ + 7) / 8;
      if (is_const && w.GetTensorTypeAndShapeInfo().GetShape() == std::vector<int64_t>{groups, k_ * k_, cw, 8}) {
        wsplit_.resize(static_cast<size_t>(groups * k_ * k_ * cw * 16));
        SplitWeights(w.GetTensorData<uint64_t>(), groups, k_ * k_ * cw, wsplit_.data());
      }
    }
  }

  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    Ort::ConstValue X = ctx.GetInput(0), Wv = ctx.GetInput(1), Cv = ctx.GetInput(2), Sv = ctx.GetInput(3);
    const std::vector<int64_t> xs = X.GetTensorTypeAndShapeInfo().GetShape();
    Geometry g{};
    g.H = in_h_, g.W = in_w_, g.C = in_c_, g.OC = out_c_, g.K = k_, g.S = s_, g.P = p_;
    g.CW = (g.C + 63) / 64;
    const int64_t last = in_bits_ ? g.CW : g.C;
    if (xs.size() != 3 || xs[1] != g.H * g.W || xs[2] != last)
      throw std::runtime_error(std::string("BinaryConv2d: input must be (batch, ") + std::to_string(g.H * g.W) + ", " +
                               std::to_string(last) + (in_bits_ ? ") packed words" : ")"));
    g.B = xs[0];
    g.OCp = (g.OC + 7) / 8 * 8;
    g.Ho = (g.H + 2 * g.P - g.K) / g.S + 1;
    g.Wo = (g.W + 2 * g.P - g.K) / g.S + 1;
    g.Hp = g.H + 2 * g.P;
    g.Wp = g.W + 2 * g.P;
    const std::vector<int64_t> ws = Wv.GetTensorTypeAndShapeInfo().GetShape();
    if (ws != std::vector<int64_t>{g.OCp / 8, g.taps(), g.CW, 8})
      throw std::runtime_error("BinaryConv2d: packed weights have the wrong shape for out_c/kernel/in_c");
    if (Cv.GetTensorTypeAndShapeInfo().GetElementCount() != static_cast<size_t>(16 * g.OCp) ||
        Sv.GetTensorTypeAndShapeInfo().GetElementCount() != static_cast<size_t>(g.OC))
      throw std::runtime_error("BinaryConv2d: corr must have 16*OCp elements, scale (or thresholds) OC");
    const float* shift = nullptr;
    const float* residual = nullptr;
    if (!out_bits_) {
      Ort::ConstValue Tv = ctx.GetInput(4);
      if (Tv.GetTensorTypeAndShapeInfo().GetElementCount() != static_cast<size_t>(g.OC))
        throw std::runtime_error("BinaryConv2d: shift must have OC elements");
      shift = Tv.GetTensorData<float>();
      if (ctx.GetInputCount() > 5) {
        Ort::ConstValue R = ctx.GetInput(5);
        if (static_cast<const OrtValue*>(R) != nullptr) {
          const std::vector<int64_t> rs = R.GetTensorTypeAndShapeInfo().GetShape();
          const std::vector<int64_t> want = res_mode_ == 0 ? std::vector<int64_t>{g.B, g.Ho * g.Wo, g.OC}
                                                           : std::vector<int64_t>{g.B, g.H * g.W, g.C};
          if (rs != want)
            throw std::runtime_error(res_mode_ == 0 ? "BinaryConv2d: the residual must have the output's shape"
                                                    : "BinaryConv2d: a pooled residual must have the input's shape");
          residual = R.GetTensorData<float>();
        }
      }
      if (res_mode_ == 1 && residual == nullptr)
        throw std::runtime_error("BinaryConv2d: residual=1 needs the float tensor to pool as input 5 (R)");
    }
    const int64_t cwo = (g.OC + 63) / 64;
    Ort::UnownedValue Y = ctx.GetOutput(0, std::vector<int64_t>{g.B, g.Ho * g.Wo, out_bits_ ? cwo : g.OC});
    uint8_t* ysign = nullptr;  // output 1, when the node has it: Y's packed signs
    if (!out_bits_ && ctx.GetOutputCount() > 1) {
      Ort::UnownedValue S = ctx.GetOutput(1, std::vector<int64_t>{g.B, g.Ho * g.Wo, cwo});
      if (static_cast<OrtValue*>(S) != nullptr) {
        ysign = reinterpret_cast<uint8_t*>(S.GetTensorMutableData<uint64_t>());
        std::memset(ysign, 0, static_cast<size_t>(g.B * g.Ho * g.Wo * cwo) * sizeof(uint64_t));
      }
    }
    if (g.B == 0) return;
    uint64_t* ybits = nullptr;
    if (out_bits_) {
      ybits = Y.GetTensorMutableData<uint64_t>();
      std::memset(ybits, 0, static_cast<size_t>(g.B * g.Ho * g.Wo * cwo) * sizeof(uint64_t));
    }
    const auto t_start = std::chrono::steady_clock::now();
    if (threads_ == 0) threads_ = pool_mode_ == 2 ? ProbeThreads(ctx) : 1;  // first run: the session's threads
    const bool own_pool = pool_mode_ == 2 && threads_ > 1;

    thread_local std::vector<float> pooled;
    PoolJob pool{&g, residual, nullptr};
    int64_t pool_rows = 0;
    if (residual != nullptr && res_mode_ == 1) {
      pooled.resize(static_cast<size_t>(g.B * g.Ho * g.Wo * g.OC));
      pool.out = pooled.data();
      pool_rows = g.B * g.Ho;
      residual = pooled.data();
    }
    const ItemFn pool_fn = isa_ == Isa::kPortable ? PoolRow : PoolRowAvx2;

    const bool split = isa_ == Isa::kAvx2;
    const uint64_t* wbits = Wv.GetTensorData<uint64_t>();
    if (split) {
      if (wsplit_.empty()) {  // weights computed at run time: split them on every call
        thread_local std::vector<uint64_t> wtmp;
        wtmp.resize(static_cast<size_t>(g.groups() * g.taps() * g.CW * 16));
        SplitWeights(wbits, g.groups(), g.taps() * g.CW, wtmp.data());
        wbits = wtmp.data();
      } else {
        wbits = wsplit_.data();
      }
    }
    thread_local std::vector<uint64_t> packed;
    const size_t words = static_cast<size_t>(g.B * g.Hp * g.Wp * g.CW) * (split ? 2 : 1);
    packed.assign(words, 0);  // the border stays 0: +1 values, corrected by corr
    PackJob pj{&g, in_bits_ ? nullptr : X.GetTensorData<float>(), in_bits_ ? X.GetTensorData<uint64_t>() : nullptr,
               packed.data(), isa_};
    const int64_t pack_rows = g.B * g.H;

    Epilogue ep{&g, Cv.GetTensorData<int32_t>(), out_bits_ ? nullptr : Sv.GetTensorData<float>(), shift, residual,
                out_bits_ ? Sv.GetTensorData<int32_t>() : nullptr, ybits,
                out_bits_ ? nullptr : Y.GetTensorMutableData<float>(), ysign, act_, lo_, hi_};
    ConvJob cj{{&g, packed.data(), wbits, &ep}, isa_, (g.groups() + kTileGroups - 1) / kTileGroups, avx2_pixels_};
    const int64_t conv_items = g.B * g.Ho * cj.blocks;

    // phase a: pooled residual rows, then packed input rows (independent); phase b: the conv
    PrepJob prep{pool_fn, &pool, pool_rows, &pj};
    auto t_packed = t_start;
    if (!(own_pool && SpinPool::Get().Run(threads_, Phase{PrepItem, &prep, pool_rows + pack_rows},
                                          Phase{ConvItem, &cj, conv_items}))) {
      if (pool_rows) RunRows(ctx, pool_fn, pool_rows, g.B * g.H * g.W * g.C, &pool);
      RunRows(ctx, PackRow, pack_rows, g.B * g.H * g.W * (in_bits_ ? g.CW : g.C), &pj);
      t_packed = std::chrono::steady_clock::now();
      if (threads_ == 1 && pool_mode_ == 2) {
        for (int64_t i = 0; i < conv_items; ++i) ConvItem(&cj, static_cast<size_t>(i));
      } else {
        ctx.ParallelFor(ConvItem, static_cast<size_t>(conv_items), 0, &cj);
      }
    }
    if (phases_) {
      const auto t_end = std::chrono::steady_clock::now();
      const double prep_us = std::chrono::duration<double, std::micro>(t_packed - t_start).count();
      const double conv_us = std::chrono::duration<double, std::micro>(t_end - t_packed).count();
      ++calls_;
      prep_min_ = std::min(prep_min_, prep_us), conv_min_ = std::min(conv_min_, conv_us);
      prep_sum_ += prep_us, conv_sum_ += conv_us;
    }
  }

  ~BinaryConvKernel() {
    if (phases_ && calls_ > 0)
      std::fprintf(stderr, "bnn_distill phases %s isa=%s calls=%lld prep_us min %.2f mean %.2f conv_us min %.2f mean %.2f\n",
                   name_.c_str(), IsaName(isa_), static_cast<long long>(calls_), prep_min_, prep_sum_ / calls_, conv_min_,
                   conv_sum_ / calls_);
  }

 private:
  bool in_bits_, out_bits_;
  int64_t in_h_, in_w_, in_c_, out_c_, k_, s_, p_;
  int act_, res_mode_;
  float lo_, hi_;
  Isa isa_;
  int avx2_pixels_;
  std::vector<uint64_t> wsplit_;  // AVX2: the constant weights in the split layout (empty: split per call)
  // BNN_DISTILL_NATIVE_PHASES=1: time the packing (and pooling) and the conv of every call; printed to
  // stderr when the session is destroyed (a profiling aid; the numbers do not change the outputs).
  bool phases_ = false;
  std::string name_;
  int64_t calls_ = 0;
  double prep_min_ = 1e30, conv_min_ = 1e30, prep_sum_ = 0, conv_sum_ = 0;
  // threads: BNN_DISTILL_NATIVE_POOL=ort (default: onnxruntime's ParallelFor for every conv) or own (the
  // library's spinning pool, as many threads as the session's intra-op pool, found on the first run)
  int pool_mode_ = 1;
  int threads_ = 0;  // 0: not probed yet
};

// BinaryConv2d: float in, float out. BinaryConv2dToBits: float in, sign bits out (the BatchNorm and
// the next layer's sign folded into integer thresholds: inputs X, Wbits, corr, thresholds).
// BinaryConv2dFromBits: sign bits in (from a ...ToBits node), float out.
template <bool InBits, bool OutBits>
struct BinaryConvOp : Ort::CustomOpBase<BinaryConvOp<InBits, OutBits>, BinaryConvKernel> {
  void* CreateKernel(const OrtApi& /*api*/, const OrtKernelInfo* info) const {
    return new BinaryConvKernel(info, InBits, OutBits);
  }
  const char* GetName() const {
    return OutBits ? "BinaryConv2dToBits" : (InBits ? "BinaryConv2dFromBits" : "BinaryConv2d");
  }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return OutBits ? 4 : 6; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    if (i == 0) return InBits ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT64 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    if (i == 1) return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT64;
    if (i == 2 || (i == 3 && OutBits)) return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
    return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i == 5 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return OutBits ? 1 : 2; }  // float out: Y, and optionally its packed signs
  ONNXTensorElementDataType GetOutputType(size_t i) const {
    return OutBits || i == 1 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT64 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  OrtCustomOpInputOutputCharacteristic GetOutputCharacteristic(size_t i) const {
    return i == 1 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
};

std::once_flag g_once;
Ort::CustomOpDomain* g_domain = nullptr;

}  // namespace

// The calling thread's CPU time in ns: the floors below are measured with it, so that time the thread
// spends descheduled on a busy machine does not count.
inline double ThreadNs() {
  timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return static_cast<double>(t.tv_sec) * 1e9 + static_cast<double>(t.tv_nsec);
}

// The instruction-throughput floor of the AVX-512 inner loop: the conv's 6 x 4 register tile run
// over L1-resident words (no epilogue, packing or memory traffic). Returns ns per vector step (one
// broadcast-XOR-VPOPCNTQ-add of 8 output channels x 64 bits), or -1 without AVX-512 VPOPCNTDQ.
__attribute__((target("avx512f,avx512vpopcntdq"))) double PeakAvx512(int64_t steps) {
  alignas(64) uint64_t a[64], w[4 * 64 * 8];
  for (int i = 0; i < 64; ++i) a[i] = 0x9E3779B97F4A7C15ull * (i + 1);
  for (int i = 0; i < 4 * 64 * 8; ++i) w[i] = 0xD1B54A32D192ED03ull * (i + 7);
  __m512i acc[6][4];
  for (auto& row : acc)
    for (auto& v : row) v = _mm512_setzero_si512();
  const int64_t rounds = std::max<int64_t>(1, steps / (6 * 4 * 64));
  const double t0 = ThreadNs();
  for (int64_t r = 0; r < rounds; ++r) {
    for (int j = 0; j < 64 - 6; ++j) {
      __m512i wv[4];
      for (int gi = 0; gi < 4; ++gi) wv[gi] = _mm512_load_si512(w + (gi * 64 + j) * 8);
      for (int p = 0; p < 6; ++p) {
        const __m512i av = _mm512_set1_epi64(static_cast<long long>(a[j + p]));
        for (int gi = 0; gi < 4; ++gi) acc[p][gi] = _mm512_add_epi64(acc[p][gi], _mm512_popcnt_epi64(_mm512_xor_si512(av, wv[gi])));
      }
    }
    asm volatile("" ::: "memory");
  }
  const double ns = ThreadNs() - t0;
  __m512i sum = _mm512_setzero_si512();
  for (auto& row : acc)
    for (auto& v : row) sum = _mm512_add_epi64(sum, v);
  volatile long long sink = _mm512_reduce_add_epi64(sum);
  (void)sink;
  return ns / static_cast<double>(rounds * (64 - 6) * 6 * 4);
}

// The instruction-throughput floor of the AVX2 inner loop: the conv's 4-pixel x 8-channel register tile
// (Avx2Core<4>) run over L1-resident split words (no epilogue, packing or memory traffic). Returns ns
// per step of the same size as an AVX-512 step (8 output channels x 64 input bits = 512 binary MACs),
// or -1 without AVX2.
__attribute__((target("avx2"))) double PeakAvx2(int64_t steps) {
  constexpr int kRun = 64, kP = 4;
  alignas(64) static uint64_t a[2 * (kRun + kP)];
  alignas(64) static uint64_t w[kRun * 16];
  for (int i = 0; i < 2 * (kRun + kP); ++i) a[i] = (0x9E3779B97F4A7C15ull * (i + 1)) & kNibbles;
  for (int i = 0; i < kRun * 16; ++i) w[i] = (0xD1B54A32D192ED03ull * (i + 7)) & kNibbles;
  const int64_t rounds = std::max<int64_t>(1, steps / (kRun * kP));
  __m256i sum = _mm256_setzero_si256();
  const double t0 = ThreadNs();
  for (int64_t r = 0; r < rounds; ++r) {
    __m256i acc[kP][2];
    Avx2Core<kP>(a, 2, 0, w, 1, kRun, acc);
    for (int p = 0; p < kP; ++p) sum = _mm256_add_epi64(sum, _mm256_xor_si256(acc[p][0], acc[p][1]));
    asm volatile("" ::: "memory");
  }
  const double ns = ThreadNs() - t0;
  alignas(32) uint64_t out[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(out), sum);
  volatile uint64_t sink = out[0] + out[1] + out[2] + out[3];
  (void)sink;
  return ns / static_cast<double>(rounds * kRun * kP);
}

extern "C" {

// The floor of the kernel family this CPU runs by default (ns per 512-MAC step; -1: none measured,
// the portable kernels).
__attribute__((visibility("default"))) double BnnDistillPeakNsPerStep(int64_t steps) {
  return CpuHasAvx512() ? PeakAvx512(steps) : (CpuHasAvx2() ? PeakAvx2(steps) : -1.0);
}

// The floor of one kernel family: isa 2 AVX-512, 1 AVX2 (-1 when this CPU cannot run it).
__attribute__((visibility("default"))) double BnnDistillPeakNsPerStepIsa(int isa, int64_t steps) {
  if (isa == 2) return CpuHasAvx512() ? PeakAvx512(steps) : -1.0;
  if (isa == 1) return CpuHasAvx2() ? PeakAvx2(steps) : -1.0;
  return -1.0;
}

// The kernel family this CPU runs (what BNN_DISTILL_NATIVE_ISA=auto picks).
__attribute__((visibility("default"))) const char* BnnDistillNativeIsa() { return IsaName(BestIsa()); }

__attribute__((visibility("default"))) int BnnDistillNativeAbi() { return 2; }  // 2: output 1 (packed signs)

__attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                                const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) return nullptr;  // cannot even build a status: the runtime is too old
  Ort::InitApi(api);
  try {
    std::call_once(g_once, [] {
      g_domain = new Ort::CustomOpDomain("ai.bnn_distill");  // lives as long as the process, with its ops
      g_domain->Add(new BinaryConvOp<false, false>());
      g_domain->Add(new BinaryConvOp<false, true>());
      g_domain->Add(new BinaryConvOp<true, false>());
    });
    Ort::UnownedSessionOptions(options).Add(*g_domain);
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_FAIL, e.what());
  }
  return nullptr;
}

}  // extern "C"
