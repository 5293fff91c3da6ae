// Compiled kernels of the torch sparse backend (cmkd_ros/sparse/native.py loads this file's
// build; the pure-PyTorch code in coords.py and functional.py computes the same results).
//
// coord_bounds, pack, unpack, downsample, parent_pairs: coordinate sets and kernel-2 maps.
// query_pairs:  kernel-map pairs by hashing packed int64 coordinates (open addressing), all
//               offsets of all query rows in one parallel pass.
// column_pairs: submanifold pairs of odd kernels by a cursor per (x, y) column over sorted keys.
// conv_layout:  a kernel map's pairs regrouped by (block of output rows, kernel offset).
// conv_forward: fused gather-GEMM-scatter. Each thread owns blocks of output rows and
//               accumulates every pair that lands in them (no atomics, no scatter pass) with a
//               register-blocked kernel (rows x 16-float vectors), or AMX tiles for bfloat16;
//               float32 sums, inputs and outputs float32 or bfloat16.
// pool_forward: max or average pooling over the same layout.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/python.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#define CMKD_INLINE inline __attribute__((always_inline))

namespace {

// ---- hashing -------------------------------------------------------------------------------

constexpr int64_t kEmpty = -1;  // packed keys are >= 0
constexpr int kAxisBits = 18;  // coords.py AXIS_BITS
constexpr int64_t kAxisMask = (int64_t{1} << kAxisBits) - 1;

// Floor division by a positive constant: a shift when it is a power of two (strides, block
// sizes), else a division (64-bit divisions dominated the coordinate loops).
class FloorDiv {
 public:
  explicit FloorDiv(int64_t d) : d_(d), shift_(-1) {
    if (d > 0 && (d & (d - 1)) == 0) {
      shift_ = 0;
      while ((int64_t{1} << shift_) < d) ++shift_;
    }
  }
  CMKD_INLINE int64_t operator()(int64_t a) const {
    if (shift_ >= 0) return a >> shift_;
    return a >= 0 ? a / d_ : -((-a + d_ - 1) / d_);
  }

 private:
  int64_t d_;
  int shift_;
};

class HashIndex {
 public:
  HashIndex(const int64_t* keys, int64_t n) {
    int bits = 4;
    while ((int64_t{1} << bits) < 2 * n) ++bits;  // load <= 1/2
    shift_ = 64 - bits;
    mask_ = (int64_t{1} << bits) - 1;
    keys_.assign(size_t(mask_ + 1), kEmpty);
    rows_.assign(size_t(mask_ + 1), -1);
    for (int64_t i = 0; i < n; ++i) {
      int64_t s = slot(keys[i]);
      while (keys_[s] != kEmpty && keys_[s] != keys[i]) s = (s + 1) & mask_;
      keys_[s] = keys[i];
      rows_[s] = int32_t(i);
    }
  }
  CMKD_INLINE int32_t find(int64_t key) const {
    int64_t s = slot(key);
    while (true) {
      const int64_t k = keys_[s];
      if (k == key) return rows_[s];
      if (k == kEmpty) return -1;
      s = (s + 1) & mask_;
    }
  }

 private:
  CMKD_INLINE int64_t slot(int64_t key) const {
    return int64_t((uint64_t(key) * 0x9E3779B97F4A7C15ull) >> shift_);
  }
  int shift_;
  int64_t mask_;
  std::vector<int64_t> keys_;
  std::vector<int32_t> rows_;
};

void check_keys(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kLong && t.dim() == 1,
              name, " must be a 1-D int64 CPU tensor");
  TORCH_CHECK(t.numel() < (int64_t{1} << 31), name, " has too many rows");
}

// The pairs of a table found[k][o] (row, or -1 where absent): grouped by k, ascending in o
// within a group: (in rows, out rows, counts (num_k,)).
std::vector<at::Tensor> compact(const std::vector<int32_t>& found, int64_t num_k, int64_t m) {
  auto counts = at::zeros({num_k}, at::kLong);
  int64_t* cnt = counts.data_ptr<int64_t>();
  at::parallel_for(0, num_k, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int32_t* f = found.data() + k * m;
      int64_t c = 0;
      for (int64_t o = 0; o < m; ++o) c += f[o] >= 0;
      cnt[k] = c;
    }
  });
  std::vector<int64_t> start(static_cast<size_t>(num_k + 1), 0);
  for (int64_t k = 0; k < num_k; ++k) start[k + 1] = start[k] + cnt[k];
  auto in_rows = at::empty({start[num_k]}, at::kLong);
  auto out_rows = at::empty({start[num_k]}, at::kLong);
  int64_t* in_p = in_rows.data_ptr<int64_t>();
  int64_t* out_p = out_rows.data_ptr<int64_t>();
  at::parallel_for(0, num_k, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int32_t* f = found.data() + k * m;
      int64_t w = start[k];
      for (int64_t o = 0; o < m; ++o) {
        if (f[o] >= 0) {
          in_p[w] = f[o];
          out_p[w] = o;
          ++w;
        }
      }
    }
  });
  return {in_rows, out_rows, counts};
}

// Pairs (target row, query row) with target key == query key + deltas[k], grouped by k and
// ascending in the query row within a group; counts (K,).
std::vector<at::Tensor> query_pairs(at::Tensor target_keys, at::Tensor query_keys,
                                    at::Tensor deltas) {
  check_keys(target_keys, "target_keys");
  check_keys(query_keys, "query_keys");
  check_keys(deltas, "deltas");
  target_keys = target_keys.contiguous();
  query_keys = query_keys.contiguous();
  deltas = deltas.contiguous();
  const int64_t m = query_keys.numel(), num_k = deltas.numel();
  const HashIndex index(target_keys.data_ptr<int64_t>(), target_keys.numel());
  const int64_t* q = query_keys.data_ptr<int64_t>();
  const int64_t* d = deltas.data_ptr<int64_t>();
  std::vector<int32_t> found(static_cast<size_t>(num_k * m));
  at::parallel_for(0, m, 2048, [&](int64_t begin, int64_t end) {
    for (int64_t k = 0; k < num_k; ++k) {
      int32_t* f = found.data() + k * m;
      for (int64_t o = begin; o < end; ++o) f[o] = index.find(q[o] + d[k]);
    }
  });
  return compact(found, num_k, m);
}

// The pairs of the first half (index < centre) of an odd, undilated kernel over ascending,
// unique keys (rows = positions in them), as query_pairs would give them. Sorted keys put
// the voxels of one (x, y) column in z order, so the k candidates of a neighbouring column
// are consecutive and, the queries ascending, a cursor per column walks the keys once.
std::vector<at::Tensor> column_pairs(at::Tensor sorted_keys, int64_t kernel_size,
                                     int64_t stride) {
  check_keys(sorted_keys, "sorted_keys");
  TORCH_CHECK(kernel_size % 2 == 1 && stride >= 1, "column_pairs needs an odd kernel");
  sorted_keys = sorted_keys.contiguous();
  const int64_t* keys = sorted_keys.data_ptr<int64_t>();
  const int64_t n = sorted_keys.numel(), r = kernel_size / 2;
  const int64_t half = kernel_size * kernel_size * kernel_size / 2;
  // Columns (dx, dy) before the centre's: dx < 0, or dx == 0 and dy < 0; then the own column.
  std::vector<std::pair<int64_t, int64_t>> columns;
  for (int64_t dx = -r; dx <= 0; ++dx)
    for (int64_t dy = -r; dy <= r; ++dy)
      if (dx < 0 || dy <= 0) columns.emplace_back(dx, dy);
  const int64_t num_c = int64_t(columns.size());
  const FloorDiv per_stride(stride);
  // Each offset's pairs straight into its own list, queries ascending (no table to compact).
  std::vector<std::vector<int32_t>> in_of(static_cast<size_t>(half));
  std::vector<std::vector<int32_t>> out_of(static_cast<size_t>(half));
  for (int64_t c = 0; c < num_c; ++c) {
    const auto [dx, dy] = columns[c];
    const int64_t lowest = ((dx * stride) << (2 * kAxisBits)) +
                           ((dy * stride) << kAxisBits) - r * stride;
    const int64_t span = c == num_c - 1 ? (r - 1) * stride : 2 * r * stride;
    const int64_t base = ((dx + r) * kernel_size + dy + r) * kernel_size;
    int64_t p = 0;
    for (int64_t o = 0; o < n; ++o) {
      const int64_t lo = keys[o] + lowest;
      while (p < n && keys[p] < lo) ++p;
      for (int64_t q = p; q < n && keys[q] - lo <= span; ++q) {
        const int64_t k = base + per_stride(keys[q] - lo);  // keys of a column differ by strides
        in_of[k].push_back(int32_t(q));
        out_of[k].push_back(int32_t(o));
      }
    }
  }
  auto counts = at::empty({half}, at::kLong);
  int64_t* cnt = counts.data_ptr<int64_t>();
  int64_t total = 0;
  for (int64_t k = 0; k < half; ++k) total += cnt[k] = int64_t(in_of[k].size());
  auto in_rows = at::empty({total}, at::kLong);
  auto out_rows = at::empty({total}, at::kLong);
  int64_t* ip = in_rows.data_ptr<int64_t>();
  int64_t* op = out_rows.data_ptr<int64_t>();
  for (int64_t k = 0; k < half; ++k) {
    std::copy(in_of[k].begin(), in_of[k].end(), ip);
    std::copy(out_of[k].begin(), out_of[k].end(), op);
    ip += cnt[k];
    op += cnt[k];
  }
  return {in_rows, out_rows, counts};
}

// ---- coordinates ---------------------------------------------------------------------------
// Keys pack [batch, x, y, z] as batch << 54 | x' << 36 | y' << 18 | z' with x' = x - origin_x
// (coords.py explains the layout).


void check_coords(const at::Tensor& coords) {
  TORCH_CHECK(coords.device().is_cpu() && coords.scalar_type() == at::kInt &&
                  coords.dim() == 2 && coords.size(1) == 4,
              "coords must be (N, 4) int32 on the CPU");
}

const int64_t* origin_of(const at::Tensor& origin) {
  TORCH_CHECK(origin.scalar_type() == at::kLong && origin.numel() == 3 &&
                  origin.is_contiguous(),
              "origin must be a contiguous (3,) int64 tensor");
  return origin.data_ptr<int64_t>();
}

// Column minima and maxima of (N, 4) int32 coordinates: (2, 4) int64.
at::Tensor coord_bounds(at::Tensor coords) {
  check_coords(coords);
  coords = coords.contiguous();
  const int32_t* c = coords.data_ptr<int32_t>();
  const int64_t n = coords.size(0);
  TORCH_CHECK(n > 0, "coords is empty");
  int32_t lo[4], hi[4];
  for (int j = 0; j < 4; ++j) lo[j] = hi[j] = c[j];
  for (int64_t i = 0; i < n; ++i) {
    for (int j = 0; j < 4; ++j) {
      lo[j] = std::min(lo[j], c[4 * i + j]);
      hi[j] = std::max(hi[j], c[4 * i + j]);
    }
  }
  auto out = at::empty({2, 4}, at::kLong);
  int64_t* o = out.data_ptr<int64_t>();
  for (int j = 0; j < 4; ++j) {
    o[j] = lo[j];
    o[4 + j] = hi[j];
  }
  return out;
}

CMKD_INLINE int64_t pack_one(int64_t b, int64_t x, int64_t y, int64_t z, const int64_t* org) {
  return (b << (3 * kAxisBits)) | ((x - org[0]) << (2 * kAxisBits)) |
         ((y - org[1]) << kAxisBits) | (z - org[2]);
}

// Keys of (N, 4) int32 coordinates (the caller checked that they fit).
at::Tensor pack(at::Tensor coords, at::Tensor origin) {
  check_coords(coords);
  coords = coords.contiguous();
  const int64_t* org = origin_of(origin);
  const int32_t* c = coords.data_ptr<int32_t>();
  const int64_t n = coords.size(0);
  auto keys = at::empty({n}, at::kLong);
  int64_t* k = keys.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    k[i] = pack_one(c[4 * i], c[4 * i + 1], c[4 * i + 2], c[4 * i + 3], org);
  }
  return keys;
}

// (M, 4) int32 coordinates of keys.
at::Tensor unpack(at::Tensor keys, at::Tensor origin) {
  check_keys(keys, "keys");
  keys = keys.contiguous();
  const int64_t* org = origin_of(origin);
  const int64_t* k = keys.data_ptr<int64_t>();
  const int64_t n = keys.numel();
  auto coords = at::empty({n, 4}, at::kInt);
  int32_t* c = coords.data_ptr<int32_t>();
  for (int64_t i = 0; i < n; ++i) {
    c[4 * i] = int32_t(k[i] >> (3 * kAxisBits));
    c[4 * i + 1] = int32_t(((k[i] >> (2 * kAxisBits)) & kAxisMask) + org[0]);
    c[4 * i + 2] = int32_t(((k[i] >> kAxisBits) & kAxisMask) + org[1]);
    c[4 * i + 3] = int32_t((k[i] & kAxisMask) + org[2]);
  }
  return coords;
}

// Downsampling by `factor` from tensor stride `stride`: the parent keys (sorted, unique), the
// parent row of every key and its child code (a f + b) f + c.
std::vector<at::Tensor> downsample(at::Tensor keys, at::Tensor origin, int64_t stride,
                                      int64_t factor) {
  check_keys(keys, "keys");
  TORCH_CHECK(stride >= 1 && factor >= 2, "bad stride or factor");
  keys = keys.contiguous();
  const int64_t* org = origin_of(origin);
  const int64_t* k = keys.data_ptr<int64_t>();
  const int64_t n = keys.numel();
  const int64_t cs = stride * factor;
  std::vector<int64_t> parent(static_cast<size_t>(n));
  auto code = at::empty({n}, at::kLong);
  int64_t* cd = code.data_ptr<int64_t>();
  const FloorDiv by_coarse(cs), by_stride(stride);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t b = k[i] >> (3 * kAxisBits);
    int64_t xyz[3] = {((k[i] >> (2 * kAxisBits)) & kAxisMask) + org[0],
                      ((k[i] >> kAxisBits) & kAxisMask) + org[1], (k[i] & kAxisMask) + org[2]};
    int64_t p[3], r[3];
    for (int j = 0; j < 3; ++j) {
      p[j] = by_coarse(xyz[j]) * cs;
      r[j] = by_stride(xyz[j] - p[j]);
    }
    parent[i] = pack_one(b, p[0], p[1], p[2], org);
    cd[i] = (r[0] * factor + r[1]) * factor + r[2];
  }
  // Unique parents, sorted. The keys ascend in (batch, x), so the parents ascend in (batch,
  // parent x): sort each run of one (batch, parent x) on its own, then a binary search in
  // that run's unique parents gives each key's parent row.
  std::vector<int64_t> uniq;
  uniq.reserve(static_cast<size_t>(n));
  std::vector<int64_t> run_sorted;
  auto inverse = at::empty({n}, at::kLong);
  int64_t* inv = inverse.data_ptr<int64_t>();
  const int64_t slab_shift = 2 * kAxisBits;  // parent keys >> this: (batch, parent x)
  bool ascending = true;
  for (int64_t i = 1; i < n && ascending; ++i) ascending = k[i] > k[i - 1];
  if (ascending) {
    for (int64_t i0 = 0; i0 < n;) {
      int64_t i1 = i0 + 1;
      while (i1 < n && (parent[i1] >> slab_shift) == (parent[i0] >> slab_shift)) ++i1;
      run_sorted.assign(parent.begin() + i0, parent.begin() + i1);
      std::sort(run_sorted.begin(), run_sorted.end());
      const int64_t first = int64_t(uniq.size());
      for (size_t j = 0; j < run_sorted.size(); ++j) {
        if (j == 0 || run_sorted[j] != run_sorted[j - 1]) uniq.push_back(run_sorted[j]);
      }
      const int64_t* u0 = uniq.data() + first;
      const int64_t* u1 = uniq.data() + uniq.size();
      for (int64_t i = i0; i < i1; ++i) inv[i] = std::lower_bound(u0, u1, parent[i]) - uniq.data();
      i0 = i1;
    }
  } else {
    run_sorted.assign(parent.begin(), parent.end());
    std::sort(run_sorted.begin(), run_sorted.end());
    for (size_t j = 0; j < run_sorted.size(); ++j) {
      if (j == 0 || run_sorted[j] != run_sorted[j - 1]) uniq.push_back(run_sorted[j]);
    }
    for (int64_t i = 0; i < n; ++i) {
      inv[i] = std::lower_bound(uniq.begin(), uniq.end(), parent[i]) - uniq.begin();
    }
  }
  const int64_t m = int64_t(uniq.size());
  auto coarse = at::empty({m}, at::kLong);
  std::memcpy(coarse.data_ptr<int64_t>(), uniq.data(), size_t(m) * sizeof(int64_t));
  return {coarse, inverse, code};
}

// The pairs of a kernel-2, stride-2 map: each row feeds its parent at its child code. Rows
// grouped by code (stable), so (in rows, out rows, counts (volume,)).
std::vector<at::Tensor> parent_pairs(at::Tensor inverse, at::Tensor code,
                                        int64_t volume) {
  check_keys(inverse, "inverse");
  check_keys(code, "code");
  TORCH_CHECK(inverse.numel() == code.numel() && volume > 0, "bad parent arrays");
  inverse = inverse.contiguous();
  code = code.contiguous();
  const int64_t* inv = inverse.data_ptr<int64_t>();
  const int64_t* cd = code.data_ptr<int64_t>();
  const int64_t n = inverse.numel();
  auto counts = at::zeros({volume}, at::kLong);
  int64_t* cnt = counts.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(cd[i] >= 0 && cd[i] < volume, "child code out of range");
    ++cnt[cd[i]];
  }
  std::vector<int64_t> cursor(size_t(volume), 0);
  for (int64_t k = 1; k < volume; ++k) cursor[k] = cursor[k - 1] + cnt[k - 1];
  auto in_rows = at::empty({n}, at::kLong);
  auto out_rows = at::empty({n}, at::kLong);
  int64_t* ip = in_rows.data_ptr<int64_t>();
  int64_t* op = out_rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    const int64_t w = cursor[cd[i]]++;
    ip[w] = i;
    op[w] = inv[i];
  }
  return {in_rows, out_rows, counts};
}

// ---- layout --------------------------------------------------------------------------------

// Pairs regrouped by (block of `block_rows` output rows, kernel offset): in rows, out rows
// (int32) and segment starts (blocks * volume + 1,) int64. Rows are checked here, once per
// map: conv_forward trusts a layout for `num_in` input rows.
std::vector<at::Tensor> conv_layout(at::Tensor in_rows, at::Tensor out_rows,
                                       at::Tensor group_bounds, at::Tensor group_k,
                                       int64_t volume, int64_t num_in, int64_t num_out,
                                       int64_t block_rows) {
  check_keys(in_rows, "in_rows");
  check_keys(out_rows, "out_rows");
  check_keys(group_bounds, "group_bounds");
  check_keys(group_k, "group_k");
  TORCH_CHECK(block_rows > 0 && volume > 0 && num_out >= 0 && num_in >= 0 &&
                  num_in < (int64_t{1} << 31) && num_out < (int64_t{1} << 31),
              "bad layout sizes");
  TORCH_CHECK(group_bounds.numel() == group_k.numel() + 1, "group_bounds needs groups + 1");
  in_rows = in_rows.contiguous();
  out_rows = out_rows.contiguous();
  group_bounds = group_bounds.contiguous();
  group_k = group_k.contiguous();
  const int64_t pairs = in_rows.numel();
  TORCH_CHECK(out_rows.numel() == pairs, "in_rows and out_rows differ in length");
  const int64_t blocks = (num_out + block_rows - 1) / block_rows;
  const int64_t* in_p = in_rows.data_ptr<int64_t>();
  const int64_t* out_p = out_rows.data_ptr<int64_t>();
  const int64_t* bounds = group_bounds.data_ptr<int64_t>();
  const int64_t* gk = group_k.data_ptr<int64_t>();
  const int64_t groups = group_k.numel();
  TORCH_CHECK(bounds[0] == 0 && bounds[groups] == pairs, "group_bounds do not cover the pairs");
  for (int64_t g = 0; g < groups; ++g) {
    TORCH_CHECK(bounds[g] <= bounds[g + 1], "group_bounds must not decrease");
  }
  // A counting sort by (block, k); rows checked on the way (conv_forward trusts them).
  for (int64_t g = 0; g < groups; ++g) {
    TORCH_CHECK(gk[g] >= 0 && gk[g] < volume, "kernel index out of range");
  }
  const FloorDiv to_block(block_rows);
  auto seg = at::zeros({blocks * volume + 1}, at::kLong);
  int64_t* s = seg.data_ptr<int64_t>();
  bool in_range = true;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t k = gk[g];
    for (int64_t p = bounds[g]; p < bounds[g + 1]; ++p) {
      const int64_t o = out_p[p], i = in_p[p];
      if (uint64_t(o) >= uint64_t(num_out) || uint64_t(i) >= uint64_t(num_in)) {
        in_range = false;
        break;
      }
      ++s[to_block(o) * volume + k + 1];
    }
  }
  TORCH_CHECK(in_range, "pair row out of range");
  for (int64_t i = 0; i < blocks * volume; ++i) s[i + 1] += s[i];
  std::vector<int64_t> cursor(s, s + blocks * volume);
  auto pin = at::empty({pairs}, at::kInt);
  auto pout = at::empty({pairs}, at::kInt);
  int32_t* pi = pin.data_ptr<int32_t>();
  int32_t* po = pout.data_ptr<int32_t>();
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t k = gk[g];
    for (int64_t p = bounds[g]; p < bounds[g + 1]; ++p) {
      const int64_t w = cursor[to_block(out_p[p]) * volume + k]++;
      pi[w] = int32_t(in_p[p]);
      po[w] = int32_t(out_p[p]);
    }
  }
  return {pin, pout, seg};
}

// ---- convolution ---------------------------------------------------------------------------

// The float32 products of the convolution, c[r] += a[r] @ w, in register tiles of R rows x NV
// vectors. The tile shape depends on the vector registers: AVX-512 has 32 of 16 floats, AVX2
// 16 of 8 floats; accumulators that do not fit are spilled to memory on every multiply-add
// (a 64-byte tile shape compiled for AVX2 ran 6 times slower than pure PyTorch on an AVX2 CPU).
typedef float v16 __attribute__((vector_size(64)));
typedef float v8 __attribute__((vector_size(32)));

template <class V>
CMKD_INLINE V load_vec(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <class V>
CMKD_INLINE void store_vec(float* p, V v) { std::memcpy(p, &v, sizeof(v)); }

template <class V>
constexpr int kLanes = int(sizeof(V) / sizeof(float));

// Rows per tile of NV vectors: the accumulators, NV loaded weight vectors and one broadcast
// within the register file (AVX-512: <= 24 accumulators of 32 registers; AVX2: <= 12 of 16).
template <class V>
constexpr int rows_for(int nv) {
  if constexpr (kLanes<V> == 16) return nv <= 2 ? 12 : nv == 3 ? 8 : 6;
  return nv == 1 ? 12 : 6;
}

// c[r][0 : W NV] += a[r][0 : cin] @ w[0 : cin, 0 : W NV] (row stride ldw) for R rows, W lanes.
template <class V, int NV, int R>
CMKD_INLINE void tile(const float* const* a, const float* w, int64_t cin, int64_t ldw,
                      float* const* c) {
  constexpr int W = kLanes<V>;
  V acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NV; ++j) acc[r][j] = V{};
  for (int64_t i = 0; i < cin; ++i) {
    V b[NV];
    for (int j = 0; j < NV; ++j) b[j] = load_vec<V>(w + i * ldw + W * j);
    for (int r = 0; r < R; ++r) {
      const float s = a[r][i];
      for (int j = 0; j < NV; ++j) acc[r][j] += s * b[j];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NV; ++j) {
      store_vec<V>(c[r] + W * j, load_vec<V>(c[r] + W * j) + acc[r][j]);
    }
}

// tile<V, NV, n> for 1 <= n <= R (a group's last, partial tile of rows).
template <class V, int NV, int R>
CMKD_INLINE void tile_n(int n, const float* const* a, const float* w, int64_t cin, int64_t ldw,
                        float* const* c) {
  if constexpr (R > 1) {
    if (n < R) return tile_n<V, NV, R - 1>(n, a, w, cin, ldw, c);
  }
  tile<V, NV, R>(a, w, cin, ldw, c);
}

// One kernel offset over `n` rows: c[r] += a[r] @ w for column tile [col, col + W NV).
template <class V, int NV>
CMKD_INLINE void rows_times(int64_t n, const float* const* a, const float* w, int64_t cin,
                            int64_t ldw, float* const* c) {
  constexpr int R = rows_for<V>(NV);
  int64_t r = 0;
  for (; r + R <= n; r += R) {
    // The next tile's input rows (gathered: no hardware prefetcher guesses them).
    for (int64_t q = r + R; q < std::min(n, r + 2 * R); ++q) {
      for (int64_t byte = 0; byte < cin * int64_t(sizeof(float)); byte += 64) {
        __builtin_prefetch(reinterpret_cast<const char*>(a[q]) + byte);
      }
    }
    tile<V, NV, R>(a + r, w, cin, ldw, c + r);
  }
  if (r < n) tile_n<V, NV, R>(int(n - r), a + r, w, cin, ldw, c + r);
}

// Column tile [col, col + W NV) of every row.
template <class V, int NV>
CMKD_INLINE void column_tile(int64_t n, const float* const* a, const float* w, int64_t cin,
                             int64_t cout, float* const* c, float** shifted, int64_t col) {
  for (int64_t r = 0; r < n; ++r) shifted[r] = c[r] + col;
  rows_times<V, NV>(n, a, w + col, cin, cout, shifted);
}

// All columns: tiles of the widest shape, then one tile of the remaining whole vectors, then
// the last cout % W columns one by one.
template <class V>
CMKD_INLINE void rows_times_all_of(int64_t n, const float* const* a, const float* w,
                                   int64_t cin, int64_t cout, float* const* c, float** shifted) {
  constexpr int W = kLanes<V>, NV = W == 16 ? 4 : 2;
  int64_t col = 0;
  for (; col + W * NV <= cout; col += W * NV) {
    column_tile<V, NV>(n, a, w, cin, cout, c, shifted, col);
  }
  if constexpr (W == 16) {
    switch ((cout - col) / W) {
      case 3: column_tile<V, 3>(n, a, w, cin, cout, c, shifted, col); col += 3 * W; break;
      case 2: column_tile<V, 2>(n, a, w, cin, cout, c, shifted, col); col += 2 * W; break;
      default: break;
    }
  }
  if (cout - col >= W) {
    column_tile<V, 1>(n, a, w, cin, cout, c, shifted, col);
    col += W;
  }
  if (col == cout) return;
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t i = 0; i < cin; ++i) {
      const float s = a[r][i];
      for (int64_t j = col; j < cout; ++j) c[r][j] += s * w[i * cout + j];
    }
  }
}

using RowsTimesAll = void (*)(int64_t, const float* const*, const float*, int64_t, int64_t,
                              float* const*, float**);

// One build for every CPU: an AVX-512 and an AVX2 variant on x86-64 (GCC), chosen at load time
// by what the running CPU has, and the baseline.
__attribute__((noinline)) void rows_times_all_base(int64_t n, const float* const* a,
                                                   const float* w, int64_t cin, int64_t cout,
                                                   float* const* c, float** shifted) {
  rows_times_all_of<v8>(n, a, w, cin, cout, c, shifted);
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target("arch=x86-64-v4"), noinline)) void rows_times_all_avx512(
    int64_t n, const float* const* a, const float* w, int64_t cin, int64_t cout,
    float* const* c, float** shifted) {
  rows_times_all_of<v16>(n, a, w, cin, cout, c, shifted);
}

__attribute__((target("arch=x86-64-v3"), noinline)) void rows_times_all_avx2(
    int64_t n, const float* const* a, const float* w, int64_t cin, int64_t cout,
    float* const* c, float** shifted) {
  rows_times_all_of<v8>(n, a, w, cin, cout, c, shifted);
}
#endif

// The variant for `name` (avx512, avx2, baseline; auto: the best the running CPU has), or
// null when the CPU lacks it.
RowsTimesAll rows_times_all_named(const std::string& name) {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  __builtin_cpu_init();
#if __GNUC__ >= 12
  const bool v4 = __builtin_cpu_supports("x86-64-v4"), v3 = __builtin_cpu_supports("x86-64-v3");
#else  // GCC 11 (Ubuntu 22.04) names no x86-64 levels here: their defining features
  const bool v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                  __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2");
  const bool v4 = v3 && __builtin_cpu_supports("avx512f") &&
                  __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
                  __builtin_cpu_supports("avx512vl");
#endif
  if (name == "avx512" || (name == "auto" && v4)) return v4 ? rows_times_all_avx512 : nullptr;
  if (name == "avx2" || (name == "auto" && v3)) return v3 ? rows_times_all_avx2 : nullptr;
#endif
  if (name == "baseline" || name == "auto") return rows_times_all_base;
  return nullptr;
}

std::atomic<RowsTimesAll> g_rows_times_all{rows_times_all_named("auto")};

void rows_times_all(int64_t n, const float* const* a, const float* w, int64_t cin,
                    int64_t cout, float* const* c, float** shifted) {
  g_rows_times_all.load(std::memory_order_relaxed)(n, a, w, cin, cout, c, shifted);
}

// Switch the float32 products to the variant `name` where the CPU has it (tests compare every
// variant with the reference); returns the variant in use.
std::string use_float32_kernels(const std::string& name) {
  const RowsTimesAll fn = rows_times_all_named(name);
  if (fn) g_rows_times_all.store(fn);
  const RowsTimesAll now = g_rows_times_all.load();
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  if (now == rows_times_all_avx512) return "avx512";
  if (now == rows_times_all_avx2) return "avx2";
#endif
  return "baseline";
}

CMKD_INLINE float bf16_to_float(uint16_t v) {
  const uint32_t bits = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

CMKD_INLINE uint16_t float_to_bf16(float f) {  // round to nearest even; NaN stays NaN
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return uint16_t((bits >> 16) | 0x40);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return uint16_t(bits >> 16);
}

struct ConvArgs {
  const float* feats;  // (num_in, cin) float32
  const float* feats2;  // (num_in, cin2) float32, the second part of concatenated inputs, or null
  const float* weight;  // (volume, cin + cin2, cout) float32
  const float* bias;  // (cout,) or null
  const float* residual;  // (num_out, cout) float32 or null
  const uint16_t* residual16;  // the same in bfloat16, or null
  const int32_t* pin;
  const int32_t* pout;
  const int64_t* seg;
  int64_t cin, cin2, cout, volume, num_out, block_rows, identity;
  bool relu;
  float* out;  // (num_out, cout) float32, or null
  uint16_t* out16;  // (num_out, cout) bfloat16, or null
};

CMKD_INLINE void store_rows(const float* acc, int64_t count, bool relu, float* out,
                            uint16_t* out16) {
  if (out) {
    if (relu) {
      for (int64_t i = 0; i < count; ++i) out[i] = acc[i] > 0.0f ? acc[i] : 0.0f;
    } else {
      std::memcpy(out, acc, size_t(count) * sizeof(float));
    }
  } else {
    for (int64_t i = 0; i < count; ++i) {
      out16[i] = float_to_bf16(relu && acc[i] < 0.0f ? 0.0f : acc[i]);
    }
  }
}

// A block's sums start from the bias and a residual input.
CMKD_INLINE void start_block(const ConvArgs& p, int64_t row0, int64_t rows, float* acc) {
  const int64_t cout = p.cout;
  for (int64_t r = 0; r < rows; ++r) {
    float* dst = acc + r * cout;
    for (int64_t j = 0; j < cout; ++j) dst[j] = p.bias ? p.bias[j] : 0.0f;
    if (p.residual) {
      const float* src = p.residual + (row0 + r) * cout;
      for (int64_t j = 0; j < cout; ++j) dst[j] += src[j];
    } else if (p.residual16) {
      const uint16_t* src = p.residual16 + (row0 + r) * cout;
      for (int64_t j = 0; j < cout; ++j) dst[j] += bf16_to_float(src[j]);
    }
  }
}

constexpr int64_t kBatch = 64;  // rows per call of the row kernels

struct Scratch {
  const float* a[kBatch];
  float* shifted[kBatch];
};

// c[r] += [feats | feats2][rows[r]] @ weight[k] for n <= kBatch rows.
CMKD_INLINE void multiply(const ConvArgs& p, int64_t k, int64_t n, const int64_t* rows,
                          float* const* c, Scratch& s) {
  const int64_t cin = p.cin, cin2 = p.cin2, cout = p.cout;
  const int64_t wk = (cin + cin2) * cout;  // weight elements per offset
  const float* w = p.weight + k * wk;
  for (int64_t r = 0; r < n; ++r) s.a[r] = p.feats + rows[r] * cin;
  rows_times_all(n, s.a, w, cin, cout, c, s.shifted);
  if (p.feats2) {
    for (int64_t r = 0; r < n; ++r) s.a[r] = p.feats2 + rows[r] * cin2;
    rows_times_all(n, s.a, w + cin * cout, cin2, cout, c, s.shifted);
  }
}

void conv_blocks(const ConvArgs& p, int64_t begin, int64_t end) {
  const int64_t cout = p.cout, volume = p.volume;
  // The sums of a block, kept per thread between calls (no allocation, no page faults).
  thread_local std::vector<float> acc;
  if (acc.size() < static_cast<size_t>(p.block_rows * cout)) {
    acc.resize(static_cast<size_t>(p.block_rows * cout));
  }
  Scratch scratch;
  int64_t rows_in[kBatch];
  float* c[kBatch];
  for (int64_t blk = begin; blk < end; ++blk) {
    const int64_t row0 = blk * p.block_rows;
    const int64_t rows = std::min(p.block_rows, p.num_out - row0);
    float* acc0 = acc.data();
    start_block(p, row0, rows, acc0);  // 1. the bias (and a residual input)
    // 2. The centre of a submanifold kernel: every row with itself.
    if (p.identity >= 0) {
      for (int64_t r0 = 0; r0 < rows; r0 += kBatch) {
        const int64_t n = std::min(kBatch, rows - r0);
        for (int64_t r = 0; r < n; ++r) {
          rows_in[r] = row0 + r0 + r;
          c[r] = acc0 + (r0 + r) * cout;
        }
        multiply(p, p.identity, n, rows_in, c, scratch);
      }
    }
    // 3. Every other offset: its pairs landing in this block.
    for (int64_t k = 0; k < volume; ++k) {
      const int64_t s0 = p.seg[blk * volume + k], s1 = p.seg[blk * volume + k + 1];
      for (int64_t q0 = s0; q0 < s1; q0 += kBatch) {
        const int64_t n = std::min(kBatch, s1 - q0);
        for (int64_t r = 0; r < n; ++r) {
          rows_in[r] = p.pin[q0 + r];
          c[r] = acc0 + (int64_t(p.pout[q0 + r]) - row0) * cout;
        }
        multiply(p, k, n, rows_in, c, scratch);
      }
    }
    // 4. Out, with the ReLU.
    store_rows(acc0, rows * cout, p.relu, p.out ? p.out + row0 * cout : nullptr,
               p.out16 ? p.out16 + row0 * cout : nullptr);
  }
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
// ---- bfloat16 on AMX tiles ----------------------------------------------------------------
// Each group of 16 pairs of one offset: the input rows gathered into a 16-row staging tile,
// one tile multiply per 16 output columns (and 32 input channels) into float32 sums, which are
// then added into the block's rows. CPUs with AMX (Intel Sapphire Rapids and later) only.
#define CMKD_AMX 1
#define CMKD_AMX_TARGET \
  __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq")))

struct alignas(64) TileConfig {
  uint8_t palette;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

bool amx_available() {
  static const bool ok = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    if (!((d >> 22) & 1u) || !((d >> 24) & 1u)) return false;  // AMX-BF16, AMX-TILE
    // Linux hands out the tile state on request (ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA).
    return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  }();
  return ok;
}

std::atomic<bool> g_amx{true};  // tests compare the AMX path with the float32 one

struct AmxArgs {
  const uint16_t* feats;  // (num_in, cin) bfloat16
  const uint16_t* feats2;  // (num_in, cin2) bfloat16, or null
  const uint16_t* weight;  // packed: [k][column tile][chunk][kc / 2][16][2]
  int64_t kc, chunks, tiles;  // input channels per tile multiply, chunks, column tiles
};

// The weight as B tiles: input-channel pairs of a column adjacent, zero padded.
std::vector<uint16_t> pack_amx(const uint16_t* w, int64_t volume, int64_t cin, int64_t cout,
                               int64_t kc, int64_t chunks, int64_t tiles) {
  std::vector<uint16_t> out(static_cast<size_t>(volume * tiles * chunks * kc * 16), 0);
  for (int64_t k = 0; k < volume; ++k)
    for (int64_t t = 0; t < tiles; ++t)
      for (int64_t c = 0; c < chunks; ++c) {
        uint16_t* tile = out.data() + ((k * tiles + t) * chunks + c) * kc * 16;
        for (int64_t pr = 0; pr < kc / 2; ++pr)
          for (int64_t col = 0; col < 16; ++col)
            for (int64_t h = 0; h < 2; ++h) {
              const int64_t i = c * kc + 2 * pr + h, j = t * 16 + col;
              if (i < cin && j < cout) {
                tile[(pr * 16 + col) * 2 + h] = w[(k * cin + i) * cout + j];
              }
            }
      }
  return out;
}

// c[r] += stage[r] @ weight[k] for the n <= 16 staged rows.
CMKD_AMX_TARGET CMKD_INLINE void amx_rows(const AmxArgs& q, int64_t k, int64_t n,
                                          const uint16_t* stage, int64_t cout,
                                          float* const* c, float* cbuf) {
  const int64_t stride = q.kc * q.chunks * 2, btile = q.kc * 16;
  for (int64_t t0 = 0; t0 < q.tiles; t0 += 4) {
    const int64_t nt = std::min<int64_t>(4, q.tiles - t0);
    const uint16_t* w = q.weight + (k * q.tiles + t0) * q.chunks * btile;
    _tile_zero(4);
    _tile_zero(5);
    _tile_zero(6);
    _tile_zero(7);
    for (int64_t ch = 0; ch < q.chunks; ++ch) {
      _tile_loadd(0, stage + ch * q.kc, stride);
      _tile_loadd(1, w + ch * btile, 64);
      _tile_dpbf16ps(4, 0, 1);
      if (nt > 1) {
        _tile_loadd(2, w + (q.chunks + ch) * btile, 64);
        _tile_dpbf16ps(5, 0, 2);
      }
      if (nt > 2) {
        _tile_loadd(3, w + (2 * q.chunks + ch) * btile, 64);
        _tile_dpbf16ps(6, 0, 3);
      }
      if (nt > 3) {
        _tile_loadd(1, w + (3 * q.chunks + ch) * btile, 64);
        _tile_dpbf16ps(7, 0, 1);
      }
    }
    _tile_stored(4, cbuf, 64);
    if (nt > 1) _tile_stored(5, cbuf + 256, 64);
    if (nt > 2) _tile_stored(6, cbuf + 512, 64);
    if (nt > 3) _tile_stored(7, cbuf + 768, 64);
    for (int64_t t = 0; t < nt; ++t) {
      const int64_t col = (t0 + t) * 16;
      const __mmask16 mask = cout - col >= 16 ? __mmask16(0xffff)
                                              : __mmask16((1u << (cout - col)) - 1u);
      for (int64_t r = 0; r < n; ++r) {
        float* dst = c[r] + col;
        const __m512 sum = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, dst),
                                         _mm512_loadu_ps(cbuf + t * 256 + r * 16));
        _mm512_mask_storeu_ps(dst, mask, sum);
      }
    }
  }
}

CMKD_AMX_TARGET CMKD_INLINE void stage_rows(const AmxArgs& q, const ConvArgs& p, int64_t n,
                                            const int64_t* rows, uint16_t* stage) {
  const int64_t width = q.kc * q.chunks;
  for (int64_t r = 0; r < n; ++r) {
    std::memcpy(stage + r * width, q.feats + rows[r] * p.cin, size_t(p.cin) * 2);
    if (q.feats2) {
      std::memcpy(stage + r * width + p.cin, q.feats2 + rows[r] * p.cin2, size_t(p.cin2) * 2);
    }
  }
}

CMKD_AMX_TARGET void conv_blocks_amx(const ConvArgs& p, const AmxArgs& q, int64_t begin,
                                     int64_t end) {
  const int64_t cout = p.cout, volume = p.volume;
  thread_local std::vector<float> acc;
  if (acc.size() < static_cast<size_t>(p.block_rows * cout)) {
    acc.resize(static_cast<size_t>(p.block_rows * cout));
  }
  std::vector<uint16_t> stage(static_cast<size_t>(16 * q.kc * q.chunks), 0);  // pads stay 0
  alignas(64) float cbuf[4 * 256];
  TileConfig cfg{};
  cfg.palette = 1;
  cfg.rows[0] = 16;  // A: 16 staged rows of kc channels
  cfg.colsb[0] = uint16_t(q.kc * 2);
  for (int t = 1; t < 4; ++t) {  // B: kc / 2 channel pairs of 16 columns
    cfg.rows[t] = uint8_t(q.kc / 2);
    cfg.colsb[t] = 64;
  }
  for (int t = 4; t < 8; ++t) {  // C: 16 rows of 16 float32 sums
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
  int64_t rows_in[16];
  float* c[16];
  for (int64_t blk = begin; blk < end; ++blk) {
    const int64_t row0 = blk * p.block_rows;
    const int64_t rows = std::min(p.block_rows, p.num_out - row0);
    float* acc0 = acc.data();
    start_block(p, row0, rows, acc0);
    if (p.identity >= 0) {
      for (int64_t r0 = 0; r0 < rows; r0 += 16) {
        const int64_t n = std::min<int64_t>(16, rows - r0);
        for (int64_t r = 0; r < n; ++r) {
          rows_in[r] = row0 + r0 + r;
          c[r] = acc0 + (r0 + r) * cout;
        }
        stage_rows(q, p, n, rows_in, stage.data());
        amx_rows(q, p.identity, n, stage.data(), cout, c, cbuf);
      }
    }
    for (int64_t k = 0; k < volume; ++k) {
      const int64_t s0 = p.seg[blk * volume + k], s1 = p.seg[blk * volume + k + 1];
      for (int64_t q0 = s0; q0 < s1; q0 += 16) {
        const int64_t n = std::min<int64_t>(16, s1 - q0);
        for (int64_t r = 0; r < n; ++r) {
          rows_in[r] = p.pin[q0 + r];
          c[r] = acc0 + (int64_t(p.pout[q0 + r]) - row0) * cout;
        }
        stage_rows(q, p, n, rows_in, stage.data());
        amx_rows(q, k, n, stage.data(), cout, c, cbuf);
      }
    }
    store_rows(acc0, rows * cout, p.relu, nullptr, p.out16 + row0 * cout);
  }
  _tile_release();
}
#else
bool amx_available() { return false; }
#endif

// Turn the AMX path on or off (tests compare it with the float32 one); whether it runs now.
bool use_amx(bool on) {
#ifdef CMKD_AMX
  g_amx.store(on);
#endif
  return on && amx_available();
}

struct Layout {
  const int32_t* pin;
  const int32_t* pout;
  const int64_t* seg;
  int64_t blocks;
};

Layout check_layout(const at::Tensor& pin, const at::Tensor& pout, const at::Tensor& seg,
                    int64_t volume, int64_t num_out, int64_t block_rows) {
  TORCH_CHECK(block_rows > 0 && num_out >= 0 && volume > 0, "bad sizes");
  const int64_t blocks = (num_out + block_rows - 1) / block_rows;
  TORCH_CHECK(seg.scalar_type() == at::kLong && seg.is_contiguous() &&
                  seg.numel() == blocks * volume + 1,
              "seg does not match the blocks and kernel volume");
  TORCH_CHECK(pin.scalar_type() == at::kInt && pout.scalar_type() == at::kInt &&
                  pin.is_contiguous() && pout.is_contiguous() && pin.numel() == pout.numel(),
              "pin/pout must be contiguous int32 of one length");
  const int64_t* s = seg.data_ptr<int64_t>();
  TORCH_CHECK(s[blocks * volume] == pin.numel(), "seg does not cover the pairs");
  return {pin.data_ptr<int32_t>(), pout.data_ptr<int32_t>(), s, blocks};
}

void check_features(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 2, name, " must be (N, C) on the CPU");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16,
              name, ": float32 or bfloat16, got ", t.scalar_type());
}

at::Tensor float_features(const at::Tensor& t, const char* name) {
  check_features(t, name);
  return t.to(at::kFloat).contiguous();
}

// out (num_out, cout) = bias + residual + sum over pairs of [feats | feats2][in] @ weight[k],
// with an optional ReLU; every tensor float32, or every tensor bfloat16. The layout (pin,
// pout, seg) is conv_layout's for `num_in` input rows.
at::Tensor conv_forward(at::Tensor feats, c10::optional<at::Tensor> feats2,
                           at::Tensor weight, c10::optional<at::Tensor> bias,
                           c10::optional<at::Tensor> residual, at::Tensor pin,
                           at::Tensor pout, at::Tensor seg, int64_t num_in,
                           int64_t num_out, int64_t block_rows, int64_t identity, bool relu) {
  const auto dtype = feats.scalar_type();
  check_features(feats, "feats");
  const bool two = feats2.has_value() && feats2->defined();
  if (two) {
    TORCH_CHECK(feats2->scalar_type() == dtype && feats2->size(0) == feats.size(0),
                "feats2 must have the rows and dtype of feats");
    check_features(*feats2, "feats2");
  }
  const int64_t cin = feats.size(1), cin2 = two ? feats2->size(1) : 0;
  TORCH_CHECK(weight.dim() == 3 && weight.size(1) == cin + cin2 && weight.scalar_type() == dtype,
              "weight must be (K, Cin, Cout) of the features' dtype");
#ifdef CMKD_AMX
  const bool amx = dtype == at::kBFloat16 && g_amx.load() && amx_available();
#else
  const bool amx = false;
#endif
  // Otherwise float32 copies of bfloat16 features (read a few times each; float32 arithmetic).
  at::Tensor f32, g32, f16, g16;
  if (amx) {
    f16 = feats.contiguous();
    if (two) g16 = feats2->contiguous();
  } else {
    f32 = feats.to(at::kFloat).contiguous();
    if (two) g32 = feats2->to(at::kFloat).contiguous();
  }
  const int64_t volume = weight.size(0), cout = weight.size(2);
  const Layout lay = check_layout(pin, pout, seg, volume, num_out, block_rows);
  TORCH_CHECK(identity < volume, "identity offset out of range");
  TORCH_CHECK(feats.size(0) == num_in, "feats has ", feats.size(0), " rows, the layout ",
              num_in);
  TORCH_CHECK(identity < 0 || num_in == num_out, "an identity offset needs num_in == num_out");
  const at::Tensor w32 = amx ? at::Tensor() : weight.to(at::kFloat).contiguous();  // small
  at::Tensor b32;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == cout && bias->scalar_type() == dtype,
                "bias must be (Cout,) of the features' dtype");
    b32 = bias->to(at::kFloat).contiguous();
  }
  at::Tensor res;
  if (residual.has_value() && residual->defined()) {
    TORCH_CHECK(residual->dim() == 2 && residual->size(0) == num_out &&
                    residual->size(1) == cout && residual->scalar_type() == dtype,
                "residual must be (num_out, Cout) of the features' dtype");
    res = residual->contiguous();
  }
  auto out = at::empty({num_out, cout}, feats.options());
  ConvArgs p{};
  if (!amx) {
    p.feats = f32.data_ptr<float>();
    p.feats2 = two ? g32.data_ptr<float>() : nullptr;
    p.weight = w32.data_ptr<float>();
  }
  p.bias = b32.defined() ? b32.data_ptr<float>() : nullptr;
  if (res.defined()) {
    if (dtype == at::kFloat) {
      p.residual = res.data_ptr<float>();
    } else {
      p.residual16 = reinterpret_cast<const uint16_t*>(res.data_ptr<at::BFloat16>());
    }
  }
  p.pin = lay.pin;
  p.pout = lay.pout;
  p.seg = lay.seg;
  p.cin = cin;
  p.cin2 = cin2;
  p.cout = cout;
  p.volume = volume;
  p.num_out = num_out;
  p.block_rows = block_rows;
  p.identity = identity;
  p.relu = relu;
  if (dtype == at::kFloat) {
    p.out = out.data_ptr<float>();
  } else {
    p.out16 = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  }
#ifdef CMKD_AMX
  if (amx) {
    AmxArgs q{};
    const int64_t width = cin + cin2;
    q.kc = width <= 32 ? width + width % 2 : 32;
    q.chunks = (width + q.kc - 1) / q.kc;
    q.tiles = (cout + 15) / 16;
    const at::Tensor w16 = weight.contiguous();
    const std::vector<uint16_t> packed =
        pack_amx(reinterpret_cast<const uint16_t*>(w16.data_ptr<at::BFloat16>()), volume,
                 width, cout, q.kc, q.chunks, q.tiles);
    q.feats = reinterpret_cast<const uint16_t*>(f16.data_ptr<at::BFloat16>());
    q.feats2 = two ? reinterpret_cast<const uint16_t*>(g16.data_ptr<at::BFloat16>()) : nullptr;
    q.weight = packed.data();
    at::parallel_for(0, lay.blocks, 1, [&](int64_t begin, int64_t end) {
      conv_blocks_amx(p, q, begin, end);
    });
    return out;
  }
#endif
  at::parallel_for(0, lay.blocks, 1, [&](int64_t begin, int64_t end) {
    conv_blocks(p, begin, end);
  });
  return out;
}

// Max or average (over the pairs present) pooling over a layout's pairs: (num_out, C) in the
// features' dtype; outputs without pairs are 0.
at::Tensor pool_forward(at::Tensor feats, at::Tensor pin, at::Tensor pout,
                           at::Tensor seg, int64_t volume, int64_t num_in, int64_t num_out,
                           int64_t block_rows, bool average) {
  auto f32 = float_features(feats, "feats");
  TORCH_CHECK(feats.size(0) == num_in, "feats has ", feats.size(0), " rows, the layout ",
              num_in);
  const Layout lay = check_layout(pin, pout, seg, volume, num_out, block_rows);
  const int64_t ch = feats.size(1);
  auto out = at::empty({num_out, ch}, feats.options());
  const float* f = f32.data_ptr<float>();
  float* o32 = feats.scalar_type() == at::kFloat ? out.data_ptr<float>() : nullptr;
  uint16_t* o16 = o32 ? nullptr : reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  at::parallel_for(0, lay.blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(static_cast<size_t>(block_rows * ch));
    std::vector<int32_t> count(static_cast<size_t>(block_rows));
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t row0 = blk * block_rows, rows = std::min(block_rows, num_out - row0);
      std::fill(acc.begin(), acc.end(), average ? 0.0f : -std::numeric_limits<float>::infinity());
      std::fill(count.begin(), count.end(), 0);
      for (int64_t q = lay.seg[blk * volume]; q < lay.seg[(blk + 1) * volume]; ++q) {
        const float* src = f + int64_t(lay.pin[q]) * ch;
        const int64_t r = lay.pout[q] - row0;
        float* dst = acc.data() + r * ch;
        ++count[r];
        if (average) {
          for (int64_t j = 0; j < ch; ++j) dst[j] += src[j];
        } else {
          for (int64_t j = 0; j < ch; ++j) dst[j] = std::max(dst[j], src[j]);
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        float* row = acc.data() + r * ch;
        const float scale = average ? 1.0f / float(std::max(count[r], 1)) : 1.0f;
        for (int64_t j = 0; j < ch; ++j) row[j] = count[r] ? row[j] * scale : 0.0f;
      }
      store_rows(acc.data(), rows * ch, false, o32 ? o32 + row0 * ch : nullptr,
                 o16 ? o16 + row0 * ch : nullptr);
    }
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // No kernel touches a Python object, so each lets go of the GIL while it runs: another
  // Python thread (the segment node's preparing thread, the kernel-map builder) goes on.
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.doc() = "cmkd_ros sparse convolution kernels (CPU)";
  m.def("coord_bounds", &coord_bounds, "column minima and maxima of (N, 4) int32 coords",
        nogil);
  m.def("pack", &pack, "int64 keys of coordinates", nogil, py::arg("coords"),
        py::arg("origin"));
  m.def("unpack", &unpack, "coordinates of keys", nogil, py::arg("keys"), py::arg("origin"));
  m.def("downsample", &downsample, "parent keys, parent row and child code of every key",
        nogil, py::arg("keys"), py::arg("origin"), py::arg("stride"), py::arg("factor"));
  m.def("parent_pairs", &parent_pairs, "pairs of a kernel-2 stride-2 map", nogil,
        py::arg("inverse"), py::arg("code"), py::arg("volume"));
  m.def("query_pairs", &query_pairs, "kernel-map pairs by hashing", nogil,
        py::arg("target_keys"), py::arg("query_keys"), py::arg("deltas"));
  m.def("column_pairs", &column_pairs, "first-half pairs of an odd kernel over sorted keys",
        nogil, py::arg("sorted_keys"), py::arg("kernel_size"), py::arg("stride"));
  m.def("conv_layout", &conv_layout, "pairs by (output block, offset)", nogil,
        py::arg("in_rows"), py::arg("out_rows"), py::arg("group_bounds"), py::arg("group_k"),
        py::arg("volume"), py::arg("num_in"), py::arg("num_out"), py::arg("block_rows"));
  m.def("use_float32_kernels", &use_float32_kernels,
        "float32 products in the variant avx512, avx2, baseline or auto where the CPU has it; "
        "the variant in use", py::arg("name"));
  m.def("use_amx", &use_amx, "bfloat16 convolutions on AMX tiles on/off; whether they run",
        nogil, py::arg("on"));
  m.def("conv_forward", &conv_forward, "fused gather-GEMM-scatter convolution", nogil,
        py::arg("feats"), py::arg("feats2"), py::arg("weight"), py::arg("bias"),
        py::arg("residual"), py::arg("pin"), py::arg("pout"), py::arg("seg"), py::arg("num_in"),
        py::arg("num_out"), py::arg("block_rows"), py::arg("identity"), py::arg("relu"));
  m.def("pool_forward", &pool_forward, "max or average pooling over a layout", nogil,
        py::arg("feats"), py::arg("pin"), py::arg("pout"), py::arg("seg"), py::arg("volume"),
        py::arg("num_in"), py::arg("num_out"), py::arg("block_rows"), py::arg("average"));
}
