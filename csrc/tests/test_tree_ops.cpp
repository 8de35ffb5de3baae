// C++ unit test of the tree ops' CPU references (and, in a CUDA build with a GPU, CUDA == CPU).
// Run by ctest (CMakeLists.txt), also under AddressSanitizer + UBSan (scripts/sanitize_cpu.sh),
// which is why it feeds malformed inputs: they must raise c10::Error without touching memory
// they do not own. Expected values are written out by hand or computed by naive loops here;
// test_fuzz_corpus adds a few hundred seeded random valid and malformed cases.
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <initializer_list>
#include <limits>
#include <string>
#include <vector>

#include "ops.h"

namespace {

int failures = 0;

#define EXPECT(cond)                                                     \
  do {                                                                  \
    if (!(cond)) {                                                      \
      std::fprintf(stderr, "%s:%d: EXPECT failed: %s\n", __FILE__, __LINE__, #cond); \
      ++failures;                                                       \
    }                                                                   \
  } while (0)

// `fn` must throw c10::Error whose message contains `expected`.
void expect_error(const std::function<void()>& fn, const std::string& expected, int line) {
  try {
    fn();
  } catch (const c10::Error& e) {
    if (std::string(e.what()).find(expected) == std::string::npos) {
      std::fprintf(stderr, "line %d: error message lacks \"%s\":\n%s\n", line, expected.c_str(), e.what());
      ++failures;
    }
    return;
  }
  std::fprintf(stderr, "line %d: expected an error containing \"%s\", none was raised\n", line, expected.c_str());
  ++failures;
}
#define EXPECT_ERROR(expr, text) expect_error([&] { expr; }, text, __LINE__)

at::Tensor longs(std::vector<int64_t> values) {
  return at::tensor(values, at::TensorOptions().dtype(at::kLong));
}

bool same(const at::Tensor& a, const at::Tensor& b) { return a.sizes() == b.sizes() && at::equal(a, b); }

// ---- tree_build

void test_tree_build_small() {
  // 0 -> {1, 2}, 1 -> {3}; prefix 2
  auto [mask, pos, paths] = falcon_ext::tree_build_cpu(longs({-1, 0, 0, 1}), 2, at::kFloat);
  const float inf = std::numeric_limits<float>::infinity();
  const at::Tensor want = at::tensor({0.f, 0.f, 0.f, -inf, -inf, -inf,  //
                                      0.f, 0.f, 0.f, 0.f, -inf, -inf,    //
                                      0.f, 0.f, 0.f, -inf, 0.f, -inf,    //
                                      0.f, 0.f, 0.f, 0.f, -inf, 0.f})
                              .view({4, 6});
  EXPECT(same(mask, want));
  EXPECT(same(pos, longs({2, 3, 3, 4})));
  EXPECT(same(paths, longs({0, 2, -1, 0, 1, 3}).view({2, 3})));
}

void test_tree_build_random() {
  const int64_t n = 99, prefix = 5;
  std::vector<int64_t> parents(n, -1);
  uint64_t state = 12345;
  for (int64_t i = 1; i < n; ++i) {  // a random earlier node (64-bit LCG)
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    parents[i] = static_cast<int64_t>((state >> 33) % static_cast<uint64_t>(i));
  }
  auto [mask, pos, paths] = falcon_ext::tree_build_cpu(longs(parents), prefix, at::kHalf);
  const auto m = mask.to(at::kFloat);
  for (int64_t i = 0; i < n; ++i) {
    std::vector<bool> ancestor(n, false);
    int64_t depth = 0;
    for (int64_t k = i; k != -1; k = parents[k]) ancestor[k] = true, depth += k != i;
    EXPECT(pos[i].item<int64_t>() == prefix + depth);
    for (int64_t j = 0; j < n; ++j) {
      const float v = m[i][prefix + j].item<float>();
      EXPECT(ancestor[j] ? v == 0.f : std::isinf(v) && v < 0);
    }
  }
  // each row of paths: a root-to-leaf chain, -1 padded
  for (int64_t r = 0; r < paths.size(0); ++r) {
    EXPECT(paths[r][0].item<int64_t>() == 0);
    for (int64_t c = 1; c < paths.size(1) && paths[r][c].item<int64_t>() >= 0; ++c) {
      EXPECT(parents[paths[r][c].item<int64_t>()] == paths[r][c - 1].item<int64_t>());
    }
  }
}

void test_tree_build_malformed() {
  EXPECT_ERROR(falcon_ext::tree_build_cpu(longs({0, 0}), 0, at::kFloat), "parents[0] must be -1");
  EXPECT_ERROR(falcon_ext::tree_build_cpu(longs({-1, 1}), 0, at::kFloat), "node 1 has parent 1");
  EXPECT_ERROR(falcon_ext::tree_build_cpu(longs({-1, 2, 1}), 0, at::kFloat), "node 1 has parent 2");
  EXPECT_ERROR(falcon_ext::tree_build_cpu(longs({-1, 0, 1000000}), 0, at::kFloat), "node 2 has parent 1000000");
  EXPECT_ERROR(falcon_ext::tree_build_cpu(longs({-1, -7}), 0, at::kFloat), "node 1 has parent -7");
  EXPECT_ERROR(falcon_ext::tree_build_cpu(longs({}), 0, at::kFloat), "at least the root");
  EXPECT_ERROR(falcon_ext::tree_build_cpu(longs({-1, 0}).to(at::kInt), 0, at::kFloat), "parents must be");
  EXPECT_ERROR(falcon_ext::tree_build_cpu(longs({-1, 0}).view({1, 2}), 0, at::kFloat), "1 dimensions");
  EXPECT_ERROR(falcon_ext::tree_build_cpu(longs({-1, 0}), -3, at::kFloat), "prefix_len must be >= 0");
  EXPECT_ERROR(falcon_ext::tree_build_cpu(longs({-1, 0}), 0, at::kLong), "floating type");
}

// ---- tree_verify

void test_verify_greedy() {
  // 0 -> {1, 2}, 2 -> {3}; argmax: node 0 -> 4, node 2 -> 5, node 3 -> 1
  at::Tensor logits = at::zeros({4, 8});
  logits[0][4] = 1.f, logits[1][6] = 1.f, logits[2][5] = 1.f, logits[3][1] = 1.f;
  auto [path, result] = falcon_ext::tree_verify_greedy_cpu(logits, longs({0, 3, 4, 5}), longs({-1, 0, 0, 2}));
  EXPECT(same(path, longs({0, 2, 3, -1})));
  EXPECT(same(result, longs({3, 1})));
}

void test_verify_sample_one_hot() {
  // a one-hot target accepts exactly the drafts the target would emit, whatever the uniforms
  at::Tensor probs = at::zeros({4, 8});
  probs[0][4] = 1.f, probs[1][6] = 1.f, probs[2][5] = 1.f, probs[3][1] = 1.f;
  for (float u : {0.f, 0.3f, 0.999f}) {
    const at::Tensor uniforms = at::full({5}, u);
    auto [path, result] = falcon_ext::tree_verify_sample_cpu(probs, longs({0, 3, 4, 5}), longs({-1, 0, 0, 2}), uniforms);
    EXPECT(same(path, longs({0, 2, 3, -1})));
    EXPECT(same(result, longs({3, 1})));
  }
}

void test_verify_sample_rejection() {
  // root weights (token: weight) 0: 0.5, 1: 0.25, 2: 0.25; child drafts token 0
  const at::Tensor probs = at::tensor({0.5f, 0.25f, 0.25f, 1.f, 0.f, 0.f}).view({2, 3});
  auto accept = falcon_ext::tree_verify_sample_cpu(probs, longs({0, 0}), longs({-1, 0}), at::tensor({0.f, 0.49f, 0.f}));
  EXPECT(same(std::get<1>(accept), longs({2, 0})));  // 0.49 * 1 < 0.5: accepted, then token 0 at node 1
  // rejected (0.5 * 1 >= 0.5): residual {1: 0.25, 2: 0.25}; u = 0.6 -> threshold 0.3 -> token 2
  auto reject = falcon_ext::tree_verify_sample_cpu(probs, longs({0, 0}), longs({-1, 0}), at::tensor({0.f, 0.5f, 0.6f}));
  EXPECT(same(std::get<0>(reject), longs({0, -1})));
  EXPECT(same(std::get<1>(reject), longs({1, 2})));
}

void test_verify_malformed() {
  const at::Tensor scores = at::rand({3, 5}), tokens = longs({0, 1, 2}), parents = longs({-1, 0, 0});
  const at::Tensor u = at::rand({4});
  EXPECT_ERROR(falcon_ext::tree_verify_greedy_cpu(scores, longs({0, 5, 0}), parents), "tokens[1] = 5 is outside");
  EXPECT_ERROR(falcon_ext::tree_verify_sample_cpu(scores, longs({0, 1, -2}), parents, u), "tokens[2] = -2 is outside");
  EXPECT_ERROR(falcon_ext::tree_verify_greedy_cpu(scores, tokens, longs({-1, 2, 0})), "node 1 has parent 2");
  EXPECT_ERROR(falcon_ext::tree_verify_greedy_cpu(scores, tokens, longs({-1, 0})), "must have 3 entries");
  EXPECT_ERROR(falcon_ext::tree_verify_greedy_cpu(scores.to(at::kDouble), tokens, parents), "float32, float16");
  EXPECT_ERROR(falcon_ext::tree_verify_sample_cpu(scores, tokens, parents, at::rand({3})), "N + 1 = 4");
  EXPECT_ERROR(falcon_ext::tree_verify_sample_cpu(scores, tokens, parents, u.to(at::kHalf)), "uniforms must be");
}

// ---- kv_compact_

void test_kv_compact_aliasing() {
  // a [B=2, H=3, S=8, D=4] view with S not innermost: seq slot s holds value s everywhere
  const at::Tensor base = at::arange(8, at::kFloat).view({1, 8, 1, 1}).repeat({2, 1, 3, 4});  // [B, S, H, D]
  const at::Tensor kv = base.permute({0, 2, 1, 3});
  // path [0, 2, 5] at dst_start 1: slot 3 is both a destination (j = 2) and a source (j = 1)
  falcon_ext::kv_compact_cpu({kv}, longs({0, 2, 5}), 1);
  const std::vector<float> want = {0, 1, 3, 6, 4, 5, 6, 7};
  for (int64_t s = 0; s < 8; ++s) EXPECT(kv[1][2][s][3].item<float>() == want[s] && kv[0][0][s][0].item<float>() == want[s]);
}

void test_kv_compact_malformed() {
  at::Tensor kv = at::rand({1, 2, 10, 4});
  const at::Tensor before = kv.clone();
  EXPECT_ERROR(falcon_ext::kv_compact_cpu({kv}, longs({1, 2}), 0), "path[0] must be 0");
  EXPECT_ERROR(falcon_ext::kv_compact_cpu({kv}, longs({0, 4, 4}), 0), "strictly increasing");
  EXPECT_ERROR(falcon_ext::kv_compact_cpu({kv}, longs({0, 3}), 7), "is outside kv[0]");
  EXPECT_ERROR(falcon_ext::kv_compact_cpu({kv}, longs({0, 3}), -1), "dst_start must be >= 0");
  EXPECT_ERROR(falcon_ext::kv_compact_cpu({kv}, longs({}), 0), "at least the root");
  EXPECT_ERROR(falcon_ext::kv_compact_cpu({kv, kv.to(at::kHalf)}, longs({0, 1}), 0), "one dtype");
  EXPECT_ERROR(falcon_ext::kv_compact_cpu({kv[0]}, longs({0, 1}), 0), "[B, H, S, D]");
  EXPECT_ERROR(falcon_ext::kv_compact_cpu({kv.narrow(2, 0, 1).expand({1, 2, 10, 4})}, longs({0, 1}), 0),
               "sharing memory");
  EXPECT(same(kv, before));
}

// ---- batched ops

void test_tree_build_batched_small() {
  // row 0: 0 -> {1, 2}, 1 -> {3}, cache slots 1, 2 visible; row 1: the root + 3 padding nodes, slot 0
  const at::Tensor parents = longs({-1, 0, 0, 1, -1, -1, -1, -1}).view({2, 4});
  const at::Tensor prefix = longs({0, 1, 1, 1, 0, 0}).view({2, 3});
  auto [mask, pos, paths] = falcon_ext::tree_build_batched_cpu(parents, prefix, at::kFloat);
  const float x = -std::numeric_limits<float>::infinity();
  const at::Tensor want = at::tensor({x, 0.f, 0.f, 0.f, x, x, x,    //
                                      x, 0.f, 0.f, 0.f, 0.f, x, x,   //
                                      x, 0.f, 0.f, 0.f, x, 0.f, x,   //
                                      x, 0.f, 0.f, 0.f, 0.f, x, 0.f,  //
                                      0.f, x, x, 0.f, x, x, x,       //
                                      x, x, x, x, 0.f, x, x,         // padding: only itself
                                      x, x, x, x, x, 0.f, x,         //
                                      x, x, x, x, x, x, 0.f})
                              .view({2, 4, 7});
  EXPECT(same(mask, want));
  EXPECT(same(pos, longs({2, 3, 3, 4, 1, 1, 1, 1}).view({2, 4})));
  EXPECT(same(paths, longs({0, 2, -1, 0, 1, 3, 0, -1, -1, -1, -1, -1}).view({2, 2, 3})));
  const at::Tensor late_node = longs({-1, 0, -1, 1}).view({1, 4});
  EXPECT_ERROR(falcon_ext::tree_build_batched_cpu(late_node, prefix.narrow(0, 0, 1), at::kFloat),
               "row 0: node 3 has parent 1 after a padding node");
  EXPECT_ERROR(falcon_ext::tree_build_batched_cpu(parents, prefix.narrow(0, 0, 1), at::kFloat), "[B = 2, P]");
  EXPECT_ERROR(falcon_ext::tree_build_batched_cpu(parents, prefix.to(at::kFloat), at::kFloat), "Bool or Long");
}

void test_verify_batched() {
  // row 0: test_verify_greedy's tree; row 1: its first two nodes, then padding with junk tokens
  at::Tensor logits = at::zeros({2, 4, 8});
  logits[0][0][4] = 1.f, logits[0][1][6] = 1.f, logits[0][2][5] = 1.f, logits[0][3][1] = 1.f;
  logits[1][0][3] = 1.f, logits[1][1][7] = 1.f;
  logits[1][2].fill_(std::nanf("")), logits[1][3].fill_(std::nanf(""));
  const at::Tensor tokens = longs({0, 3, 4, 5, 0, 3, -9, 1000}).view({2, 4});
  const at::Tensor parents = longs({-1, 0, 0, 2, -1, 0, -1, -1}).view({2, 4});
  auto [path, result] = falcon_ext::tree_verify_greedy_batched_cpu(logits, tokens, parents);
  EXPECT(same(path, longs({0, 2, 3, -1, 0, 1, -1, -1}).view({2, 4})));
  EXPECT(same(result, longs({3, 1, 2, 7}).view({2, 2})));
  // sampling on a one-hot target gives the same; uniforms[1, 2] (n_1 = 2) draws row 1's last token
  for (float u : {0.f, 0.5f, 0.999f}) {
    auto [spath, sresult] = falcon_ext::tree_verify_sample_batched_cpu(logits, tokens, parents, at::full({2, 5}, u));
    EXPECT(same(spath, path) && same(sresult, result));
  }
  const at::Tensor bad_tokens = longs({0, 3, 4, 5, 0, 8, 0, 0}).view({2, 4});
  EXPECT_ERROR(falcon_ext::tree_verify_greedy_batched_cpu(logits, bad_tokens, parents), "tokens[1, 1] = 8 is outside");
  EXPECT_ERROR(falcon_ext::tree_verify_sample_batched_cpu(logits, tokens, parents, at::rand({2, 4})),
               "[B, N + 1] = [2, 5]");
  EXPECT_ERROR(falcon_ext::tree_verify_greedy_batched_cpu(logits[0], tokens, parents), "[B, N, V]");
}

void test_kv_compact_batched() {
  // slot s holds s; row 0 moves [0, 1, 3, 4] from 5 to 2 (sources and destinations interleave),
  // row 1 keeps [0, 2] in place
  const at::Tensor kv = at::arange(10, at::kFloat).view({1, 1, 10, 1}).repeat({2, 3, 1, 4});
  const at::Tensor before = kv.clone();
  falcon_ext::kv_compact_batched_cpu({kv}, longs({0, 1, 3, 4, 0, 2, -1, -1}).view({2, 4}), {2, 5}, 5);
  const std::vector<float> want0 = {0, 1, 5, 6, 8, 9, 6, 7, 8, 9}, want1 = {0, 1, 2, 3, 4, 5, 7, 7, 8, 9};
  for (int64_t s = 0; s < 10; ++s) {
    EXPECT(kv[0][2][s][3].item<float>() == want0[s] && kv[1][1][s][0].item<float>() == want1[s]);
  }
  const at::Tensor after = kv.clone();
  const at::Tensor paths = longs({0, 2, 0, -1}).view({2, 2});
  EXPECT_ERROR(falcon_ext::kv_compact_batched_cpu({kv}, paths, {6, 0}, 5),
               "dst_starts[0] must be in [0, src_start = 5]");
  EXPECT_ERROR(falcon_ext::kv_compact_batched_cpu({kv}, paths, {0}, 5), "dst_starts must have B = 2");
  EXPECT_ERROR(falcon_ext::kv_compact_batched_cpu({kv}, longs({0, -1, 2, 0, 1, 2}).view({2, 3}), {0, 0}, 5),
               "paths[0] must be -1 after its first -1");
  EXPECT_ERROR(falcon_ext::kv_compact_batched_cpu({kv}, longs({0, 5, 0, 1}).view({2, 2}), {0, 0}, 5),
               "src_start + paths[0][-1] = 10 is outside");
  EXPECT_ERROR(falcon_ext::kv_compact_batched_cpu({kv.narrow(0, 0, 1)}, paths, {0, 0}, 5), "[B = 2, H, S, D]");
  EXPECT(same(kv, after));
  EXPECT(!same(kv, before));
}

// ---- int8_linear: every row-tile width (1-4 rows, then 5-9 for a tile plus a remainder), K with and
// without a SIMD tail, against a naive double loop; malformed arguments raise before any read.

void test_int8_linear() {
  at::manual_seed(0);
  for (int64_t R : {1, 2, 3, 4, 5, 7, 9}) {
    for (int64_t N : {1, 7, 99}) {
      for (int64_t K : {1, 7, 64, 111}) {
        const at::Tensor x = at::randn({R, K});
        const at::Tensor q = at::randint(-127, 128, {N, K}, at::TensorOptions().dtype(at::kChar));
        const at::Tensor scale = at::rand({N}) * 0.01;
        const at::Tensor bias = at::randn({N});
        const at::Tensor y = falcon_ext::int8_linear_cpu(x, q, scale, bias);
        const auto xa = x.accessor<float, 2>();
        const auto qa = q.accessor<int8_t, 2>();
        for (int64_t r = 0; r < R; ++r) {
          for (int64_t n = 0; n < N; ++n) {
            double want = 0;
            for (int64_t k = 0; k < K; ++k) want += double(xa[r][k]) * qa[n][k];
            want = want * scale[n].item<double>() + bias[n].item<double>();
            EXPECT(std::abs(y[r][n].item<double>() - want) <= 1e-5 * (1 + std::abs(want)));
          }
        }
      }
    }
  }
  const at::Tensor x = at::randn({3, 8}), q = at::zeros({5, 8}, at::TensorOptions().dtype(at::kChar));
  const at::Tensor s = at::ones({5});
  EXPECT_ERROR(falcon_ext::int8_linear_cpu(x, q.to(at::kFloat), s, c10::nullopt), "weight must be int8");
  EXPECT_ERROR(falcon_ext::int8_linear_cpu(x, q, s.to(at::kDouble), c10::nullopt), "scale must be float32");
  EXPECT_ERROR(falcon_ext::int8_linear_cpu(x, q, s.narrow(0, 0, 4), c10::nullopt), "scale must be [N] = [5]");
  EXPECT_ERROR(falcon_ext::int8_linear_cpu(x.narrow(1, 0, 7), q, s, c10::nullopt), "x must be [..., K] with K");
  EXPECT_ERROR(falcon_ext::int8_linear_cpu(x, q, s, at::ones({4})), "bias must be [N] = [5]");
  EXPECT_ERROR(falcon_ext::int8_linear_cpu(x.to(at::kInt), q, s, c10::nullopt), "x must be a floating tensor");
  EXPECT_ERROR(falcon_ext::int8_linear_cpu(x, q.narrow(0, 0, 0), s.narrow(0, 0, 0), c10::nullopt),
               "weight must be [N >= 1, K >= 1]");
}

// ---- deterministic fuzz corpus: random valid and malformed inputs from a fixed seed ----
// Every case must throw c10::Error when (and only when) its input breaks the op's contract,
// and otherwise return results inside their documented bounds that agree with naive loops
// here. Under ASan + UBSan (scripts/sanitize_cpu.sh) any out-of-bounds access or undefined
// behaviour (e.g. signed overflow on extreme ids and offsets) on the way aborts the test.

constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
constexpr int64_t kMin = std::numeric_limits<int64_t>::min();

struct Rng {  // 64-bit LCG; the high bits are the good ones
  uint64_t state;
  uint64_t next() {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    return state >> 11;
  }
  int64_t below(int64_t n) { return static_cast<int64_t>(next() % static_cast<uint64_t>(n)); }
  bool chance(int percent) { return below(100) < percent; }
  float uniform() { return static_cast<float>(next() >> 29) / 16777216.f; }  // [0, 1), 24 bits
  template <typename T>
  T pick(std::initializer_list<T> values) {
    return values.begin()[below(static_cast<int64_t>(values.size()))];
  }
};

bool tree_ok(const std::vector<int64_t>& p) {
  if (p.empty() || p[0] != -1) return false;
  for (size_t i = 1; i < p.size(); ++i) {
    if (p[i] < 0 || p[i] >= static_cast<int64_t>(i)) return false;
  }
  return true;
}

// A random tree of n nodes; with `malformed`, one entry is replaced by a value that breaks it
// (self loop, forward reference / cycle, out of range, a second root, extreme ids).
std::vector<int64_t> fuzz_tree(Rng& r, int64_t n, bool malformed) {
  std::vector<int64_t> p(n, -1);
  for (int64_t i = 1; i < n; ++i) p[i] = r.below(i);
  if (malformed && n > 0) {
    const int64_t i = r.below(n);
    p[i] = i == 0 ? r.pick<int64_t>({0, 1, n, kMin, kMax})
                  : r.pick<int64_t>({i, i + r.below(n - i + 1), -1, -2 - r.below(5), n + r.below(3), kMin, kMax});
  }
  return p;
}

// A [n] int64 tensor holding `values`, contiguous or as a strided column of a [n, 2] buffer.
at::Tensor long_vector(Rng& r, const std::vector<int64_t>& values) {
  const at::Tensor t = longs(values);
  if (!r.chance(40) || values.empty()) return t;
  at::Tensor buffer = at::full({static_cast<int64_t>(values.size()), 2}, 7, t.options());
  buffer.select(1, 0).copy_(t);
  return buffer.select(1, 0);
}

std::vector<bool> ancestor_or_self_row(const std::vector<int64_t>& p, int64_t node) {
  std::vector<bool> row(p.size(), false);
  for (int64_t k = node; k != -1; k = p[k]) row[k] = true;
  return row;
}

int64_t depth_of(const std::vector<int64_t>& p, int64_t node) {
  int64_t depth = 0;
  for (int64_t k = node; p[k] != -1; k = p[k]) ++depth;
  return depth;
}

// Runs `fn`; true if it threw c10::Error (any other exception escapes and fails the test).
bool throws(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const c10::Error&) {
    return true;
  }
  return false;
}

void fuzz_tree_build(Rng& r, int cases) {
  for (int c = 0; c < cases; ++c) {
    const int64_t n = r.chance(5) ? 0 : 1 + r.below(40);
    const bool malformed = r.chance(35);
    const std::vector<int64_t> parents = fuzz_tree(r, n, malformed);
    const bool bad_prefix = r.chance(10);
    // kMax - n: the largest prefix_len whose prefix_len + N fits (then too large to allocate); kMax: past it
    const int64_t prefix = bad_prefix ? r.pick<int64_t>({-1, kMin, kMax, kMax - n}) : r.below(50);
    const at::ScalarType dtype = r.pick({at::kFloat, at::kHalf, at::kBFloat16, at::kDouble, at::kLong, at::kBool});
    const bool valid = tree_ok(parents) && !bad_prefix && at::isFloatingType(dtype);
    std::tuple<at::Tensor, at::Tensor, at::Tensor> out;
    const bool threw = throws([&] { out = falcon_ext::tree_build_cpu(long_vector(r, parents), prefix, dtype); });
    EXPECT(threw == !valid);
    if (threw || !valid) continue;
    const auto& [mask, pos, paths] = out;
    EXPECT(mask.sizes() == at::IntArrayRef({n, prefix + n}) && mask.scalar_type() == dtype);
    const at::Tensor m = mask.to(at::kFloat);
    const auto ma = m.accessor<float, 2>();
    const auto pa = pos.accessor<int64_t, 1>();
    for (int64_t i = 0; i < n; ++i) {
      EXPECT(pa[i] == prefix + depth_of(parents, i));
      const std::vector<bool> visible = ancestor_or_self_row(parents, i);
      for (int64_t j = 0; j < prefix + n; ++j) {
        const bool open = j < prefix || visible[j - prefix];
        EXPECT(open ? ma[i][j] == 0.f : std::isinf(ma[i][j]) && ma[i][j] < 0);
      }
    }
    const auto ra = paths.accessor<int64_t, 2>();
    for (int64_t row = 0; row < paths.size(0); ++row) {
      EXPECT(ra[row][0] == 0);
      for (int64_t col = 1; col < paths.size(1); ++col) {
        const int64_t node = ra[row][col];
        EXPECT(node >= -1 && node < n);
        if (node >= 0) EXPECT(ra[row][col - 1] >= 0 && parents[node] == ra[row][col - 1]);
      }
    }
  }
}

// scores [n, V]: mostly finite, with NaN, infinities and negatives sprinkled in.
at::Tensor fuzz_scores(Rng& r, int64_t n, int64_t vocab, at::ScalarType dtype) {
  std::vector<float> values(n * vocab);
  const float inf = std::numeric_limits<float>::infinity();
  for (float& v : values) {
    v = r.chance(6) ? r.pick<float>({std::nanf(""), inf, -inf, 0.f, -1.f}) : 8.f * r.uniform() - 2.f;
  }
  const at::Tensor t = at::tensor(values).view({n, vocab}).to(dtype);
  return r.chance(30) ? t.t().contiguous().t() : t;  // column-major storage half the time
}

// Lowest index of the row's maximum, NaN counting as -inf (the ops' documented rule).
int64_t naive_argmax(const at::Tensor& row) {
  const at::Tensor f = row.to(at::kFloat).contiguous();
  const float* v = f.data_ptr<float>();
  int64_t best = 0;
  float best_value = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < f.numel(); ++i) {
    if (!std::isnan(v[i]) && v[i] > best_value) best_value = v[i], best = i;
  }
  return best;
}

void fuzz_verify(Rng& r, int cases, bool sample) {
  for (int c = 0; c < cases; ++c) {
    const int64_t n = 1 + r.below(30), vocab = 1 + r.below(60);
    const bool bad_dtype = r.chance(5);
    const at::ScalarType dtype = bad_dtype ? r.pick({at::kDouble, at::kLong}) : r.pick({at::kFloat, at::kHalf, at::kBFloat16});
    const at::Tensor scores = fuzz_scores(r, n, vocab, dtype);
    const std::vector<int64_t> parents = fuzz_tree(r, n, r.chance(20));
    std::vector<int64_t> tokens(n);
    for (int64_t& t : tokens) t = r.below(vocab);
    const bool bad_token = r.chance(15);
    if (bad_token) tokens[r.below(n)] = r.pick<int64_t>({-1, vocab, vocab + 7, kMin, kMax});
    const bool bad_uniforms = sample && r.chance(5);
    std::vector<float> u(bad_uniforms ? n : n + 1);
    for (float& x : u) x = r.uniform();
    const bool valid = !bad_dtype && tree_ok(parents) && !bad_token && !bad_uniforms;
    std::tuple<at::Tensor, at::Tensor> out;
    const bool threw = throws([&] {
      out = sample ? falcon_ext::tree_verify_sample_cpu(scores, long_vector(r, tokens), long_vector(r, parents),
                                                        at::tensor(u))
                   : falcon_ext::tree_verify_greedy_cpu(scores, long_vector(r, tokens), long_vector(r, parents));
    });
    EXPECT(threw == !valid);
    if (threw || !valid) continue;
    const auto& [path, result] = out;
    EXPECT(path.sizes() == at::IntArrayRef({n}) && result.sizes() == at::IntArrayRef({2}));
    const auto pa = path.accessor<int64_t, 1>();
    const int64_t count = result[0].item<int64_t>(), next_token = result[1].item<int64_t>();
    EXPECT(count >= 1 && count <= n && next_token >= 0 && next_token < vocab && pa[0] == 0);
    bool chain = pa[0] == 0;  // path[0..count) is a root-to-node chain (indices checked before use)
    for (int64_t k = 1; k < n; ++k) {
      if (k >= count) {
        EXPECT(pa[k] == -1);
        continue;
      }
      chain = chain && pa[k] > 0 && pa[k] < n && parents[pa[k]] == pa[k - 1];
      EXPECT(chain);
      if (chain && !sample) EXPECT(tokens[pa[k]] == naive_argmax(scores[pa[k - 1]]));
    }
    if (chain && !sample && count >= 1 && count <= n) EXPECT(next_token == naive_argmax(scores[pa[count - 1]]));
  }
}

// [B, H, S, D] cache view of `base`: the whole (contiguous) base, or a sequence window of a
// [B, S + 3, H, D] buffer, i.e. neither contiguous nor at the buffer's origin.
at::Tensor kv_view(const at::Tensor& base, bool contiguous, int64_t offset, int64_t seq) {
  return contiguous ? base : base.narrow(1, offset, seq).permute({0, 2, 1, 3});
}

void fuzz_kv_compact(Rng& r, int cases) {
  for (int c = 0; c < cases; ++c) {
    const int64_t tensors = 1 + r.below(3), seq = 1 + r.below(20);
    const at::ScalarType dtype = r.pick({at::kFloat, at::kHalf, at::kBFloat16});
    const bool mixed_dtype = tensors > 1 && r.chance(5);
    std::vector<at::Tensor> bases, views;
    std::vector<std::pair<bool, int64_t>> layouts;
    for (int64_t i = 0; i < tensors; ++i) {
      const int64_t B = 1 + r.below(2), H = 1 + r.below(3), D = 1 + r.below(5);
      const bool contiguous = r.chance(30);
      const int64_t offset = r.below(4);
      const at::ScalarType dt = mixed_dtype && i == tensors - 1 ? at::kDouble : dtype;
      bases.push_back((contiguous ? at::randn({B, H, seq, D}) : at::randn({B, seq + 3, H, D})).to(dt));
      views.push_back(kv_view(bases.back(), contiguous, offset, seq));
      layouts.emplace_back(contiguous, offset);
    }
    const bool bad_start = r.chance(8);
    const int64_t dst_start = bad_start ? r.pick<int64_t>({-1, seq, kMax, kMin, int64_t{1} << 62}) : r.below(seq);
    std::vector<int64_t> path{0};
    for (int64_t slot = 1; !bad_start && slot < seq - dst_start; ++slot) {
      if (r.chance(40)) path.push_back(slot);
    }
    const int64_t mutation = r.chance(30) ? 1 + r.below(5) : 0;
    switch (mutation) {
      case 1: path[0] = r.pick<int64_t>({1, -1, kMax}); break;                   // root moved
      case 2: path.push_back(path.back()); break;                                // not strictly increasing
      case 3: path.push_back(std::max(path.back() + 1, seq - dst_start + r.below(3))); break;  // past the end
      case 4: path.push_back(r.pick<int64_t>({kMax, int64_t{1} << 62})); break;  // dst_start + path[-1] overflows
      case 5: path.clear(); break;                                               // no root
    }
    const bool valid = !bad_start && !mixed_dtype && mutation == 0;
    std::vector<at::Tensor> want;  // whole buffers after a naive copy (unchanged for invalid input)
    for (size_t i = 0; i < bases.size(); ++i) {
      want.push_back(bases[i].clone());
      if (!valid) continue;
      at::Tensor view = kv_view(want.back(), layouts[i].first, layouts[i].second, seq);
      const at::Tensor before = view.clone();
      for (size_t j = 0; j < path.size(); ++j) {
        view.select(2, dst_start + static_cast<int64_t>(j)).copy_(before.select(2, dst_start + path[j]));
      }
    }
    const bool threw = throws([&] { falcon_ext::kv_compact_cpu(views, long_vector(r, path), dst_start); });
    EXPECT(threw == !valid);
    for (size_t i = 0; i < bases.size(); ++i) EXPECT(same(bases[i], want[i]));  // nothing outside the views moved
  }
}

// ---- batched fuzz: rows of random sizes padded with -1, malformed rows, junk in the padding ----

// parents [B, N] of rows of random sizes; with `malformed`, one entry of one row breaks it
// (fuzz_tree's mutations, or a real node after the padding). Returns the row sizes too.
std::vector<int64_t> fuzz_padded_trees(Rng& r, int64_t batch, int64_t n, bool malformed, std::vector<int64_t>& sizes) {
  std::vector<int64_t> p(batch * n, -1);
  sizes.assign(batch, 0);
  for (int64_t b = 0; b < batch; ++b) {
    sizes[b] = 1 + r.below(n);
    const std::vector<int64_t> tree = fuzz_tree(r, sizes[b], false);
    std::copy(tree.begin(), tree.end(), p.begin() + b * n);
  }
  if (malformed) {
    const int64_t b = r.below(batch), i = r.below(n);
    int64_t& entry = p[b * n + i];
    if (i > sizes[b]) {
      entry = r.below(i);  // a real node after a padding node
    } else if (i == sizes[b]) {
      entry = r.pick<int64_t>({i, n + r.below(3), -2, kMin, kMax});  // sizes[b] < n here
    } else {
      entry = i == 0 ? r.pick<int64_t>({0, 1, n, kMin, kMax})
                     : r.pick<int64_t>({i, i + 1, -2 - r.below(5), kMin, kMax});
    }
  }
  return p;
}

bool padded_trees_ok(const std::vector<int64_t>& p, int64_t batch, int64_t n) {
  for (int64_t b = 0; b < batch; ++b) {
    bool padding = false;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t q = p[b * n + i];
      const bool ok = i == 0 ? q == -1 : q == -1 || (!padding && q >= 0 && q < i);
      if (!ok) return false;
      padding = padding || (i > 0 && q == -1);
    }
  }
  return true;
}

at::Tensor long_matrix(Rng& r, const std::vector<int64_t>& values, int64_t batch, int64_t n) {
  const at::Tensor t = longs(values).view({batch, n});
  return r.chance(40) ? t.t().contiguous().t() : t;  // column-major half the time
}

void fuzz_tree_build_batched(Rng& r, int cases) {
  for (int c = 0; c < cases; ++c) {
    const int64_t batch = 1 + r.below(4), n = 1 + r.below(30), prefix_len = r.below(20);
    std::vector<int64_t> sizes;
    const std::vector<int64_t> parents = fuzz_padded_trees(r, batch, n, r.chance(35), sizes);
    std::vector<int64_t> prefix(batch * prefix_len);
    for (int64_t& v : prefix) v = r.chance(70) ? r.pick<int64_t>({1, 2, -1}) : 0;  // nonzero = visible
    const bool bad_prefix = r.chance(8);
    const at::Tensor prefix_2d = longs(prefix).view({batch, prefix_len});
    const at::Tensor prefix_t = !bad_prefix  ? prefix_2d.to(r.pick({at::kLong, at::kBool}))
                                : r.chance(50) ? prefix_2d.to(at::kFloat)  // wrong dtype
                                               : prefix_2d.view({batch * prefix_len});  // wrong shape
    const at::ScalarType dtype = r.pick({at::kFloat, at::kHalf, at::kBFloat16, at::kDouble, at::kLong});
    const bool valid = padded_trees_ok(parents, batch, n) && !bad_prefix && at::isFloatingType(dtype);
    std::tuple<at::Tensor, at::Tensor, at::Tensor> out;
    const at::Tensor par = long_matrix(r, parents, batch, n);
    const bool threw = throws([&] { out = falcon_ext::tree_build_batched_cpu(par, prefix_t, dtype); });
    EXPECT(threw == !valid);
    if (threw || !valid) continue;
    const auto& [mask, pos, paths] = out;
    EXPECT(mask.sizes() == at::IntArrayRef({batch, n, prefix_len + n}) && pos.sizes() == at::IntArrayRef({batch, n}));
    const at::Tensor m = mask.to(at::kFloat);
    const auto ma = m.accessor<float, 3>();
    const auto pa = pos.accessor<int64_t, 2>();
    for (int64_t b = 0; b < batch; ++b) {
      // the row's real part is tree_build on the row alone after its visible prefix count
      const std::vector<int64_t> row(parents.begin() + b * n, parents.begin() + b * n + sizes[b]);
      int64_t seen = 0;
      for (int64_t k = 0; k < prefix_len; ++k) seen += prefix[b * prefix_len + k] != 0;
      const auto alone = falcon_ext::tree_build_cpu(longs(row), seen, dtype);
      EXPECT(same(mask[b].narrow(0, 0, sizes[b]).narrow(1, prefix_len, sizes[b]),
                  std::get<0>(alone).narrow(1, seen, sizes[b])));
      EXPECT(same(pos[b].narrow(0, 0, sizes[b]), std::get<1>(alone)));
      const at::Tensor& alone_paths = std::get<2>(alone);
      EXPECT(same(paths[b].narrow(0, 0, alone_paths.size(0)).narrow(1, 0, alone_paths.size(1)), alone_paths));
      for (int64_t i = 0; i < n; ++i) {
        const bool real = i < sizes[b];
        if (!real) EXPECT(pa[b][i] == seen);
        for (int64_t j = 0; j < prefix_len + n; ++j) {
          const float v = ma[b][i][j];
          if (j < prefix_len) EXPECT(real && prefix[b * prefix_len + j] != 0 ? v == 0.f : std::isinf(v) && v < 0);
          // padding columns: visible only to the padding node itself
          if (j >= prefix_len + sizes[b]) EXPECT(j == prefix_len + i ? v == 0.f : std::isinf(v) && v < 0);
          if (!real && j != prefix_len + i) EXPECT(std::isinf(v) && v < 0);  // a padding row sees only itself
        }
      }
    }
  }
}

void fuzz_verify_batched(Rng& r, int cases, bool sample) {
  for (int c = 0; c < cases; ++c) {
    const int64_t batch = 1 + r.below(4), n = 1 + r.below(20), vocab = 1 + r.below(40);
    const bool bad_dtype = r.chance(4);
    const at::ScalarType dtype = bad_dtype ? at::kDouble : r.pick({at::kFloat, at::kHalf, at::kBFloat16});
    const at::Tensor scores = fuzz_scores(r, batch * n, vocab, dtype).view({batch, n, vocab});
    std::vector<int64_t> sizes;
    const std::vector<int64_t> parents = fuzz_padded_trees(r, batch, n, r.chance(20), sizes);
    std::vector<int64_t> tokens(batch * n);
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t i = 0; i < n; ++i) {  // padding tokens: anything, they are never read
        tokens[b * n + i] = i < sizes[b] ? r.below(vocab) : r.pick<int64_t>({-1, vocab, kMin, kMax, 0});
      }
    }
    const bool bad_token = r.chance(15);
    if (bad_token) {
      const int64_t b = r.below(batch);
      tokens[b * n + r.below(sizes[b])] = r.pick<int64_t>({-1, vocab, kMin, kMax});
    }
    const bool bad_uniforms = sample && r.chance(5);
    std::vector<float> u(batch * (n + 1));
    for (float& x : u) x = r.uniform();
    const at::Tensor uniforms = at::tensor(u).view(bad_uniforms ? std::vector<int64_t>{batch * (n + 1)}
                                                                 : std::vector<int64_t>{batch, n + 1});
    const bool valid = !bad_dtype && padded_trees_ok(parents, batch, n) && !bad_token && !bad_uniforms;
    std::tuple<at::Tensor, at::Tensor> out;
    const at::Tensor tok = long_matrix(r, tokens, batch, n), par = long_matrix(r, parents, batch, n);
    const bool threw = throws([&] {
      out = sample ? falcon_ext::tree_verify_sample_batched_cpu(scores, tok, par, uniforms)
                   : falcon_ext::tree_verify_greedy_batched_cpu(scores, tok, par);
    });
    EXPECT(threw == !valid);
    if (threw || !valid) continue;
    const auto& [path, result] = out;
    EXPECT(path.sizes() == at::IntArrayRef({batch, n}) && result.sizes() == at::IntArrayRef({batch, 2}));
    for (int64_t b = 0; b < batch; ++b) {  // each row: the batch-1 op on the row alone
      const int64_t size = sizes[b];
      const at::Tensor s = scores[b].narrow(0, 0, size), t = tok[b].narrow(0, 0, size), p = par[b].narrow(0, 0, size);
      const auto alone = sample ? falcon_ext::tree_verify_sample_cpu(s, t, p, uniforms[b].narrow(0, 0, size + 1))
                                : falcon_ext::tree_verify_greedy_cpu(s, t, p);
      EXPECT(same(path[b].narrow(0, 0, size), std::get<0>(alone)) && same(result[b], std::get<1>(alone)));
      EXPECT((path[b].narrow(0, size, n - size) == -1).all().item<bool>());
    }
  }
}

void fuzz_kv_compact_batched(Rng& r, int cases) {
  for (int c = 0; c < cases; ++c) {
    const int64_t batch = 1 + r.below(3), tensors = 1 + r.below(3), seq = 1 + r.below(20);
    const at::ScalarType dtype = r.pick({at::kFloat, at::kHalf, at::kBFloat16});
    std::vector<at::Tensor> bases, views;
    std::vector<std::pair<bool, int64_t>> layouts;
    for (int64_t i = 0; i < tensors; ++i) {
      const int64_t H = 1 + r.below(3), D = 1 + r.below(5);
      const bool contiguous = r.chance(30);
      const int64_t offset = r.below(4);
      bases.push_back((contiguous ? at::randn({batch, H, seq, D}) : at::randn({batch, seq + 3, H, D})).to(dtype));
      views.push_back(kv_view(bases.back(), contiguous, offset, seq));
      layouts.emplace_back(contiguous, offset);
    }
    const bool bad_batch = r.chance(5);
    if (bad_batch) views.push_back(at::randn({batch + 1, 1, seq, 1}).to(dtype));  // one cache row too many
    const bool bad_src = r.chance(5);
    const int64_t src_start = bad_src ? r.pick<int64_t>({-1, kMin}) : r.below(seq);
    std::vector<int64_t> dst(batch);
    for (int64_t& d : dst) d = src_start >= 0 ? r.below(src_start + 1) : 0;
    const bool bad_dst = r.chance(5);
    if (bad_dst) dst[r.below(batch)] = r.pick<int64_t>({-1, src_start + 1 + r.below(3), kMax, kMin});
    std::vector<std::vector<int64_t>> rows(batch, std::vector<int64_t>{0});
    int64_t length = 1;
    for (auto& row : rows) {
      for (int64_t slot = 1; !bad_src && slot < seq - src_start; ++slot) {
        if (r.chance(40)) row.push_back(slot);
      }
      length = std::max<int64_t>(length, static_cast<int64_t>(row.size()));
    }
    const int64_t mutation = r.chance(30) ? 1 + r.below(5) : 0;
    auto& victim = rows[r.below(batch)];
    switch (mutation) {
      case 1: victim[0] = r.pick<int64_t>({1, -1, kMax}); break;               // root moved
      case 2: victim.push_back(victim.back()); break;                          // not strictly increasing
      case 3: victim.push_back(std::max(victim.back() + 1, seq - src_start + r.below(3))); break;  // past the end
      case 4: victim.push_back(r.pick<int64_t>({kMax, int64_t{1} << 62})); break;  // src_start + last overflows
      case 5: victim.push_back(-1), victim.push_back(victim.size()); break;        // a node after the padding
    }
    length = std::max<int64_t>(length, static_cast<int64_t>(victim.size()));
    std::vector<int64_t> flat(batch * length, -1);
    for (int64_t b = 0; b < batch; ++b) std::copy(rows[b].begin(), rows[b].end(), flat.begin() + b * length);
    const bool valid = !bad_batch && !bad_src && !bad_dst && mutation == 0;
    std::vector<at::Tensor> want;  // whole buffers after a naive copy (unchanged for invalid input)
    for (size_t i = 0; i < bases.size(); ++i) {
      want.push_back(bases[i].clone());
      if (!valid) continue;
      at::Tensor view = kv_view(want.back(), layouts[i].first, layouts[i].second, seq);
      const at::Tensor before = view.clone();
      for (int64_t b = 0; b < batch; ++b) {
        for (size_t j = 0; j < rows[b].size(); ++j) {
          view[b].select(1, dst[b] + static_cast<int64_t>(j)).copy_(before[b].select(1, src_start + rows[b][j]));
        }
      }
    }
    const at::Tensor paths = long_matrix(r, flat, batch, length);
    const bool threw = throws([&] { falcon_ext::kv_compact_batched_cpu(views, paths, dst, src_start); });
    EXPECT(threw == !valid);
    for (size_t i = 0; i < bases.size(); ++i) EXPECT(same(bases[i], want[i]));  // nothing outside the views moved
  }
}

void test_fuzz_corpus() {
  at::manual_seed(20250101);  // at::randn in fuzz_kv_compact
  Rng r{0x5eed};
  fuzz_tree_build(r, 150);
  fuzz_verify(r, 150, /*sample=*/false);
  fuzz_verify(r, 150, /*sample=*/true);
  fuzz_kv_compact(r, 150);
  fuzz_tree_build_batched(r, 120);
  fuzz_verify_batched(r, 120, /*sample=*/false);
  fuzz_verify_batched(r, 120, /*sample=*/true);
  fuzz_kv_compact_batched(r, 120);
}

#ifdef FALCON_EXT_WITH_CUDA
void test_cuda_equals_cpu() {
  const at::Tensor parents = longs({-1, 0, 0, 1, 1, 2, 5, 0});
  const auto cpu_build = falcon_ext::tree_build_cpu(parents, 3, at::kHalf);
  const auto cuda_build = falcon_ext::tree_build_cuda(parents.cuda(), 3, at::kHalf);
  EXPECT(same(std::get<0>(cuda_build).cpu(), std::get<0>(cpu_build)));
  EXPECT(same(std::get<2>(cuda_build).cpu(), std::get<2>(cpu_build)));
  const at::Tensor probs = at::softmax(at::randn({8, 3000}), -1), tokens = at::randint(0, 3000, {8});
  for (int rep = 0; rep < 20; ++rep) {
    const at::Tensor u = at::rand({9});
    const auto want = falcon_ext::tree_verify_sample_cpu(probs, tokens, parents, u);
    const auto got = falcon_ext::tree_verify_sample_cuda(probs.cuda(), tokens.cuda(), parents.cuda(), u.cuda());
    EXPECT(same(std::get<1>(got).cpu(), std::get<1>(want)));
  }
  at::Tensor kv = at::rand({2, 3, 12, 5});
  at::Tensor kv_cuda = kv.cuda();
  falcon_ext::kv_compact_cpu({kv}, longs({0, 2, 5, 6}), 4);
  falcon_ext::kv_compact_cuda({kv_cuda}, longs({0, 2, 5, 6}).cuda(), 4);
  EXPECT(same(kv_cuda.cpu(), kv));
}
#endif

}  // namespace

int main() {
  test_tree_build_small();
  test_tree_build_random();
  test_tree_build_malformed();
  test_verify_greedy();
  test_verify_sample_one_hot();
  test_verify_sample_rejection();
  test_verify_malformed();
  test_kv_compact_aliasing();
  test_kv_compact_malformed();
  test_tree_build_batched_small();
  test_verify_batched();
  test_kv_compact_batched();
  test_int8_linear();
  test_fuzz_corpus();
#ifdef FALCON_EXT_WITH_CUDA
  if (at::hasCUDA()) {
    test_cuda_equals_cpu();
  } else {
    std::printf("no CUDA device: CUDA checks skipped\n");
  }
#endif
  if (failures) {
    std::fprintf(stderr, "%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("all tree op checks passed\n");
  return 0;
}
