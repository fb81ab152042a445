// Λ-attention on the CPU straight from the paged cache: one fused pass per block of queries
// over the pages its tile may see, with the query turned per page (DESIGN §3).
//
// The PyTorch statement of the same numbers is attention/reference.py; this kernel is
// tested against it and against the float64 oracle (tests/unit/test_reference.py).
//
// Work item: (tile, KV head, block of kQueryBlock queries). Its rows are the block's queries
// times the query heads sharing the KV head (GQA), so every page's keys and values are read
// once per item. Per page, with the page's keys K [B, D] and values V [B, D] read in place:
//   1. q' [M, D]  = the rows turned by query_angle(t, b_p) = min(t - b_p, L) - (t mod B),
//                   times the softmax scale (one turn per row and page: 1/B of the work);
//   2. s  [M, k]  = q' · K[kmin..kmax]^T                         (GEMM)
//   3. P  [M, k]  = s masked to the Λ window, online softmax (flash attention; exp_u20,
//                   torch's own CPU flash-attention exponential)
//   4. acc [M, D] = acc * alpha + P · V[kmin..kmax]              (GEMM)
// The GEMMs are torch's (at::native::cpublas::brgemm: oneDNN on x86); blocks of fewer than
// kGemmRows rows (decode tiles) use vector loops instead.
// kmin..kmax is the union over the block's queries of the slots they see in the page: every
// slot in it holds a written token (a visible key lies at or before the newest query, and
// slots between two visible ones of one page are tokens of the same page), so slots that
// may hold anything (unwritten or stale) never enter a GEMM, where a zero weight times a NaN
// would still poison the sum.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Queries per work item: rows = 128 x the GQA group; the per-item scratch (turned rows,
// logits, accumulator: rows x (2D + B) floats) stays within L2 for groups up to 4.
constexpr int64_t kQueryBlock = 128;

// row[k] = exp(row[k] - max) in place (0 for -inf: exp_u20 flushes below float's range,
// torch's own CPU flash-attention exponential); returns the sum of the new values.
inline float exponentiate(float* row, int64_t n, float max) {
  const Vec shift(max);
  Vec total(0.0f);
  int64_t k = 0;
  for (; k + Vec::size() <= n; k += Vec::size()) {
    const Vec weight = (Vec::loadu(row + k) - shift).exp_u20();
    weight.store(row + k);
    total = total + weight;
  }
  if (k < n) {
    const Vec weight = (Vec::loadu(row + k, n - k) - shift).exp_u20();
    weight.store(row + k, n - k);
    total = total + Vec::set(Vec(0.0f), weight, n - k);
  }
  return at::vec::vec_reduce_all<float>([](Vec x, Vec y) { return x + y; }, total);
}

struct Settings {
  int64_t n_global, n_local, trained_length, page_size, rotary_dim;
  bool is_neox_style;
  float scale;
};

// The slots of one page a query sees, as offsets: k <= hi and (k >= lo or k <= global_hi).
struct PageWindow {
  int64_t lo, hi;
  bool any(int64_t global_hi) const { return hi >= 0 && (lo <= hi || global_hi >= 0); }
  int64_t first(int64_t global_hi) const { return global_hi >= 0 ? 0 : lo; }
};

inline PageWindow window_of(int64_t position, int64_t page_base, const Settings& s) {
  const int64_t offset = position - page_base;  // t - b_p
  return {std::max<int64_t>(0, offset - s.n_local + 1), std::min(s.page_size - 1, offset)};
}

// rows_out[g * D + d] = scale * (row g turned by `angle`), for `group` rows (a query's heads,
// or a page's keys) that share one angle.
template <typename scalar_t>
void turn_rows(const scalar_t* rows, int64_t row_stride, int64_t group, int64_t head_dim,
               int64_t angle, const float* cos_sin, const Settings& s, float scale,
               float* rows_out) {
  const int64_t half = s.rotary_dim / 2;
  const float* cos = cos_sin + std::abs(angle) * s.rotary_dim;
  const float* sin = cos + half;
  const float sign = angle < 0 ? -1.0f : 1.0f;
  float cos_row[256], sin_row[256];  // half <= 256: head_dim <= 512 (checked by the caller)
  for (int64_t j = 0; j < half; ++j) {
    cos_row[j] = scale * cos[j];
    sin_row[j] = scale * sign * sin[j];
  }
  for (int64_t g = 0; g < group; ++g) {
    const scalar_t* x = rows + g * row_stride;
    float* out = rows_out + g * head_dim;
    // Rotation pairs (x1[j], x2[j]): the two halves of the rotated dims (neox), or the even
    // and odd dims (GPT-J); each layout in its own loop, so both vectorise.
    if (s.is_neox_style) {
#pragma omp simd
      for (int64_t j = 0; j < half; ++j) {
        const float x1 = static_cast<float>(x[j]), x2 = static_cast<float>(x[j + half]);
        out[j] = x1 * cos_row[j] - x2 * sin_row[j];
        out[j + half] = x2 * cos_row[j] + x1 * sin_row[j];
      }
    } else {
#pragma omp simd
      for (int64_t j = 0; j < half; ++j) {
        const float x1 = static_cast<float>(x[2 * j]), x2 = static_cast<float>(x[2 * j + 1]);
        out[2 * j] = x1 * cos_row[j] - x2 * sin_row[j];
        out[2 * j + 1] = x2 * cos_row[j] + x1 * sin_row[j];
      }
    }
    for (int64_t d = s.rotary_dim; d < head_dim; ++d) {
      out[d] = scale * static_cast<float>(x[d]);
    }
  }
}

// dst [cols, rows] = src [rows, cols] (leading dims ld_src, ld_dst), in 16 x 16 blocks.
inline void transpose(const float* src, int64_t ld_src, float* dst, int64_t ld_dst,
                      int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; r += 16) {
    for (int64_t c = 0; c < cols; c += 16) {
      at::vec::transpose_mxn<float>(src + r * ld_src + c, ld_src, dst + c * ld_dst + r, ld_dst,
                                    std::min<int64_t>(16, rows - r),
                                    std::min<int64_t>(16, cols - c));
    }
  }
}

// Vector loops for blocks of few rows (decode tiles), where a GEMM call costs more than the
// work. Head dims are read in vectors of Vec::size(); a partial last vector loads zeros.
inline Vec load(const float* x, int64_t n) {
  return n >= Vec::size() ? Vec::loadu(x) : Vec::loadu(x, n);
}

// logits [rows, keys] = rows_in [rows, D] · K^T, Vec::size() keys at a time, each with
// its own accumulator (independent FMA chains); their partial sums are transposed so one
// vector sum gives all their dot products.
inline void small_logits(const float* rows_in, int64_t rows, const float* keys,
                         int64_t ld_keys, int64_t num_keys, int64_t head_dim, float* logits) {
  constexpr int64_t lanes = Vec::size();
  alignas(64) float partial[lanes * lanes], transposed[lanes * lanes];
  for (int64_t m = 0; m < rows; ++m) {
    const float* q = rows_in + m * head_dim;
    for (int64_t k0 = 0; k0 < num_keys; k0 += lanes) {
      const int64_t n = std::min(lanes, num_keys - k0);
      const float* block = keys + k0 * ld_keys;
      if (n == lanes) {
        Vec total[lanes];
        for (int64_t j = 0; j < lanes; ++j) total[j] = Vec(0.0f);
        for (int64_t d = 0; d < head_dim; d += lanes) {
          const Vec qd = load(q + d, head_dim - d);
          for (int64_t j = 0; j < lanes; ++j) {
            total[j] = at::vec::fmadd(qd, load(block + j * ld_keys + d, head_dim - d), total[j]);
          }
        }
        for (int64_t j = 0; j < lanes; ++j) total[j].store(partial + j * lanes);
      } else {
        for (int64_t j = 0; j < n; ++j) {
          Vec total(0.0f);
          for (int64_t d = 0; d < head_dim; d += lanes) {
            total = at::vec::fmadd(load(q + d, head_dim - d),
                                   load(block + j * ld_keys + d, head_dim - d), total);
          }
          total.store(partial + j * lanes);
        }
      }
      at::vec::transpose_mxn<float>(partial, lanes, transposed, lanes, n, lanes);
      Vec dots(0.0f);
      for (int64_t lane = 0; lane < lanes; ++lane) dots = dots + Vec::loadu(transposed + lane * lanes);
      dots.store(logits + m * num_keys + k0, n);
    }
  }
}

// acc [rows, D] += weights [rows, keys] · V [keys, D], four keys per step in independent
// accumulators.
inline void small_accumulate(const float* weights, int64_t rows, const float* values,
                             int64_t ld_values, int64_t num_keys, int64_t head_dim, float* acc) {
  for (int64_t m = 0; m < rows; ++m) {
    const float* w = weights + m * num_keys;
    for (int64_t d = 0; d < head_dim; d += Vec::size()) {
      const int64_t n = std::min<int64_t>(Vec::size(), head_dim - d);
      const float* v = values + d;
      Vec t0 = load(acc + m * head_dim + d, n), t1(0.0f), t2(0.0f), t3(0.0f);
      int64_t k = 0;
      for (; k + 4 <= num_keys; k += 4) {
        t0 = at::vec::fmadd(Vec(w[k]), load(v + k * ld_values, n), t0);
        t1 = at::vec::fmadd(Vec(w[k + 1]), load(v + (k + 1) * ld_values, n), t1);
        t2 = at::vec::fmadd(Vec(w[k + 2]), load(v + (k + 2) * ld_values, n), t2);
        t3 = at::vec::fmadd(Vec(w[k + 3]), load(v + (k + 3) * ld_values, n), t3);
      }
      for (; k < num_keys; ++k) t0 = at::vec::fmadd(Vec(w[k]), load(v + k * ld_values, n), t0);
      ((t0 + t1) + (t2 + t3)).store(acc + m * head_dim + d, n);
    }
  }
}

// Below this many rows (a decode tile: rows = the GQA group) a GEMM call and the
// transposition it needs cost more than plain vector loops over the page.
constexpr int64_t kGemmRows = 16;

// logits [rows, keys] = turned [rows, D] · K^T, K [keys, D] with leading dim ld_keys. The
// GEMM takes row-major operands only, so K is transposed first (keys * D floats, 1 / rows
// of the GEMM's work).
inline void page_logits(const float* turned, int64_t rows, const float* keys, int64_t ld_keys,
                        int64_t num_keys, int64_t head_dim, float* keys_t, float* logits) {
  if (rows < kGemmRows) {
    small_logits(turned, rows, keys, ld_keys, num_keys, head_dim, logits);
    return;
  }
  transpose(keys, ld_keys, keys_t, num_keys, num_keys, head_dim);
  at::native::cpublas::brgemm(rows, num_keys, head_dim, head_dim, num_keys, num_keys, false,
                              turned, keys_t, logits, false);
}

// acc [rows, D] += weights [rows, keys] · V [keys, D] (leading dim ld_values).
inline void accumulate_values(const float* weights, int64_t rows, const float* values,
                              int64_t ld_values, int64_t num_keys, int64_t head_dim,
                              float* acc) {
  if (rows < kGemmRows) {
    small_accumulate(weights, rows, values, ld_values, num_keys, head_dim, acc);
    return;
  }
  at::native::cpublas::brgemm(rows, head_dim, num_keys, num_keys, ld_values, head_dim, true,
                              weights, values, acc, false);
}

// Sets the logits of slots kmin.. a query does not see to -inf; returns the row's max.
inline float mask_to_window(float* row, int64_t keys, int64_t kmin, PageWindow w,
                            int64_t global_hi) {
  if (w.lo <= kmin && w.hi >= kmin + keys - 1) {  // it sees them all (most pages of a window)
    return at::vec::reduce_all<float>([](Vec x, Vec y) { return at::vec::maximum(x, y); }, row,
                                      keys);
  }
  float max = kNegInf;
#pragma omp simd reduction(max : max)
  for (int64_t k = 0; k < keys; ++k) {
    const int64_t slot = kmin + k;
    const bool visible = slot <= w.hi && (slot >= w.lo || slot <= global_hi);
    const float logit = visible ? row[k] : kNegInf;
    row[k] = logit;
    max = logit > max ? logit : max;
  }
  return max;
}

template <typename scalar_t>
void attend_item(const at::Tensor& query, const at::Tensor& kv_cache, at::Tensor& output,
                 const int64_t* query_rows, const int64_t* query_position,
                 const int64_t* page_block, const int64_t* page_base, int64_t num_pages,
                 int64_t num_queries, int64_t kv_head, const float* cos_sin,
                 const Settings& s) {
  const int64_t num_heads = query.size(1), head_dim = query.size(2);
  const int64_t num_kv_heads = kv_cache.size(1), width = kv_cache.size(3);
  const int64_t group = num_heads / num_kv_heads, rows = num_queries * group;
  const int64_t page_size = s.page_size;
  const scalar_t* q_data = query.data_ptr<scalar_t>();
  const scalar_t* cache = kv_cache.data_ptr<scalar_t>();
  scalar_t* out_data = output.data_ptr<scalar_t>();
  const int64_t q_row_stride = query.stride(0), q_head_stride = query.stride(1);
  const int64_t block_stride = kv_cache.stride(0), head_stride = kv_cache.stride(1);

  std::vector<float> turned(rows * head_dim), keys_t(head_dim * page_size);
  // GEMM-sized blocks turn the rows once into the frame of the block's first page (base r)
  // and, for every page all their queries see near (t - b_p <= L), the page's keys by
  // b_p - r instead: the same logits (R(a) q . k = R(b_t - r) q . R(b_p - r) k for
  // a = b_t - b_p), with the turn on the page's keys rather than on every row.
  int64_t first_t = query_position[0], last_t = query_position[0];
  for (int64_t i = 1; i < num_queries; ++i) {
    first_t = std::min(first_t, query_position[i]);
    last_t = std::max(last_t, query_position[i]);
  }
  // (a block's queries are consecutive positions of one request; the table covers that)
  const bool turn_keys = rows >= kGemmRows && last_t - first_t < kQueryBlock;
  const int64_t anchor = first_t - first_t % page_size;
  std::vector<float> block_rows, turned_keys;
  if (turn_keys) {
    block_rows.resize(rows * head_dim);
    turned_keys.resize(page_size * head_dim);
    for (int64_t i = 0; i < num_queries; ++i) {
      const int64_t t = query_position[i];
      turn_rows(q_data + query_rows[i] * q_row_stride + kv_head * group * q_head_stride,
                q_head_stride, group, head_dim, t - t % page_size - anchor, cos_sin, s,
                s.scale, block_rows.data() + i * group * head_dim);
    }
  }
  std::vector<float> logits(rows * page_size);
  std::vector<float> acc(rows * head_dim, 0.0f), row_max(rows, kNegInf), row_sum(rows, 0.0f);
  std::vector<float> page_copy;  // keys and values as float when the cache is not float
  std::vector<PageWindow> windows(num_queries);

  for (int64_t p = 0; p < num_pages; ++p) {
    const int64_t base = page_base[p];
    if (base < 0) continue;  // padding
    const int64_t global_hi = std::min(page_size, s.n_global - base) - 1;
    int64_t kmin = page_size, kmax = -1;
    for (int64_t i = 0; i < num_queries; ++i) {
      windows[i] = window_of(query_position[i], base, s);
      if (!windows[i].any(global_hi)) continue;
      kmin = std::min(kmin, windows[i].first(global_hi));
      kmax = std::max(kmax, windows[i].hi);
    }
    if (kmax < kmin) continue;  // no query of the block sees this page
    const int64_t keys = kmax - kmin + 1;

    const scalar_t* page = cache + page_block[p] * block_stride + kv_head * head_stride;
    const float* kv;
    if constexpr (std::is_same_v<scalar_t, float>) {
      kv = page + kmin * width;
    } else {
      page_copy.resize(keys * width);
      for (int64_t k = 0; k < keys * width; ++k) {
        page_copy[k] = static_cast<float>(page[kmin * width + k]);
      }
      kv = page_copy.data();
    }

    if (turn_keys && last_t - base <= s.trained_length) {
      turn_rows(kv, width, keys, head_dim, base - anchor, cos_sin, s, 1.0f, turned_keys.data());
      page_logits(block_rows.data(), rows, turned_keys.data(), head_dim, keys, head_dim,
                  keys_t.data(), logits.data());
    } else {
      for (int64_t i = 0; i < num_queries; ++i) {
        const int64_t t = query_position[i];
        const int64_t angle = std::min(t - base, s.trained_length) - t % page_size;
        turn_rows(q_data + query_rows[i] * q_row_stride + kv_head * group * q_head_stride,
                  q_head_stride, group, head_dim, angle, cos_sin, s, s.scale,
                  turned.data() + i * group * head_dim);
      }
      page_logits(turned.data(), rows, kv, width, keys, head_dim, keys_t.data(),
                  logits.data());
    }

    for (int64_t i = 0; i < num_queries; ++i) {
      const PageWindow w = windows[i];
      for (int64_t g = 0; g < group; ++g) {
        const int64_t m = i * group + g;
        float* row = logits.data() + m * keys;
        const float block_max = mask_to_window(row, keys, kmin, w, global_hi);
        if (block_max == kNegInf) {  // nothing seen here: weights 0, running state unchanged
          std::fill(row, row + keys, 0.0f);
          continue;
        }
        const float new_max = std::max(row_max[m], block_max);
        const float alpha = std::exp(row_max[m] - new_max);
        row_max[m] = new_max;
        row_sum[m] = row_sum[m] * alpha + exponentiate(row, keys, new_max);
        float* a = acc.data() + m * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) a[d] *= alpha;
      }
    }
    accumulate_values(logits.data(), rows, kv + head_dim, width, keys, head_dim, acc.data());
  }

  for (int64_t i = 0; i < num_queries; ++i) {
    for (int64_t g = 0; g < group; ++g) {
      const int64_t m = i * group + g;
      const float inverse = row_sum[m] > 0.0f ? 1.0f / row_sum[m] : 0.0f;
      scalar_t* out = out_data + query_rows[i] * output.stride(0) +
                      (kv_head * group + g) * output.stride(1);
      for (int64_t d = 0; d < head_dim; ++d) {
        out[d] = static_cast<scalar_t>(acc[m * head_dim + d] * inverse);
      }
    }
  }
}

// Λ-attention for one tile group of the plan, written into output's rows.
//   query, output:   [T_all, H, D]          kv_cache: [num_blocks, Hkv, B, 2D]
//   query_rows, query_position: [N, T]      page_block, page_base: [N, P] (int64)
//   n_global, n_local: [N] int64, each tile's request's own values
//   cos_sin: [A, rotary_dim] float32, the query rotation table (angle |a| per row)
void attend_group(const at::Tensor& query, const at::Tensor& kv_cache, at::Tensor output,
                  const at::Tensor& query_rows, const at::Tensor& query_position,
                  const at::Tensor& page_block, const at::Tensor& page_base,
                  const at::Tensor& n_global, const at::Tensor& n_local,
                  const at::Tensor& cos_sin, int64_t rotary_dim, bool is_neox_style,
                  int64_t trained_length, double scale) {
  TORCH_CHECK(query.device().is_cpu() && kv_cache.device().is_cpu(), "lminf: CPU tensors only");
  TORCH_CHECK(query.scalar_type() == kv_cache.scalar_type() &&
                  output.scalar_type() == query.scalar_type(),
              "lminf: query, kv_cache and output must share one dtype");
  TORCH_CHECK(query.stride(2) == 1 && output.stride(2) == 1 && kv_cache.is_contiguous(),
              "lminf: head dims must be contiguous");
  TORCH_CHECK(kv_cache.size(3) == 2 * query.size(2), "lminf: kv_cache is [blocks, Hkv, B, 2D]");
  TORCH_CHECK(query.size(1) % kv_cache.size(1) == 0, "lminf: heads must group over KV heads");
  TORCH_CHECK(query.size(2) <= 512 && rotary_dim <= query.size(2) && rotary_dim % 2 == 0,
              "lminf: head_dim <= 512 and an even rotary_dim <= head_dim");
  for (const at::Tensor* index :
       {&query_rows, &query_position, &page_block, &page_base, &n_global, &n_local}) {
    TORCH_CHECK(index->scalar_type() == at::kLong && index->is_contiguous(),
                "lminf: plan indices must be contiguous int64");
  }
  TORCH_CHECK(cos_sin.scalar_type() == at::kFloat && cos_sin.is_contiguous() &&
                  cos_sin.size(0) > trained_length,
              "lminf: cos_sin must be contiguous float32 with angles 0..L");
  // The block-frame turns (attend_item) reach kQueryBlock + B past a block's first page.
  TORCH_CHECK(cos_sin.size(0) > std::max(trained_length, kQueryBlock + kv_cache.size(2)),
              "lminf: cos_sin needs angles 0..max(L, ", kQueryBlock, " + B) "
              "(cpu_attention.angles_needed)");
  const int64_t num_tiles = query_rows.size(0), tile_length = query_rows.size(1);
  const int64_t num_pages = page_block.size(1), num_kv_heads = kv_cache.size(1);
  const int64_t blocks = (tile_length + kQueryBlock - 1) / kQueryBlock;
  const int64_t items = num_tiles * num_kv_heads * blocks;
  const float* table = cos_sin.data_ptr<float>();
  const int64_t* rows = query_rows.data_ptr<int64_t>();
  const int64_t* positions = query_position.data_ptr<int64_t>();
  const int64_t* blocks_of = page_block.data_ptr<int64_t>();
  const int64_t* bases = page_base.data_ptr<int64_t>();
  const int64_t* tile_n_global = n_global.data_ptr<int64_t>();
  const int64_t* tile_n_local = n_local.data_ptr<int64_t>();
  TORCH_CHECK(n_global.numel() == num_tiles && n_local.numel() == num_tiles,
              "lminf: n_global and n_local are per tile, [N]");

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "lminf", [&] {
    at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t block = item % blocks, kv_head = (item / blocks) % num_kv_heads;
        const int64_t tile = item / blocks / num_kv_heads;
        const int64_t first = tile * tile_length + block * kQueryBlock;
        const int64_t count = std::min(kQueryBlock, tile_length - block * kQueryBlock);
        const Settings settings{tile_n_global[tile], tile_n_local[tile],   trained_length,
                                kv_cache.size(2),    rotary_dim,           is_neox_style,
                                static_cast<float>(scale)};
        attend_item<scalar_t>(query, kv_cache, output, rows + first, positions + first,
                              blocks_of + tile * num_pages, bases + tile * num_pages,
                              num_pages, count, kv_head, table, settings);
      }
    });
  });
}

// kv_cache[slot_block[i], h, slot_offset[i]] = [key[i, h], value[i, h]] for every new token
// (reference.write_kv, in one pass: a decode step writes a few rows per layer, where two
// indexed assignments cost more than the copy).
//   key, value: [T, Hkv, D] (head dims contiguous), kv_cache's dtype
//   slot_block, slot_offset: [T] int64
void write_kv(const at::Tensor& key, const at::Tensor& value, at::Tensor kv_cache,
              const at::Tensor& slot_block, const at::Tensor& slot_offset) {
  TORCH_CHECK(key.device().is_cpu() && value.device().is_cpu() && kv_cache.device().is_cpu(),
              "lminf: CPU tensors only");
  TORCH_CHECK(key.scalar_type() == kv_cache.scalar_type() &&
                  value.scalar_type() == kv_cache.scalar_type(),
              "lminf: key, value and kv_cache must share one dtype");
  TORCH_CHECK(key.dim() == 3 && value.sizes() == key.sizes() && key.stride(2) == 1 &&
                  value.stride(2) == 1,
              "lminf: key and value are [T, Hkv, D] with contiguous head dims");
  TORCH_CHECK(kv_cache.is_contiguous() && kv_cache.size(1) == key.size(1) &&
                  kv_cache.size(3) == 2 * key.size(2),
              "lminf: kv_cache is [blocks, Hkv, B, 2D]");
  for (const at::Tensor* index : {&slot_block, &slot_offset}) {
    TORCH_CHECK(index->scalar_type() == at::kLong && index->is_contiguous() &&
                    index->numel() == key.size(0),
                "lminf: slot_block and slot_offset are contiguous int64 [T]");
  }
  const int64_t tokens = key.size(0), kv_heads = key.size(1), head_dim = key.size(2);
  const int64_t num_blocks = kv_cache.size(0), page_size = kv_cache.size(2);
  const int64_t* blocks = slot_block.data_ptr<int64_t>();
  const int64_t* offsets = slot_offset.data_ptr<int64_t>();
  for (int64_t i = 0; i < tokens; ++i) {
    TORCH_CHECK(blocks[i] >= 0 && blocks[i] < num_blocks && offsets[i] >= 0 &&
                    offsets[i] < page_size,
                "lminf: slot (", blocks[i], ", ", offsets[i], ") outside the cache");
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, key.scalar_type(), "lminf", [&] {
    const scalar_t* k = key.data_ptr<scalar_t>();
    const scalar_t* v = value.data_ptr<scalar_t>();
    scalar_t* cache = kv_cache.data_ptr<scalar_t>();
    const size_t bytes = head_dim * sizeof(scalar_t);
    for (int64_t i = 0; i < tokens; ++i) {
      scalar_t* slot = cache + blocks[i] * kv_cache.stride(0) + offsets[i] * kv_cache.stride(2);
      for (int64_t h = 0; h < kv_heads; ++h) {
        std::memcpy(slot + h * kv_cache.stride(1), k + i * key.stride(0) + h * key.stride(1),
                    bytes);
        std::memcpy(slot + h * kv_cache.stride(1) + head_dim,
                    v + i * value.stride(0) + h * value.stride(1), bytes);
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY(lminf_cpu, m) {
  m.def(
      "attend_group(Tensor query, Tensor kv_cache, Tensor(a!) output, Tensor query_rows, "
      "Tensor query_position, Tensor page_block, Tensor page_base, Tensor n_global, "
      "Tensor n_local, Tensor cos_sin, int rotary_dim, bool is_neox_style, "
      "int trained_length, float scale) -> ()");
  m.impl("attend_group", c10::DispatchKey::CPU, &attend_group);
  m.def(
      "write_kv(Tensor key, Tensor value, Tensor(a!) kv_cache, Tensor slot_block, "
      "Tensor slot_offset) -> ()");
  m.impl("write_kv", c10::DispatchKey::CPU, &write_kv);
}
