// Allocation, the last line of argument checks and the order of launches of the Bi-WKV sweeps,
// shared by the CUDA bindings (bi_wkv_ops.cpp) and the CPU emulation of the kernels used by tests
// (csrc/testing/cpu_emulation.cpp). `Device` provides kCuda (where the tensors must live),
// run<KIND>(params, head_size), which runs one v1 sweep kind over the grid (B*H, 2),
// run_fused<KIND>(query, key, head_size), which runs a v2 kernel over the grid (B*H), and two hooks
// for the emulation's count of global-memory traffic (no-ops on the GPU): tensor(name, t) names
// the memory a kernel may touch, host_pass(pass, name, loaded, stored) counts a torch operation's
// bytes (zero-fills and casts).
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <initializer_list>
#include <utility>
#include <vector>

#include "sweep_params.h"

namespace rwkvclip {
namespace detail {

template <class Device>
void check_operand(const torch::Tensor& x, const char* name, const torch::Tensor& like) {
  TORCH_CHECK(x.is_cuda() == Device::kCuda, "bi_wkv: ", name, " must be a ", Device::kCuda ? "CUDA" : "CPU",
              " tensor, got ", x.device());
  TORCH_CHECK(x.is_contiguous(), "bi_wkv: ", name, " must be contiguous");
  TORCH_CHECK(x.scalar_type() == like.scalar_type(), "bi_wkv: ", name, " has dtype ", x.scalar_type(),
              ", expected ", like.scalar_type());
  TORCH_CHECK(x.sizes() == like.sizes(), "bi_wkv: ", name, " has shape ", x.sizes(), ", expected ",
              like.sizes());
  TORCH_CHECK(x.device() == like.device(), "bi_wkv: ", name, " is on ", x.device(), ", expected ",
              like.device());
}

inline void check_bonus(const torch::Tensor& u, const torch::Tensor& r) {
  TORCH_CHECK(u.device() == r.device(), "bi_wkv: u must be on ", r.device());
  TORCH_CHECK(u.scalar_type() == at::kFloat && u.is_contiguous(), "bi_wkv: u must be contiguous float32");
  TORCH_CHECK(u.dim() == 2 && u.size(0) == r.size(2) && u.size(1) == r.size(3), "bi_wkv: u has shape ",
              u.sizes(), ", expected [H, N] = [", r.size(2), ", ", r.size(3), "]");
}

// The operands both the forward and the backward take; r sets the dtype, shape and device.
template <class Device>
void check_inputs(const torch::Tensor& r, const torch::Tensor& k, const torch::Tensor& v, const torch::Tensor& w,
                  const torch::Tensor& u) {
  check_operand<Device>(r, "r", r);
  check_operand<Device>(k, "k", r);
  check_operand<Device>(v, "v", r);
  check_operand<Device>(w, "w", r);
  check_bonus(u, r);
}

inline bool head_size_compiled(int64_t n) {
#define RWKVCLIP_MATCH(size) \
  if (n == size) return true;
  RWKVCLIP_FOR_EACH_HEAD_SIZE(RWKVCLIP_MATCH)
#undef RWKVCLIP_MATCH
  return false;
}

inline InputType input_type(const torch::Tensor& r) {
  switch (r.scalar_type()) {
    case at::kFloat:
      return InputType::kFloat;
    case at::kBFloat16:
      return InputType::kBFloat16;
    case at::kHalf:
      return InputType::kHalf;
    default:
      TORCH_CHECK(false, "bi_wkv: r has dtype ", r.scalar_type(), "; supported: float32, bfloat16, float16");
  }
}

inline SweepParams base_params(const torch::Tensor& r, const torch::Tensor& w, const torch::Tensor& u) {
  TORCH_CHECK(r.dim() == 4 && r.size(1) >= 1, "bi_wkv: r must be [B, T, H, N] with T >= 1, got ", r.sizes());
  TORCH_CHECK(head_size_compiled(r.size(3)), "bi_wkv: no kernel compiled for head size N=", r.size(3));
  TORCH_CHECK(r.size(0) * r.size(2) <= INT32_MAX / 2 && r.size(1) <= INT32_MAX / 2,
              "bi_wkv: 2*B*H (the grid) and T must fit in int32, got ", r.sizes());
  SweepParams prm{};
  prm.w = w.data_ptr();
  prm.u = u.data_ptr<float>();
  prm.type = input_type(r);
  prm.T = int(r.size(1));
  prm.H = int(r.size(2));
  prm.BH = int(r.size(0) * r.size(2));
  return prm;
}

inline std::vector<int64_t> head_sizes() {
  std::vector<int64_t> sizes;
#define RWKVCLIP_APPEND(size) sizes.push_back(size);
  RWKVCLIP_FOR_EACH_HEAD_SIZE(RWKVCLIP_APPEND)
#undef RWKVCLIP_APPEND
  return sizes;
}

inline int64_t shared_memory_bytes(int64_t n) {
#define RWKVCLIP_BYTES(size) \
  if (n == size) return int64_t(SweepSmem<size>::kBytes);
  RWKVCLIP_FOR_EACH_HEAD_SIZE(RWKVCLIP_BYTES)
#undef RWKVCLIP_BYTES
  TORCH_CHECK(false, "bi_wkv: no kernel compiled for head size N=", n);
}

// The kernels read 16-byte vectors: a tensor whose data starts off a 16-byte boundary (a view at an
// odd storage offset) is copied once into a fresh, aligned allocation.
inline torch::Tensor aligned16(const torch::Tensor& x) {
  return reinterpret_cast<std::uintptr_t>(x.data_ptr()) % 16 == 0 ? x : x.clone();
}

inline torch::Tensor to_input_dtype(torch::Tensor x32, const torch::Tensor& like) {
  return like.scalar_type() == at::kFloat ? x32 : x32.to(like.scalar_type());
}

template <class Device>
void name_tensors(std::initializer_list<std::pair<const char*, torch::Tensor>> tensors) {
  for (const auto& [name, t] : tensors) Device::tensor(name, t);
}

}  // namespace detail

using namespace detail;

// kV2: the v2 kernel (sweep_fused.cuh) writes y once in the input dtype; v1's two direction blocks
// add onto a zeroed fp32 buffer, cast at the end.
template <class Device, bool kV2>
torch::Tensor forward_version(torch::Tensor r, torch::Tensor k, torch::Tensor v, torch::Tensor w, torch::Tensor u) {
  check_inputs<Device>(r, k, v, w, u);
  const c10::DeviceGuard guard(r.device());
  SweepParams prm = base_params(r, w, u);
  if (prm.BH == 0) return torch::zeros_like(r);  // an empty batch: no launch of an empty grid
  r = aligned16(r), k = aligned16(k), v = aligned16(v), w = aligned16(w);
  prm.w = w.data_ptr();
  auto y = kV2 ? torch::empty_like(r) : torch::zeros(r.sizes(), r.options().dtype(at::kFloat));
  name_tensors<Device>({{"r", r}, {"k", k}, {"v", v}, {"w", w}, {"u", u}, {"y", y}});
  prm.a = k.data_ptr();
  prm.b = v.data_ptr();
  prm.p = r.data_ptr();
  if constexpr (kV2) {
    prm.col_typed = y.data_ptr();
    Device::template run_fused<Fused::kForward>(prm, prm, r.size(3));
    return y;
  }
  Device::host_pass("forward: zero-fill", "y", 0, y.nbytes());
  prm.col_out = y.data_ptr<float>();
  Device::template run<Sweep::kForward>(prm, r.size(3));
  if (r.scalar_type() != at::kFloat) Device::host_pass("forward: cast", "y", y.nbytes(), r.nbytes());
  return to_input_dtype(y, r);
}

template <class Device>
torch::Tensor forward(torch::Tensor r, torch::Tensor k, torch::Tensor v, torch::Tensor w, torch::Tensor u) {
  return forward_version<Device, false>(r, k, v, w, u);
}

template <class Device>
std::vector<torch::Tensor> backward(torch::Tensor dy, torch::Tensor r, torch::Tensor k, torch::Tensor v,
                                    torch::Tensor w, torch::Tensor u) {
  check_inputs<Device>(r, k, v, w, u);
  check_operand<Device>(dy, "grad_output", r);
  const c10::DeviceGuard guard(r.device());
  const int64_t B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
  if (base_params(r, w, u).BH == 0)  // an empty batch: no launch of an empty grid
    return {torch::zeros_like(r), torch::zeros_like(r), torch::zeros_like(r), torch::zeros_like(r),
            torch::zeros_like(u)};
  dy = aligned16(dy), r = aligned16(r), k = aligned16(k), v = aligned16(v), w = aligned16(w);
  const int64_t chunks = (T + kChunk - 1) / kChunk;
  auto f32 = r.options().dtype(at::kFloat);
  auto dr = torch::zeros(r.sizes(), f32);
  auto dk = torch::zeros(r.sizes(), f32);
  auto dv = torch::zeros(r.sizes(), f32);
  auto dw = torch::zeros(r.sizes(), f32);
  auto du_part = torch::empty({B * H, N}, f32);
  // the state entering every chunk, per direction: what the key sweeps need for d(w)
  auto states = torch::empty({2, B * H, chunks, N, N}, f32);
  name_tensors<Device>({{"r", r}, {"k", k}, {"v", v}, {"w", w}, {"u", u}, {"dy", dy}, {"dr", dr}, {"dk", dk},
                        {"dv", dv}, {"dw", dw}, {"du", du_part}, {"states", states}});
  for (const char* name : {"dr", "dk", "dv", "dw"}) Device::host_pass("backward: zero-fill", name, 0, dr.nbytes());

  SweepParams query = base_params(r, w, u);
  query.a = k.data_ptr();
  query.b = v.data_ptr();
  query.q = dy.data_ptr();
  query.row_out = dr.data_ptr<float>();
  query.states_out = states.data_ptr<float>();
  Device::template run<Sweep::kQuery>(query, N);

  SweepParams key = base_params(r, w, u);
  key.a = r.data_ptr();
  key.b = dy.data_ptr();
  key.p = k.data_ptr();
  key.q = v.data_ptr();
  key.row_out = dk.data_ptr<float>();
  key.col_out = dv.data_ptr<float>();
  key.dw_out = dw.data_ptr<float>();
  key.du_part = du_part.data_ptr<float>();
  key.states_in = states.data_ptr<float>();
  Device::template run<Sweep::kKey>(key, N);

  auto du = du_part.view({B, H, N}).sum(0);
  Device::host_pass("backward: du sum", "du", du_part.nbytes(), du.nbytes());
  if (r.scalar_type() != at::kFloat)
    for (const char* name : {"dr", "dk", "dv", "dw"}) Device::host_pass("backward: cast", name, dr.nbytes(), r.nbytes());
  return {to_input_dtype(dr, r), to_input_dtype(dk, r), to_input_dtype(dv, r), to_input_dtype(dw, r), du};
}

// v2 (sweep_fused.cuh): one launch, outputs written once in the input dtype. fp32 inputs keep the
// v1 backward: v2's d(w) subtracts long sums, within bf16's error budget but not fp32's.
template <class Device>
torch::Tensor forward_v2(torch::Tensor r, torch::Tensor k, torch::Tensor v, torch::Tensor w, torch::Tensor u) {
  return forward_version<Device, true>(r, k, v, w, u);
}

template <class Device>
std::vector<torch::Tensor> backward_v2(torch::Tensor dy, torch::Tensor r, torch::Tensor k, torch::Tensor v,
                                       torch::Tensor w, torch::Tensor u) {
  if (r.scalar_type() == at::kFloat) return backward<Device>(dy, r, k, v, w, u);
  check_inputs<Device>(r, k, v, w, u);
  check_operand<Device>(dy, "grad_output", r);
  const c10::DeviceGuard guard(r.device());
  const int64_t B = r.size(0), H = r.size(2), N = r.size(3);
  if (base_params(r, w, u).BH == 0)  // an empty batch: no launch of an empty grid
    return {torch::zeros_like(r), torch::zeros_like(r), torch::zeros_like(r), torch::zeros_like(r),
            torch::zeros_like(u)};
  dy = aligned16(dy), r = aligned16(r), k = aligned16(k), v = aligned16(v), w = aligned16(w);
  auto dr = torch::empty_like(r), dk = torch::empty_like(r), dv = torch::empty_like(r), dw = torch::empty_like(r);
  auto sums = torch::empty(r.sizes(), r.options().dtype(at::kFloat));
  auto du_part = torch::empty({B * H, N}, r.options().dtype(at::kFloat));
  name_tensors<Device>({{"r", r}, {"k", k}, {"v", v}, {"w", w}, {"u", u}, {"dy", dy}, {"dr", dr}, {"dk", dk},
                        {"dv", dv}, {"dw", dw}, {"du", du_part}, {"dw sums", sums}});
  SweepParams query = base_params(r, w, u);
  query.w = w.data_ptr();
  query.a = k.data_ptr();
  query.b = v.data_ptr();
  query.p = r.data_ptr();
  query.q = dy.data_ptr();
  query.row_typed = dr.data_ptr();
  query.dw_scratch = sums.data_ptr<float>();
  SweepParams key = query;
  key.a = r.data_ptr();
  key.b = dy.data_ptr();
  key.p = k.data_ptr();
  key.q = v.data_ptr();
  key.row_typed = dk.data_ptr();
  key.col_typed = dv.data_ptr();
  key.dw_typed = dw.data_ptr();
  key.du_part = du_part.data_ptr<float>();
  Device::template run_fused<Fused::kBackward>(query, key, N);
  auto du = du_part.view({B, H, N}).sum(0);
  Device::host_pass("backward: du sum", "du", du_part.nbytes(), du.nbytes());
  return {dr, dk, dv, dw, du};
}

}  // namespace rwkvclip
