// Benchmark baseline only (tools/bench_wkv.py), not used by the model: the reference RWKV-CLIP's
// algorithm, an RWKV-6 per-token scan run once forwards (with the bonus u) and once backwards,
// one block of N threads per (batch, head), each thread carrying an N-vector of fp32 state and the
// whole block synchronising at every token. Written from the description of that algorithm; unlike
// the reference it takes any T (no per-thread arrays sized by a compile-time token maximum).
// Inputs are fp32 (the reference casts bf16 to fp32 before its kernel); w is the raw decay.
#include <torch/extension.h>

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>

namespace {

// dir 0 runs t = 0..T-1 with the bonus, dir 1 runs t = T-1..0 without it and adds to y.
template <int N>
__global__ void scan_forward(const float* r, const float* k, const float* v, const float* w, const float* u,
                             float* y, int T, int H, int dir) {
  const int bh = blockIdx.x, b = bh / H, h = bh % H, i = threadIdx.x;  // i: value channel
  __shared__ float sr[N], sk[N], sw[N], su[N];
  float state[N];
#pragma unroll
  for (int j = 0; j < N; ++j) state[j] = 0.f;
  su[i] = dir == 0 ? u[h * N + i] : 0.f;
  for (int step = 0; step < T; ++step) {
    const int t = dir == 0 ? step : T - 1 - step;
    const int64_t g = ((int64_t(b) * T + t) * H + h) * N + i;
    __syncthreads();
    sr[i] = r[g];
    sk[i] = k[g];
    sw[i] = expf(-expf(w[g]));
    __syncthreads();
    const float vi = v[g];
    float acc = 0.f;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const float x = sk[j] * vi;
      acc += sr[j] * (su[j] * x + state[j]);
      state[j] = state[j] * sw[j] + x;
    }
    y[g] = dir == 0 ? acc : y[g] + acc;
  }
}

// One direction of the backward as four per-thread scans (gr, gk and gw per key channel, gv per
// value channel), accumulated into fp32 gradients; xr, yk are per-direction scratch [B, T, H, N].
template <int N>
__global__ void scan_backward(const float* r, const float* k, const float* v, const float* w, const float* u,
                              const float* gy, float* gr, float* gk, float* gv, float* gw, float* gu,
                              float* xr, float* yk, int T, int H, int dir) {
  const int bh = blockIdx.x, b = bh / H, h = bh % H, i = threadIdx.x;
  __shared__ float sa[N], sb[N], sc[N], sd[N];
  float state[N];
  const float ui = dir == 0 ? u[h * N + i] : 0.f;
  auto index = [&](int step) {
    const int t = dir == 0 ? step : T - 1 - step;
    return ((int64_t(b) * T + t) * H + h) * N;
  };
  float gu_acc = 0.f;
  // gr[t,i] = sum_j gy[t,j] (u_i k_i v_j + S_j), S_j = sum_{s<t} decay_i k_s,i v_s,j
#pragma unroll
  for (int j = 0; j < N; ++j) state[j] = 0.f;
  for (int step = 0; step < T; ++step) {
    const int64_t g = index(step);
    __syncthreads();
    sa[i] = v[g + i];
    sb[i] = gy[g + i];
    __syncthreads();
    const float ki = k[g + i], wi = expf(-expf(w[g + i]));
    float acc = 0.f, bonus = 0.f;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      acc += sb[j] * state[j];
      bonus += sb[j] * sa[j];
      state[j] = state[j] * wi + ki * sa[j];
    }
    xr[g + i] = r[g + i] * acc;
    gr[g + i] += acc + ui * ki * bonus;
    gu_acc += r[g + i] * ki * bonus;
  }
  // gk[s,i] = sum_j v[s,j] (u_i r_i gy_j + S_j), S_j = sum_{t>s} decay_i r_t,i gy_t,j
#pragma unroll
  for (int j = 0; j < N; ++j) state[j] = 0.f;
  for (int step = T - 1; step >= 0; --step) {
    const int64_t g = index(step);
    __syncthreads();
    sa[i] = v[g + i];
    sb[i] = gy[g + i];
    __syncthreads();
    const float ri = r[g + i], wi = expf(-expf(w[g + i]));
    float acc = 0.f, bonus = 0.f;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      acc += sa[j] * state[j];
      bonus += sa[j] * sb[j];
      state[j] = state[j] * wi + ri * sb[j];
    }
    yk[g + i] = k[g + i] * acc;
    gk[g + i] += acc + ui * ri * bonus;
  }
  // gv[s,i] = sum_j k[s,j] (u_j r_j gy_i + S_j), S_j = sum_{t>s} decay_j r_t,j gy_t,i
#pragma unroll
  for (int j = 0; j < N; ++j) state[j] = 0.f;
  sc[i] = dir == 0 ? u[h * N + i] : 0.f;
  for (int step = T - 1; step >= 0; --step) {
    const int64_t g = index(step);
    __syncthreads();
    sa[i] = r[g + i];
    sb[i] = k[g + i];
    sd[i] = expf(-expf(w[g + i]));
    __syncthreads();
    const float gyi = gy[g + i];
    float acc = 0.f;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      acc += sb[j] * (sc[j] * sa[j] * gyi + state[j]);
      state[j] = state[j] * sd[j] + sa[j] * gyi;
    }
    gv[g + i] += acc;
  }
  // gw: pairs strictly around p = sum_{t>p} r gr - sum_{s>=p} k gk, times d(log w)/dw = log w
  float sx = 0.f, sy = 0.f;
  for (int step = T - 1; step >= 0; --step) {
    const int64_t g = index(step);
    sy += yk[g + i];
    gw[g + i] += (sx - sy) * -expf(w[g + i]);
    sx += xr[g + i];
  }
  if (dir == 0) gu[int64_t(bh) * N + i] = gu_acc;
}

void check(const torch::Tensor& x, const char* name) {
  TORCH_CHECK(x.is_cuda() && x.is_contiguous() && x.scalar_type() == at::kFloat, "two_scan: ", name,
              " must be a contiguous CUDA float32 tensor");
}

torch::Tensor forward(torch::Tensor r, torch::Tensor k, torch::Tensor v, torch::Tensor w, torch::Tensor u) {
  for (auto [x, n] : {std::pair{&r, "r"}, {&k, "k"}, {&v, "v"}, {&w, "w"}, {&u, "u"}}) check(*x, n);
  TORCH_CHECK(r.size(3) == 64, "two_scan: the baseline is compiled for N=64 only");
  const int T = r.size(1), H = r.size(2), BH = r.size(0) * r.size(2);
  auto y = torch::empty_like(r);
  auto stream = c10::cuda::getCurrentCUDAStream();
  for (int dir = 0; dir < 2; ++dir) {
    scan_forward<64><<<BH, 64, 0, stream>>>(r.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(),
                                            w.data_ptr<float>(), u.data_ptr<float>(), y.data_ptr<float>(), T, H, dir);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return y;
}

std::vector<torch::Tensor> backward(torch::Tensor gy, torch::Tensor r, torch::Tensor k, torch::Tensor v,
                                    torch::Tensor w, torch::Tensor u) {
  for (auto [x, n] : {std::pair{&gy, "gy"}, {&r, "r"}, {&k, "k"}, {&v, "v"}, {&w, "w"}, {&u, "u"}}) check(*x, n);
  const int T = r.size(1), H = r.size(2), BH = r.size(0) * r.size(2);
  auto gr = torch::zeros_like(r), gk = torch::zeros_like(r), gv = torch::zeros_like(r), gw = torch::zeros_like(r);
  auto xr = torch::empty_like(r), yk = torch::empty_like(r);
  auto gu = torch::empty({BH, 64}, r.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  for (int dir = 0; dir < 2; ++dir) {
    scan_backward<64><<<BH, 64, 0, stream>>>(
        r.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), w.data_ptr<float>(), u.data_ptr<float>(),
        gy.data_ptr<float>(), gr.data_ptr<float>(), gk.data_ptr<float>(), gv.data_ptr<float>(), gw.data_ptr<float>(),
        gu.data_ptr<float>(), xr.data_ptr<float>(), yk.data_ptr<float>(), T, H, dir);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {gr, gk, gv, gw, gu.view({r.size(0), H, 64}).sum(0)};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "two-scan baseline forward (fp32, N=64)");
  m.def("backward", &backward, "two-scan baseline backward (fp32, N=64)");
}
