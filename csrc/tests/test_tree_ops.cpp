// C++ unit test of the tree ops' CPU references (and, in a CUDA build with a GPU, CUDA == CPU).
// Run by ctest (CMakeLists.txt), also under AddressSanitizer + UBSan (scripts/sanitize_cpu.sh),
// which is why it feeds malformed inputs: they must raise c10::Error without touching memory
// they do not own. Expected values are written out by hand or computed by naive loops here.
#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "ops.h"

namespace {

int failures = 0;

#define CHECK(cond)                                                     \
  do {                                                                  \
    if (!(cond)) {                                                      \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
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

bool equal(const at::Tensor& a, const at::Tensor& b) { return a.sizes() == b.sizes() && at::equal(a, b); }

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
  CHECK(equal(mask, want));
  CHECK(equal(pos, longs({2, 3, 3, 4})));
  CHECK(equal(paths, longs({0, 2, -1, 0, 1, 3}).view({2, 3})));
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
    CHECK(pos[i].item<int64_t>() == prefix + depth);
    for (int64_t j = 0; j < n; ++j) {
      const float v = m[i][prefix + j].item<float>();
      CHECK(ancestor[j] ? v == 0.f : std::isinf(v) && v < 0);
    }
  }
  // each row of paths: a root-to-leaf chain, -1 padded
  for (int64_t r = 0; r < paths.size(0); ++r) {
    CHECK(paths[r][0].item<int64_t>() == 0);
    for (int64_t c = 1; c < paths.size(1) && paths[r][c].item<int64_t>() >= 0; ++c) {
      CHECK(parents[paths[r][c].item<int64_t>()] == paths[r][c - 1].item<int64_t>());
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
  CHECK(equal(path, longs({0, 2, 3, -1})));
  CHECK(equal(result, longs({3, 1})));
}

void test_verify_sample_one_hot() {
  // a one-hot target accepts exactly the drafts the target would emit, whatever the uniforms
  at::Tensor probs = at::zeros({4, 8});
  probs[0][4] = 1.f, probs[1][6] = 1.f, probs[2][5] = 1.f, probs[3][1] = 1.f;
  for (float u : {0.f, 0.3f, 0.999f}) {
    const at::Tensor uniforms = at::full({5}, u);
    auto [path, result] = falcon_ext::tree_verify_sample_cpu(probs, longs({0, 3, 4, 5}), longs({-1, 0, 0, 2}), uniforms);
    CHECK(equal(path, longs({0, 2, 3, -1})));
    CHECK(equal(result, longs({3, 1})));
  }
}

void test_verify_sample_rejection() {
  // root weights (token: weight) 0: 0.5, 1: 0.25, 2: 0.25; child drafts token 0
  const at::Tensor probs = at::tensor({0.5f, 0.25f, 0.25f, 1.f, 0.f, 0.f}).view({2, 3});
  auto accept = falcon_ext::tree_verify_sample_cpu(probs, longs({0, 0}), longs({-1, 0}), at::tensor({0.f, 0.49f, 0.f}));
  CHECK(equal(std::get<1>(accept), longs({2, 0})));  // 0.49 * 1 < 0.5: accepted, then token 0 at node 1
  // rejected (0.5 * 1 >= 0.5): residual {1: 0.25, 2: 0.25}; u = 0.6 -> threshold 0.3 -> token 2
  auto reject = falcon_ext::tree_verify_sample_cpu(probs, longs({0, 0}), longs({-1, 0}), at::tensor({0.f, 0.5f, 0.6f}));
  CHECK(equal(std::get<0>(reject), longs({0, -1})));
  CHECK(equal(std::get<1>(reject), longs({1, 2})));
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
  for (int64_t s = 0; s < 8; ++s) CHECK(kv[1][2][s][3].item<float>() == want[s] && kv[0][0][s][0].item<float>() == want[s]);
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
  CHECK(equal(kv, before));
}

#ifdef FALCON_EXT_WITH_CUDA
void test_cuda_equals_cpu() {
  const at::Tensor parents = longs({-1, 0, 0, 1, 1, 2, 5, 0});
  const auto cpu_build = falcon_ext::tree_build_cpu(parents, 3, at::kHalf);
  const auto cuda_build = falcon_ext::tree_build_cuda(parents.cuda(), 3, at::kHalf);
  CHECK(equal(std::get<0>(cuda_build).cpu(), std::get<0>(cpu_build)));
  CHECK(equal(std::get<2>(cuda_build).cpu(), std::get<2>(cpu_build)));
  const at::Tensor probs = at::softmax(at::randn({8, 3000}), -1), tokens = at::randint(0, 3000, {8});
  for (int rep = 0; rep < 20; ++rep) {
    const at::Tensor u = at::rand({9});
    const auto want = falcon_ext::tree_verify_sample_cpu(probs, tokens, parents, u);
    const auto got = falcon_ext::tree_verify_sample_cuda(probs.cuda(), tokens.cuda(), parents.cuda(), u.cuda());
    CHECK(equal(std::get<1>(got).cpu(), std::get<1>(want)));
  }
  at::Tensor kv = at::rand({2, 3, 12, 5});
  at::Tensor kv_cuda = kv.cuda();
  falcon_ext::kv_compact_cpu({kv}, longs({0, 2, 5, 6}), 4);
  falcon_ext::kv_compact_cuda({kv_cuda}, longs({0, 2, 5, 6}).cuda(), 4);
  CHECK(equal(kv_cuda.cpu(), kv));
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
