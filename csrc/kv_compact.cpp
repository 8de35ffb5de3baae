// kv_compact_, CPU reference: keep the accepted path's KV entries, contiguously, in place.
//   kv: list of [B, H, S, D] float32/float16/bfloat16 tensors (any strides; one dtype, one device;
//       shapes may differ per tensor; no two tensors may share memory); path [L] int64 on that
//       device, strictly increasing, path[0] == 0
//   For every tensor: entry dst_start + path[j] moves to dst_start + j.
// Aliasing: with path [0, 2, 5], slot dst_start+2 is a destination (j = 2) and a source (j = 1).
// Copying in increasing j is safe because path[j'] > path[j] >= j for j' > j: every source still
// to be read lies above every slot written so far.
// kv_compact_batched_: row b of every tensor moves entry src_start + paths[b, j] to
// dst_starts[b] + j (paths -1 padded). With dst_starts[b] <= src_start the same order is safe:
// src_start + paths[b, j'] > src_start + paths[b, j] >= src_start + j >= dst_starts[b] + j.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <cstdint>
#include <utility>
#include <vector>

#include "ops.h"

namespace falcon_ext {

namespace {

// The kv tensors of either op: [B, H, S, D], one float dtype, on `device`, no memory shared.
void check_kv_tensors(at::TensorList kv, const at::Device& device, const char* path_name) {
  for (size_t i = 0; i < kv.size(); ++i) {
    const at::Tensor& t = kv[i];
    TORCH_CHECK(t.dim() == 4, "kv[", i, "] must have shape [B, H, S, D], got ", t.sizes());
    const auto st = t.scalar_type();
    TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, "kv[", i,
                "] must be float32, float16 or bfloat16, got ", st);
    TORCH_CHECK(st == kv[0].scalar_type(), "all kv tensors must share one dtype: kv[0] is ", kv[0].scalar_type(),
                ", kv[", i, "] is ", st);
    TORCH_CHECK(t.device() == device, "kv[", i, "] and ", path_name, " must be on the same device, got ", t.device(),
                " and ", device);
    TORCH_CHECK(at::has_internal_overlap(t) != at::MemOverlap::Yes, "kv[", i,
                "] has elements sharing memory (e.g. an expanded view); compaction needs distinct slots");
  }
  // Two entries over the same memory would have shared slots moved twice (on CUDA, by racing
  // blocks). Comparing the byte ranges the views span is cheap and catches every such case; it
  // also refuses disjoint views whose ranges interleave, which no KV cache layout needs.
  std::vector<std::pair<uintptr_t, uintptr_t>> spans(kv.size(), {0, 0});  // [first, last) bytes
  for (size_t i = 0; i < kv.size(); ++i) {
    const at::Tensor& t = kv[i];
    if (t.numel() == 0) continue;
    int64_t last = 0;
    for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
    const auto first = reinterpret_cast<uintptr_t>(t.data_ptr());
    spans[i] = {first, first + static_cast<uintptr_t>(last + 1) * t.element_size()};
  }
  for (size_t i = 0; i < kv.size(); ++i) {
    for (size_t j = 0; j < i; ++j) {
      TORCH_CHECK(spans[i].first >= spans[j].second || spans[j].first >= spans[i].second, "kv[", j, "] and kv[", i,
                  "] share memory; every cache tensor must have its own (compaction would move shared slots twice)");
    }
  }
}

}  // namespace

void check_kv_compact_args(at::TensorList kv, const at::Tensor& path, int64_t dst_start) {
  FALCON_CHECK_DIM(path, 1);
  FALCON_CHECK_DTYPE(path, at::kLong);
  TORCH_CHECK(path.numel() >= 1, "path must hold at least the root (path[0] == 0), got an empty tensor");
  TORCH_CHECK(dst_start >= 0, "dst_start must be >= 0, got ", dst_start);
  check_kv_tensors(kv, path.device(), "path");
}

void check_kv_compact_batched_args(at::TensorList kv, const at::Tensor& paths, at::IntArrayRef dst_starts,
                                   int64_t src_start) {
  TORCH_CHECK(paths.dim() == 2, "paths must have shape [B, L], got ", paths.sizes());
  FALCON_CHECK_DTYPE(paths, at::kLong);
  TORCH_CHECK(paths.size(0) >= 1 && paths.size(1) >= 1,
              "paths must have B >= 1 rows of L >= 1 entries (each row holds at least its root), got ", paths.sizes());
  const int64_t batch = paths.size(0);
  TORCH_CHECK(static_cast<int64_t>(dst_starts.size()) == batch, "dst_starts must have B = ", batch,
              " entries (one per row of paths), got ", dst_starts.size());
  TORCH_CHECK(src_start >= 0, "src_start must be >= 0, got ", src_start);
  for (int64_t b = 0; b < batch; ++b) {
    // dst <= src keeps the in-order copy from overwriting a source still to be read (header comment)
    TORCH_CHECK(dst_starts[b] >= 0 && dst_starts[b] <= src_start, "dst_starts[", b, "] must be in [0, src_start = ",
                src_start, "], got ", dst_starts[b]);
  }
  check_kv_tensors(kv, paths.device(), "paths");
  for (size_t i = 0; i < kv.size(); ++i) {
    TORCH_CHECK(kv[i].size(0) == batch, "kv[", i, "] must have shape [B = ", batch,
                ", H, S, D] (one cache row per row of paths), got ", kv[i].sizes());
  }
}

void check_kv_path_cpu(at::TensorList kv, const at::Tensor& path, int64_t dst_start) {
  const auto p = path.accessor<int64_t, 1>();
  TORCH_CHECK(p[0] == 0, "path[0] must be 0 (the root stays in place), got ", p[0]);
  for (int64_t j = 1; j < path.numel(); ++j) {
    TORCH_CHECK(p[j] > p[j - 1], "path must be strictly increasing, got path[", j - 1, "] = ", p[j - 1], " and path[",
                j, "] = ", p[j]);
  }
  const int64_t last = p[path.numel() - 1];
  for (size_t i = 0; i < kv.size(); ++i) {
    // Compared as last < S - dst_start: dst_start + last could overflow int64 (both are >= 0
    // here, so their sum is printed exactly as unsigned).
    TORCH_CHECK(last < kv[i].size(2) - dst_start, "dst_start + path[-1] = ",
                static_cast<uint64_t>(dst_start) + static_cast<uint64_t>(last), " is outside kv[", i,
                "]'s sequence length ", kv[i].size(2));
  }
}

void kv_compact_cpu(at::TensorList kv, const at::Tensor& path, int64_t dst_start) {
  check_kv_compact_args(kv, path, dst_start);
  check_kv_path_cpu(kv, path, dst_start);
  const auto p = path.accessor<int64_t, 1>();
  for (const at::Tensor& t : kv) {
    for (int64_t j = 0; j < path.numel(); ++j) {  // increasing j: see the aliasing note above
      if (p[j] != j) t.select(2, dst_start + j).copy_(t.select(2, dst_start + p[j]));
    }
  }
}

void check_kv_paths_cpu(at::TensorList kv, const at::Tensor& paths, int64_t src_start) {
  const auto p = paths.accessor<int64_t, 2>();
  for (int64_t b = 0; b < paths.size(0); ++b) {
    TORCH_CHECK(p[b][0] == 0, "paths[", b, ", 0] must be 0 (the root is always kept), got ", p[b][0]);
    int64_t length = paths.size(1);
    for (int64_t j = 1; j < paths.size(1); ++j) {
      if (length < j) {
        TORCH_CHECK(p[b][j] == -1, "paths[", b, "] must be -1 after its first -1 (padding fills the end of the row), ",
                    "got paths[", b, ", ", j, "] = ", p[b][j]);
      } else if (p[b][j] == -1) {
        length = j;
      } else {
        TORCH_CHECK(p[b][j] > p[b][j - 1], "paths[", b, "] must be strictly increasing, got paths[", b, ", ", j - 1,
                    "] = ", p[b][j - 1], " and paths[", b, ", ", j, "] = ", p[b][j]);
      }
    }
    const int64_t last = p[b][length - 1];
    for (size_t i = 0; i < kv.size(); ++i) {
      // last < S - src_start: src_start + last could overflow int64 (see check_kv_path_cpu)
      TORCH_CHECK(last < kv[i].size(2) - src_start, "src_start + paths[", b, "][-1] = ",
                  static_cast<uint64_t>(src_start) + static_cast<uint64_t>(last), " is outside kv[", i,
                  "]'s sequence length ", kv[i].size(2));
    }
  }
}

void kv_compact_batched_cpu(at::TensorList kv, const at::Tensor& paths, at::IntArrayRef dst_starts,
                            int64_t src_start) {
  check_kv_compact_batched_args(kv, paths, dst_starts, src_start);
  check_kv_paths_cpu(kv, paths, src_start);
  const auto p = paths.accessor<int64_t, 2>();
  for (const at::Tensor& t : kv) {
    for (int64_t b = 0; b < paths.size(0); ++b) {
      const at::Tensor row = t[b];  // [H, S, D]
      for (int64_t j = 0; j < paths.size(1) && p[b][j] >= 0; ++j) {  // increasing j: see the header comment
        const int64_t src = src_start + p[b][j], dst = dst_starts[b] + j;
        if (src != dst) row.select(1, dst).copy_(row.select(1, src));
      }
    }
  }
}

}  // namespace falcon_ext
