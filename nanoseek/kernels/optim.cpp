/* AdamW with its moments stored in bf16 (DeepSeek-V3's low-precision optimizer states) for
 * fp32 parameters and gradients on CPU, built and loaded by nanoseek/kernels as the torch op
 * nanoseek::adamw_bf16_ (train/adamw.py's BF16AdamW is the optimizer; its `reference_step`
 * is the same math in torch ops, the path everywhere else).
 *
 * Per element, in fp32 (the moments widened from bf16, rounded back once on store):
 *     g = grad / grad_scale                    (the gradient clipping folded in, if given)
 *     p = p * (1 - lr * weight_decay)
 *     m = m + (1 - beta1) * (g - m)            (torch's lerp)
 *     v = beta2 * v + (1 - beta2) * g * g
 *     p = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
 * One pass over every tensor reads 12 bytes an element (p, g, and the two bf16 moments) and
 * writes 8, against torch's fused fp32 AdamW's 16 and 12; on the CPUs measured so far both are
 * bound by the square root and division (~2.3G elements a second on one core), not the bytes.
 */
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

namespace {

using bf16 = at::BFloat16;
using Vec = at::vec::Vectorized<float>;
constexpr int64_t BLOCK = 1024;  // elements widened into a thread's fp32 buffers at a time

struct Hyper {
    float lr, beta1, beta2, eps, decay, step_size, bc2_sqrt, inv_scale;
};

void update(float* p, const float* g, bf16* m16, bf16* v16, int64_t n, const Hyper& h) {
    float m[BLOCK], v[BLOCK];
    const Vec b1(1.0f - h.beta1), b2(h.beta2), b2c(1.0f - h.beta2), keep(1.0f - h.lr * h.decay);
    const Vec step(h.step_size), bc2(h.bc2_sqrt), eps(h.eps), inv(h.inv_scale);
    for (int64_t s = 0; s < n; s += BLOCK) {
        const int64_t len = std::min(BLOCK, n - s), full = len - len % Vec::size();
        at::vec::convert(m16 + s, m, len);
        at::vec::convert(v16 + s, v, len);
        float* ps = p + s;
        const float* gs = g + s;
        for (int64_t i = 0; i < full; i += Vec::size()) {
            const Vec gv = Vec::loadu(gs + i) * inv;
            Vec mv = Vec::loadu(m + i);
            mv = at::vec::fmadd(b1, gv - mv, mv);
            const Vec vv = at::vec::fmadd(b2c, gv * gv, b2 * Vec::loadu(v + i));
            const Vec pv = Vec::loadu(ps + i) * keep;
            (pv - step * mv / (vv.sqrt() / bc2 + eps)).store(ps + i);
            mv.store(m + i);
            vv.store(v + i);
        }
        for (int64_t i = full; i < len; i++) {
            const float gv = gs[i] * h.inv_scale;
            m[i] += (1.0f - h.beta1) * (gv - m[i]);
            v[i] = h.beta2 * v[i] + (1.0f - h.beta2) * gv * gv;
            ps[i] = ps[i] * (1.0f - h.lr * h.decay) -
                    h.step_size * m[i] / (std::sqrt(v[i]) / h.bc2_sqrt + h.eps);
        }
        at::vec::convert(m, m16 + s, len);
        at::vec::convert(v, v16 + s, len);
    }
}

// Every tensor of one parameter group, in place; steps[i]: tensor i's step count after this one
void adamw_bf16_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                 at::TensorList exp_avg_sqs, at::IntArrayRef steps, double lr, double beta1,
                 double beta2, double eps, double weight_decay,
                 const std::optional<at::Tensor>& grad_scale) {
    const size_t n = params.size();
    TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n &&
                    steps.size() == n,
                "adamw_bf16_: one gradient, two moments and a step per parameter");
    float inv_scale = 1.0f;
    if (grad_scale.has_value()) inv_scale = 1.0f / grad_scale->item<float>();
    for (size_t i = 0; i < n; i++) {
        const at::Tensor &p = params[i], &g = grads[i], &m = exp_avgs[i], &v = exp_avg_sqs[i];
        TORCH_CHECK(p.scalar_type() == at::kFloat && g.scalar_type() == at::kFloat,
                    "adamw_bf16_: fp32 parameters and gradients");
        TORCH_CHECK(m.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16,
                    "adamw_bf16_: bf16 moments");
        TORCH_CHECK(p.is_contiguous() && g.is_contiguous() && m.is_contiguous() &&
                        v.is_contiguous(),
                    "adamw_bf16_: contiguous tensors");
        TORCH_CHECK(g.numel() == p.numel() && m.numel() == p.numel() && v.numel() == p.numel(),
                    "adamw_bf16_: gradient and moments shaped like the parameter");
        const double t = static_cast<double>(steps[i]);
        const Hyper h{static_cast<float>(lr),
                      static_cast<float>(beta1),
                      static_cast<float>(beta2),
                      static_cast<float>(eps),
                      static_cast<float>(weight_decay),
                      static_cast<float>(lr / (1.0 - std::pow(beta1, t))),
                      static_cast<float>(std::sqrt(1.0 - std::pow(beta2, t))),
                      inv_scale};
        float* pp = p.data_ptr<float>();
        const float* gp = g.data_ptr<float>();
        bf16 *mp = m.data_ptr<bf16>(), *vp = v.data_ptr<bf16>();
        at::parallel_for(0, p.numel(), 16 * BLOCK, [&](int64_t a, int64_t b) {
            update(pp + a, gp + a, mp + a, vp + a, b - a, h);
        });
    }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(nanoseek, m) {
    m.def("adamw_bf16_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
          "Tensor(c!)[] exp_avg_sqs, int[] steps, float lr, float beta1, float beta2, float eps, "
          "float weight_decay, Tensor? grad_scale) -> ()");
}

TORCH_LIBRARY_IMPL(nanoseek, CPU, m) { m.impl("adamw_bf16_", adamw_bf16_); }
