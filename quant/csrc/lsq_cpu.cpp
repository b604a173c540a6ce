// Fused per-tensor LSQ / LSQ+ fake quantization for CPU float32 tensors.
//
// The reference (quant/lsq.py, _LSQFunction) makes about six elementwise passes over the
// activation in the forward and keeps two activation-sized tensors for the backward. Here the
// forward is one pass (read x, write y) and the backward one pass (read x and dy, write dx) that
// recomputes the rounding decision from x and accumulates the scale and offset gradients.
//
// The arithmetic is the reference's, operation for operation, so that every rounding decision
// agrees bit for bit (tests/test_lsq_fused.py):
//   inv = 1 / s;  z = x * inv            (no offset)
//                 z = (-b * inv) + x * inv   (LSQ+ offset b; addcmul's order)
//   r = round_half_even(z);  c = clamp(r, qmin, qmax);  m = (c == r)
//   y = c * s (+ b)
//   dx = dy * m;  ds = sum(dy * (c - zc * m));  db = sum(dy * (1 - m))
// with zc = clamp(z, qmin - 1, qmax + 1) (z itself wherever m = 1): an input that overflowed to
// +-inf gets the clip gradient c instead of inf * 0 = NaN (the reference clamps z the same way).
// Rounding uses the 1.5 * 2^23 trick on a pre-clamped z: exact round-half-even for |z| < 2^22,
// and it vectorizes with plain SSE2 (std::nearbyint is a libm call per element without SSE4.1).
// Compiled with -fno-trapping-math (it changes no result; it lets the compiler if-convert the
// clamps) and OpenMP, through at::parallel_for (torch.set_num_threads applies).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kGrain = 16384;
constexpr float kRoundMagic = 12582912.0f;  // 1.5 * 2^23

inline float round_half_even(float z) {
  // volatile-free: the compiler may not reassociate float adds without -ffast-math.
  return (z + kRoundMagic) - kRoundMagic;
}

struct Params {
  float s, inv, nb, b, qmin, qmax, lo, hi;
};

Params make_params(const torch::Tensor& scale, const c10::optional<torch::Tensor>& offset,
                   double min_scale, int64_t qmin, int64_t qmax) {
  Params p;
  float s = scale.data_ptr<float>()[0];
  // clamp_min(min_scale) in float, as the reference does on the fp32 tensor.
  const float ms = static_cast<float>(min_scale);
  p.s = std::isnan(s) ? s : std::max(s, ms);
  p.inv = 1.0f / p.s;
  p.b = offset.has_value() ? offset->data_ptr<float>()[0] : 0.0f;
  p.nb = offset.has_value() ? (-p.b) * p.inv : 0.0f;
  p.qmin = static_cast<float>(qmin);
  p.qmax = static_cast<float>(qmax);
  // Pre-clamp to one level beyond the grid: clipped values still round outside [qmin, qmax].
  p.lo = p.qmin - 1.0f;
  p.hi = p.qmax + 1.0f;
  return p;
}

void check_inputs(const torch::Tensor& x, const torch::Tensor& scale,
                  const c10::optional<torch::Tensor>& offset) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.is_contiguous(),
              "lsq_cpu: x must be a contiguous float32 CPU tensor");
  TORCH_CHECK(scale.device().is_cpu() && scale.scalar_type() == torch::kFloat32 && scale.numel() == 1,
              "lsq_cpu: scale must be a float32 CPU tensor with one element");
  if (offset.has_value()) {
    TORCH_CHECK(offset->device().is_cpu() && offset->scalar_type() == torch::kFloat32 &&
                    offset->numel() == 1,
                "lsq_cpu: offset must be a float32 CPU tensor with one element");
  }
}

// Eight floats (GCC/Clang vector extension). Written with explicit vectors so that the loops
// vectorize with or without -ffast-math, and the reductions have the same association order on
// every machine: eight lanes per chunk, then the chunks summed in order in double.
typedef float v8f __attribute__((vector_size(32)));

// x86-64 Linux: an AVX2 clone of each chunk loop beside the baseline one, picked at load time
// (ifunc). No FMA in either: a fused multiply-add would round differently from the reference.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__)
#define QAT_MULTIVERSION __attribute__((target_clones("avx2", "default")))
#else
#define QAT_MULTIVERSION
#endif

// The scalar form of one element, for the tails (and the documentation of the vector loops).
// Without an offset nb = b = 0, which changes nothing but the sign of a zero.
inline float quant_level(float zu, const Params& p) {
  float z = zu < p.lo ? p.lo : zu;  // pre-clamp, so that the rounding trick stays exact
  z = z > p.hi ? p.hi : z;
  const float r = round_half_even(z);
  float c = r < p.qmin ? p.qmin : r;
  return c > p.qmax ? p.qmax : c;
}

QAT_MULTIVERSION
void forward_chunk(const float* __restrict__ x, float* __restrict__ y, int64_t n, const Params& p) {
  const float inv = p.inv, nb = p.nb, lo = p.lo, hi = p.hi, qmin = p.qmin, qmax = p.qmax, s = p.s, b = p.b;
  const v8f vlo = lo - v8f{}, vhi = hi - v8f{}, vqmin = qmin - v8f{}, vqmax = qmax - v8f{};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    v8f xv;
    std::memcpy(&xv, x + i, sizeof(xv));
    v8f z = nb + xv * inv;
    z = z < vlo ? vlo : z;
    z = z > vhi ? vhi : z;
    v8f c = (z + kRoundMagic) - kRoundMagic;
    c = c < vqmin ? vqmin : c;
    c = c > vqmax ? vqmax : c;
    const v8f yv = c * s + b;
    std::memcpy(y + i, &yv, sizeof(yv));
  }
  for (; i < n; ++i) y[i] = quant_level(nb + x[i] * inv, p) * s + b;
}

// dx = dy * m with m = 1 where round(z) lies on the grid; returns sum(dy * (c - z * m)) in
// sum_s (d y / d s) and sum(dy * (1 - m)) in sum_b (d y / d b).
QAT_MULTIVERSION
void backward_chunk(const float* __restrict__ dy, const float* __restrict__ x, float* __restrict__ dx,
                    int64_t n, const Params& p, double* sum_s, double* sum_b) {
  const float inv = p.inv, nb = p.nb, lo = p.lo, hi = p.hi, qmin = p.qmin, qmax = p.qmax;
  const v8f vlo = lo - v8f{}, vhi = hi - v8f{}, vqmin = qmin - v8f{}, vqmax = qmax - v8f{};
  const v8f one = 1.0f - v8f{}, zero = v8f{};
  v8f acc_s = v8f{}, acc_b = v8f{};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    v8f xv, g;
    std::memcpy(&xv, x + i, sizeof(xv));
    std::memcpy(&g, dy + i, sizeof(g));
    const v8f zu = nb + xv * inv;
    v8f z = zu < vlo ? vlo : zu;
    z = z > vhi ? vhi : z;
    const v8f r = (z + kRoundMagic) - kRoundMagic;
    v8f c = r < vqmin ? vqmin : r;
    c = c > vqmax ? vqmax : c;
    const v8f m = c == r ? one : zero;
    const v8f gm = g * m;
    std::memcpy(dx + i, &gm, sizeof(gm));
    acc_s += g * (c - z * m);
    acc_b += g - gm;
  }
  double ts = 0.0, tb = 0.0;
  for (; i < n; ++i) {
    const float zu = nb + x[i] * inv;
    float z = zu < lo ? lo : zu;
    z = z > hi ? hi : z;
    const float r = round_half_even(z);
    const float c = quant_level(zu, p);
    const float m = c == r ? 1.0f : 0.0f, g = dy[i];
    dx[i] = g * m;
    ts += g * (c - z * m);
    tb += g - g * m;
  }
  for (int j = 0; j < 8; ++j) {
    ts += acc_s[j];
    tb += acc_b[j];
  }
  *sum_s = ts;
  *sum_b = tb;
}

void forward_impl(const float* x, float* y, int64_t n, const Params& p) {
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    forward_chunk(x + begin, y + begin, end - begin, p);
  });
}

std::vector<double> backward_impl(const float* dy, const float* x, float* dx, int64_t n, const Params& p) {
  // Fixed chunks (not one per thread): the sums do not depend on the thread count.
  const int64_t chunks = std::max<int64_t>(1, (n + kGrain - 1) / kGrain);
  std::vector<double> part_s(chunks, 0.0), part_b(chunks, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t k = cb; k < ce; ++k) {
      const int64_t begin = k * kGrain, len = std::min(n, begin + kGrain) - begin;
      backward_chunk(dy + begin, x + begin, dx + begin, len, p, &part_s[k], &part_b[k]);
    }
  });
  double sum_s = 0.0, sum_b = 0.0;
  for (int64_t k = 0; k < chunks; ++k) {
    sum_s += part_s[k];
    sum_b += part_b[k];
  }
  return {sum_s, sum_b};
}

torch::Tensor lsq_forward(const torch::Tensor& x, const torch::Tensor& scale,
                          const c10::optional<torch::Tensor>& offset, double min_scale,
                          int64_t qmin, int64_t qmax) {
  check_inputs(x, scale, offset);
  const Params p = make_params(scale, offset, min_scale, qmin, qmax);
  auto y = torch::empty_like(x);
  forward_impl(x.data_ptr<float>(), y.data_ptr<float>(), x.numel(), p);
  return y;
}

// Returns (dx, sum(dy * ds_local), sum(dy * db_local)); the caller applies LSQ's grad factor.
std::vector<torch::Tensor> lsq_backward(const torch::Tensor& dy, const torch::Tensor& x,
                                        const torch::Tensor& scale,
                                        const c10::optional<torch::Tensor>& offset,
                                        double min_scale, int64_t qmin, int64_t qmax) {
  check_inputs(x, scale, offset);
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.is_contiguous() && dy.scalar_type() == torch::kFloat32,
              "lsq_cpu: dy must be a contiguous float32 tensor shaped like x");
  const Params p = make_params(scale, offset, min_scale, qmin, qmax);
  auto dx = torch::empty_like(x);
  const std::vector<double> sums =
      backward_impl(dy.data_ptr<float>(), x.data_ptr<float>(), dx.data_ptr<float>(), x.numel(), p);
  auto opts = scale.options();
  return {dx, torch::full({1}, sums[0], opts), torch::full({1}, sums[1], opts)};
}

// The autograd node, in C++: a Python autograd.Function costs about 250 us per call (forward and
// backward), which over the ~150 quantizers of a YOLO training step is several percent of it.
// Inputs: x, scale, offset, has_offset (without an offset, the scale is passed again in its
// place: autograd's C++ Function does not take undefined tensors), qmin, qmax, LSQ grad factor,
// min scale.
class LSQFunction : public torch::autograd::Function<LSQFunction> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                               const torch::Tensor& scale, const torch::Tensor& offset, bool has_offset,
                               int64_t qmin, int64_t qmax, double grad_factor, double min_scale) {
    const auto off = has_offset ? c10::optional<torch::Tensor>(offset.detach()) : c10::nullopt;
    auto y = lsq_forward(x, scale.detach(), off, min_scale, qmin, qmax);
    ctx->save_for_backward({x, scale, offset});
    ctx->saved_data["has_offset"] = has_offset;
    ctx->saved_data["qmin"] = qmin;
    ctx->saved_data["qmax"] = qmax;
    ctx->saved_data["grad_factor"] = grad_factor;
    ctx->saved_data["min_scale"] = min_scale;
    return y;
  }

  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const bool has_offset = ctx->saved_data["has_offset"].toBool();
    const double gf = ctx->saved_data["grad_factor"].toDouble();
    const auto off = has_offset ? c10::optional<torch::Tensor>(saved[2].detach()) : c10::nullopt;
    auto dy = grad_outputs[0].to(torch::kFloat32).contiguous();
    auto out = lsq_backward(dy, saved[0], saved[1].detach(), off, ctx->saved_data["min_scale"].toDouble(),
                            ctx->saved_data["qmin"].toInt(), ctx->saved_data["qmax"].toInt());
    torch::Tensor none;
    return {ctx->needs_input_grad(0) ? out[0] : none,
            ctx->needs_input_grad(1) ? (out[1] * gf).reshape(saved[1].sizes()) : none,
            has_offset && ctx->needs_input_grad(2) ? (out[2] * gf).reshape(saved[2].sizes()) : none,
            none, none, none, none, none};
  }
};

torch::Tensor lsq_fake_quant(const torch::Tensor& x, const torch::Tensor& scale,
                             const c10::optional<torch::Tensor>& offset, int64_t qmin, int64_t qmax,
                             double grad_factor, double min_scale) {
  return LSQFunction::apply(x, scale, offset.has_value() ? *offset : scale, offset.has_value(), qmin,
                            qmax, grad_factor, min_scale);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lsq_fake_quant", &lsq_fake_quant,
        "per-tensor LSQ/LSQ+ fake quantization with its autograd (CPU, float32): "
        "(x, scale, offset or None, qmin, qmax, grad_factor, min_scale)");
  m.def("forward", &lsq_forward, "the forward alone: (x, scale, offset, min_scale, qmin, qmax)");
  m.def("backward", &lsq_backward, "the backward alone: dx and the unscaled scale and offset sums");
}
