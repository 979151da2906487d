/* The cross-entropy's elementwise work on one chunk of logits, fp32 or bf16, in place: built
 * and loaded by nanoseek/kernels as the torch op nanoseek::softmax_xent_ (called by
 * nanoseek/model/loss.py, which makes the chunk's logits with one matmul).
 *
 * Per row r of logits [n, V] with target t: lse = max + log(sum(exp(l - max))); the row's loss
 * is lse - l[t]; the row becomes softmax(l) - one_hot(t), the gradient of its loss. Torch
 * does this as log_softmax in fp32, a gather, exp_ and a scatter_add, then a copy back to the
 * compute dtype: five passes over a [chunk, V] fp32 tensor and two exps an element. Here each
 * row goes through an fp32 buffer the size of one row (in L1/L2): one exp an element, one
 * read and one write of the row. Vectorized with at::vec (16 floats under AVX-512, 8 under
 * AVX2), exp and log from the Sleef that libtorch carries, as torch's own softmax uses.
 */
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;

template <typename T>
void xent_rows(T* logits, const int64_t* targets, float* loss, int64_t n, int64_t V) {
    at::parallel_for(0, n, 4, [&](int64_t r0, int64_t r1) {
        std::vector<float> buf(V);
        float* b = buf.data();
        const int64_t W = Vec::size(), full = V - V % W;
        for (int64_t r = r0; r < r1; r++) {
            T* row = logits + r * V;
            at::vec::convert(row, b, V);
            const float top = at::vec::reduce_all<float>(
                [](Vec x, Vec y) { return at::vec::maximum(x, y); }, b, V);
            const float picked = b[targets[r]];
            // exp(l - max) into the buffer, summed
            Vec acc(0.0f);
            const Vec m(top);
            for (int64_t i = 0; i < full; i += W) {
                Vec e = (Vec::loadu(b + i) - m).exp();
                e.store(b + i);
                acc = acc + e;
            }
            float sum = at::vec::vec_reduce_all<float>(
                [](Vec x, Vec y) { return x + y; }, acc);
            for (int64_t i = full; i < V; i++) {
                b[i] = std::exp(b[i] - top);
                sum += b[i];
            }
            loss[r] = top + std::log(sum) - picked;
            const Vec inv(1.0f / sum);
            for (int64_t i = 0; i < full; i += W) (Vec::loadu(b + i) * inv).store(b + i);
            for (int64_t i = full; i < V; i++) b[i] *= 1.0f / sum;
            b[targets[r]] -= 1.0f;
            at::vec::convert(b, row, V);
        }
    });
}

// logits [n, V] (fp32 or bf16, contiguous) <- softmax - one_hot(targets); -> row losses [n] fp32
at::Tensor softmax_xent_(at::Tensor& logits, const at::Tensor& targets) {
    TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(), "softmax_xent_: contiguous [n, V] logits");
    TORCH_CHECK(targets.scalar_type() == at::kLong && targets.is_contiguous() &&
                    targets.numel() == logits.size(0),
                "softmax_xent_: one int64 target a row");
    const int64_t n = logits.size(0), V = logits.size(1);
    at::Tensor t = targets.view(-1);
    TORCH_CHECK(n == 0 || (t.min().item<int64_t>() >= 0 && t.max().item<int64_t>() < V),
                "softmax_xent_: targets must lie in [0, V)");
    at::Tensor loss = at::empty({n}, logits.options().dtype(at::kFloat));
    if (logits.scalar_type() == at::kFloat)
        xent_rows<float>(logits.data_ptr<float>(), t.data_ptr<int64_t>(), loss.data_ptr<float>(), n, V);
    else if (logits.scalar_type() == at::kBFloat16)
        xent_rows<at::BFloat16>(logits.data_ptr<at::BFloat16>(), t.data_ptr<int64_t>(),
                                loss.data_ptr<float>(), n, V);
    else
        TORCH_CHECK(false, "softmax_xent_: fp32 or bf16 logits only");
    return loss;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(nanoseek, m) {
    m.def("softmax_xent_(Tensor(a!) logits, Tensor targets) -> Tensor");
}

TORCH_LIBRARY_IMPL(nanoseek, CPU, m) { m.impl("softmax_xent_", softmax_xent_); }
