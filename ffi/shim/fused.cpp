// Custom autograd functions (see fused.h). Both trade compute for memory the
// way bitsandbytes' 4-bit matmul and "fused linear cross-entropy" kernels do:
// the large intermediate (a dequantised weight, a [tokens, vocab] logits
// matrix) is made again in backward instead of being saved by autograd.
#include "fused.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

namespace moerl {

using torch::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

namespace {

constexpr int64_t kBlock = 64;     // NF4 block
constexpr int64_t kDqBlock = 256;  // block of the double-quantised absmax

void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument(what);
}

std::string dims(at::IntArrayRef s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); i++) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

// v [r, n] float32 times scales s [r, ceil(n/bs)], one per block of bs values
// (the last may be partial): model/nf4_codec.ts's scaleBlocks, op for op, so
// the products round identically.
Tensor scale_blocks(const Tensor& v, const Tensor& s, int64_t bs) {
  int64_t r = v.size(0), n = v.size(1), nf = n / bs, full = nf * bs;
  Tensor head = v.narrow(1, 0, full).reshape({r, nf, bs}).mul(s.narrow(1, 0, nf).unsqueeze(-1)).reshape({r, full});
  if (full == n) return head;
  Tensor tail = v.narrow(1, full, n - full).mul(s.narrow(1, nf, 1));
  return full == 0 ? tail : torch::cat({head, tail}, 1);
}

// The float32 absmax [r, nb], decoding double quantisation as Nf4Weight.blockAbsmax does.
Tensor block_absmax(const Nf4Parts& w) {
  if (w.absmax.defined()) return w.absmax;
  int64_t r = w.dq_codes.size(0), nb = w.dq_codes.size(1);
  Tensor vals = w.dynamic.index_select(0, w.dq_codes.reshape({-1}).to(torch::kInt)).reshape({r, nb});
  return scale_blocks(vals, w.dq_absmax, kDqBlock).add(w.dq_offset);
}

// Blocks [b0, b0 + cnt) of matrices [i0, i0 + k) as float32 [k, len]: code × absmax.
Tensor decode(const Nf4Parts& w, const Tensor& absmax, int64_t n, int64_t i0, int64_t k, int64_t b0,
              int64_t cnt) {
  int64_t len = std::min(cnt * kBlock, n - b0 * kBlock), bytes = (len + 1) / 2;
  Tensor idx = w.packed.narrow(0, i0, k).narrow(1, b0 * kBlock / 2, bytes).to(torch::kInt).reshape({-1});
  Tensor v = w.pairs.index_select(0, idx).reshape({k, 2 * bytes});
  if (2 * bytes != len) v = v.narrow(1, 0, len);
  return scale_blocks(v, absmax.narrow(0, i0, k).narrow(1, b0, cnt), kBlock);
}

// The whole weight in dtype, in pieces of at most w.chunk values (Nf4Weight.dequantize's plan).
Tensor dequantize(const Nf4Parts& w, torch::ScalarType dtype) {
  int64_t r = w.packed.size(0), numel = 1;
  for (int64_t s : w.shape) numel *= s;
  int64_t n = r == 0 ? 0 : numel / r;
  Tensor absmax = block_absmax(w);
  int64_t nb = absmax.size(1);
  if (r * n <= w.chunk) return decode(w, absmax, n, 0, r, 0, nb).to(dtype).reshape(w.shape);
  Tensor out = torch::empty({r, n}, w.packed.options().dtype(dtype));
  if (n <= w.chunk) {
    int64_t g = w.chunk / n;
    for (int64_t i = 0; i < r; i += g) {
      int64_t k = std::min(g, r - i);
      out.narrow(0, i, k).copy_(decode(w, absmax, n, i, k, 0, nb));
    }
  } else {
    int64_t step = w.chunk / kBlock;
    for (int64_t i = 0; i < r; i++) {
      for (int64_t b0 = 0; b0 < nb; b0 += step) {
        Tensor part = decode(w, absmax, n, i, 1, b0, std::min(step, nb - b0));
        out.narrow(0, i, 1).narrow(1, b0 * kBlock, part.size(1)).copy_(part);
      }
    }
  }
  return out.reshape(w.shape);
}

struct Nf4LinearFn : public torch::autograd::Function<Nf4LinearFn> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const c10::optional<Tensor>& bias,
                        const Nf4Parts& w) {
    // The parts belong to the model and are alive anyway: saving them costs nothing.
    ctx->save_for_backward({w.packed, w.absmax, w.dq_codes, w.dq_absmax, w.dq_offset, w.pairs, w.dynamic});
    ctx->saved_data["shape"] = w.shape;
    ctx->saved_data["chunk"] = w.chunk;
    ctx->saved_data["bias_grad"] = bias.has_value() && bias->requires_grad();
    Tensor weight = dequantize(w, x.scalar_type());
    if (w.shape.size() == 3) return x.bmm(weight.transpose(1, 2));
    return torch::linear(x, weight, bias);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto s = ctx->get_saved_variables();
    Nf4Parts w{s[0], s[1], s[2], s[3], s[4], s[5], s[6], ctx->saved_data["shape"].toIntVector(),
               ctx->saved_data["chunk"].toInt()};
    const Tensor& g = grads[0];
    Tensor gx, gb;
    if (ctx->needs_input_grad(0)) {
      Tensor weight = dequantize(w, g.scalar_type());  // the frozen base gets no gradient
      gx = w.shape.size() == 3 ? g.bmm(weight) : g.matmul(weight);
    }
    if (ctx->saved_data["bias_grad"].toBool()) gb = g.reshape({-1, g.size(-1)}).sum(0);
    return {gx, gb, Tensor()};
  }
};

// Float32 logits of rows x [c, H], divided by the temperature: rl/policy.ts's op order.
Tensor logits(const Tensor& x, const Tensor& w, const c10::optional<Tensor>& bias, double temperature) {
  Tensor z = torch::linear(x, w, bias).to(torch::kFloat);
  return temperature == 1.0 ? z : z.div(temperature);
}

struct TokenStatsFn : public torch::autograd::Function<TokenStatsFn> {
  // Outputs: the targets' log-probs, then (with_entropy) the entropies. Without them, each chunk skips the
  // [c, V] passes that only the entropy needs (log-softmax, exp, product), and backward takes its gradient
  // as zero.
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& w,
                               const c10::optional<Tensor>& bias, const Tensor& targets, double temperature,
                               int64_t chunk, bool with_entropy) {
    int64_t n = x.size(0);
    auto f32 = x.options().dtype(torch::kFloat);
    Tensor picked = torch::empty({n}, f32), lse = torch::empty({n}, f32);
    Tensor entropy = with_entropy ? torch::empty({n}, f32) : Tensor();
    for (int64_t s = 0; s < n; s += chunk) {
      int64_t c = std::min(chunk, n - s);
      Tensor z = logits(x.narrow(0, s, c), w, bias, temperature);
      Tensor l = z.logsumexp(-1, true), t = targets.narrow(0, s, c).unsqueeze(-1);
      if (with_entropy) {
        Tensor logp = z.sub_(l);  // in place: z is this chunk's own tensor
        picked.narrow(0, s, c).copy_(logp.gather(-1, t).squeeze(-1));
        entropy.narrow(0, s, c).copy_(logp.exp().mul_(logp).sum(-1).neg());
      } else {  // the same subtraction, of the targets' logits alone: the same bits, no [c, V] pass
        picked.narrow(0, s, c).copy_(z.gather(-1, t).sub_(l).squeeze(-1));
      }
      lse.narrow(0, s, c).copy_(l.squeeze(-1));
    }
    // x and w are kept alive by the model anyway; lse and entropy are [N]. No logits are kept.
    ctx->save_for_backward({x, w, bias.value_or(Tensor()), targets, lse,
                            with_entropy ? entropy.clone() : Tensor()});
    ctx->saved_data["temperature"] = temperature;
    ctx->saved_data["chunk"] = chunk;
    ctx->saved_data["bias_grad"] = bias.has_value() && bias->requires_grad();
    if (!with_entropy) return {picked};
    return {picked, entropy};
  }

  // With p = softmax(z), logp = log p, H = -Σ p logp, for each row:
  //   ∂ logp[t] / ∂z = onehot(t) − p,   ∂H / ∂z = −p ⊙ (logp + H),
  // so g_z = g_lp·onehot(t) − p ⊙ (g_lp + g_H·(logp + H)), then ÷ temperature.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto s = ctx->get_saved_variables();
    const Tensor &x = s[0], &w = s[1], &targets = s[3], &lse = s[4], &entropy = s[5];
    c10::optional<Tensor> bias = s[2].defined() ? c10::optional<Tensor>(s[2]) : c10::nullopt;
    double temperature = ctx->saved_data["temperature"].toDouble();
    int64_t chunk = ctx->saved_data["chunk"].toInt(), n = x.size(0);
    bool want_x = ctx->needs_input_grad(0), want_w = ctx->needs_input_grad(1);
    bool want_b = ctx->saved_data["bias_grad"].toBool();
    Tensor gx = want_x ? torch::empty_like(x) : Tensor();
    Tensor gw = want_w ? torch::zeros(w.sizes(), w.options().dtype(torch::kFloat)) : Tensor();
    Tensor gb = want_b ? torch::zeros({w.size(0)}, w.options().dtype(torch::kFloat)) : Tensor();
    for (int64_t s0 = 0; s0 < n; s0 += chunk) {
      int64_t c = std::min(chunk, n - s0);
      Tensor xc = x.narrow(0, s0, c), g_lp = grads[0].narrow(0, s0, c).unsqueeze(-1);
      Tensor logp = logits(xc, w, bias, temperature).sub_(lse.narrow(0, s0, c).unsqueeze(-1));
      Tensor p = logp.exp();
      // No entropy output, or no gradient reached it: g_H = 0 and the inner term is g_lp alone.
      Tensor inner = entropy.defined() && grads.size() > 1 && grads[1].defined()
                         ? logp.add_(entropy.narrow(0, s0, c).unsqueeze(-1))
                               .mul_(grads[1].narrow(0, s0, c).unsqueeze(-1))
                               .add_(g_lp)
                         : g_lp;
      Tensor gz = p.mul_(inner).neg_().scatter_add_(1, targets.narrow(0, s0, c).unsqueeze(-1), g_lp);
      if (temperature != 1.0) gz.div_(temperature);
      Tensor gl = gz.to(x.scalar_type());  // back through the float32 cast
      if (want_x) gx.narrow(0, s0, c).copy_(gl.mm(w));
      if (want_w) gw.add_(gl.t().mm(xc).to(torch::kFloat));
      if (want_b) gb.add_(gz.sum(0));
    }
    return {gx, want_w ? gw.to(w.scalar_type()) : Tensor(), want_b ? gb.to(s[2].scalar_type()) : Tensor(),
            Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

}  // namespace

void check_nf4(const Tensor& x, const Nf4Parts& w) {
  require(w.shape.size() == 2 || w.shape.size() == 3, "nf4 weight must be [out, in] or [E, out, in], got " +
                                                          dims(w.shape));
  require(w.packed.defined() && w.packed.dim() == 2 && w.packed.scalar_type() == torch::kByte,
          "nf4 packed codes must be a uint8 [rows, bytes] tensor");
  int64_t r = w.packed.size(0), numel = 1;
  for (int64_t s : w.shape) numel *= s;
  require(r == (w.shape.size() == 3 ? w.shape[0] : 1),
          "nf4 packed codes have " + std::to_string(r) + " rows for a weight of shape " + dims(w.shape));
  int64_t n = r == 0 ? 0 : numel / r, nb = (n + kBlock - 1) / kBlock;
  require(w.packed.size(1) == (n + 1) / 2, "nf4 packed codes are " + dims(w.packed.sizes()) + ", expected [" +
                                               std::to_string(r) + ", " + std::to_string((n + 1) / 2) + "]");
  if (w.absmax.defined()) {
    require(w.absmax.sizes() == at::IntArrayRef({r, nb}), "nf4 absmax must be [" + std::to_string(r) + ", " +
                                                               std::to_string(nb) + "]");
  } else {
    require(w.dq_codes.defined() && w.dq_absmax.defined() && w.dq_offset.defined(),
            "nf4 weight needs an absmax or all three double-quantisation parts");
    require(w.dq_codes.sizes() == at::IntArrayRef({r, nb}), "nf4 double-quantised codes must be [" +
                                                                 std::to_string(r) + ", " + std::to_string(nb) + "]");
  }
  require(w.pairs.defined() && w.dynamic.defined(), "nf4 code tables missing");
  require(w.pairs.dim() == 2 && w.pairs.size(0) == 256 && w.pairs.size(1) == 2,
          "nf4 byte table must be [256, 2], got " + dims(w.pairs.sizes()));
  require(w.dynamic.numel() == 256, "nf4 dynamic map must hold 256 values, got " + dims(w.dynamic.sizes()));
  if (!w.absmax.defined()) {
    int64_t nd = (nb + kDqBlock - 1) / kDqBlock;
    require(w.dq_absmax.sizes() == at::IntArrayRef({r, nd}), "nf4 double-quantised absmax must be [" +
                                                                  std::to_string(r) + ", " + std::to_string(nd) +
                                                                  "], got " + dims(w.dq_absmax.sizes()));
    require(w.dq_offset.numel() == 1 || w.dq_offset.sizes() == at::IntArrayRef({r, 1}),
            "nf4 double-quantisation offset must be [" + std::to_string(r) + ", 1], got " +
                dims(w.dq_offset.sizes()));
  }
  require(w.chunk >= kBlock && w.chunk % kBlock == 0, "nf4 chunk must be a positive multiple of 64, got " +
                                                          std::to_string(w.chunk));
  require(x.is_floating_point(), "nf4 linear input must be a float tensor");
  require(x.dim() >= 1 && x.size(-1) == w.shape.back(), "nf4 linear input " + dims(x.sizes()) +
                                                            " does not fit a weight of shape " + dims(w.shape));
  if (w.shape.size() == 3)
    require(x.dim() == 3 && x.size(0) == w.shape[0],
            "a stacked nf4 weight " + dims(w.shape) + " needs input [E, N, in], got " + dims(x.sizes()));
}

Tensor nf4_linear(const Tensor& x, const Nf4Parts& w, const c10::optional<Tensor>& bias) {
  check_nf4(x, w);
  // An expert bank's stacked projections have no bias (bmm would drop it, yet give it a gradient).
  require(!bias.has_value() || w.shape.size() == 2, "a stacked nf4 weight " + dims(w.shape) + " takes no bias");
  if (bias.has_value())
    require(bias->dim() == 1 && bias->size(0) == w.shape[0], "nf4 linear bias must be [" +
                                                                  std::to_string(w.shape[0]) + "], got " +
                                                                  dims(bias->sizes()));
  return Nf4LinearFn::apply(x, bias, w);
}

std::vector<Tensor> token_stats(const Tensor& x, const Tensor& w, const c10::optional<Tensor>& bias,
                                const Tensor& targets, double temperature, int64_t chunk, bool with_entropy) {
  require(x.dim() == 2 && x.is_floating_point(), "token_stats: states must be float [N, H], got " +
                                                     dims(x.sizes()));
  require(w.dim() == 2 && w.size(1) == x.size(1), "token_stats: head weight " + dims(w.sizes()) +
                                                      " does not fit states " + dims(x.sizes()));
  require(targets.dim() == 1 && targets.size(0) == x.size(0) && targets.scalar_type() == torch::kLong,
          "token_stats: targets must be int64 [" + std::to_string(x.size(0)) + "]");
  require(temperature > 0 && std::isfinite(temperature), "token_stats: temperature must be > 0");
  require(chunk >= 1, "token_stats: chunk must be >= 1 token, got " + std::to_string(chunk));
  return TokenStatsFn::apply(x, w, bias, targets, temperature, chunk, with_entropy);
}

}  // namespace moerl
