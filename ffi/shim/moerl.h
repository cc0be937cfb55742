/*
 * moerl shim: a thin C ABI over libtorch, loaded from Deno with Deno.dlopen.
 *
 * Rules (after tch-rs's torch_api.h):
 *  - A tensor crosses the ABI as an opaque handle (a heap torch::Tensor alias).
 *    Every handle returned is new and owned by the caller, who releases it with
 *    mt_free exactly once. Inputs are borrowed, never freed by the callee.
 *  - Nothing throws across the ABI. Every fallible call takes the caller's
 *    mt_ctx first; on failure it returns NULL (handles) or -1 (status) and the
 *    context holds the message (mt_ctx_message). The context also carries the
 *    grad mode, so a call behaves the same on whatever thread runs it (Deno's
 *    nonblocking calls run on another thread; libtorch's grad mode is
 *    thread-local).
 *  - Devices are one int: -1 is the CPU, k >= 0 is CUDA device k.
 *  - Dtypes are c10::ScalarType codes (6 float32, 15 bfloat16, ...).
 *  - Lists of tensors are arrays of handles; lists of ints are int64 arrays.
 */
#ifndef MOERL_SHIM_H
#define MOERL_SHIM_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef void* mt_tensor;
typedef struct mt_ctx mt_ctx;
typedef void* mt_generator;

/* ---- context, version, live handles -------------------------------------- */
mt_ctx* mt_ctx_new(void);
void mt_ctx_free(mt_ctx* ctx);
/* The message of the last failure on this context ("" if none). */
const char* mt_ctx_message(mt_ctx* ctx);
void mt_ctx_set_grad(mt_ctx* ctx, int32_t enabled);
int32_t mt_ctx_grad(mt_ctx* ctx);
/* libtorch's version as compiled against, e.g. "1.13.0" or "2.5.1". */
const char* mt_torch_version(void);
/* Bumped whenever the ABI changes; TS checks it at load. */
int32_t mt_abi_version(void);
/* Number of tensor handles created and not yet freed. */
int64_t mt_live_count(void);

/* ---- runtime: seeding, CUDA ------------------------------------------------ */
int32_t mt_manual_seed(mt_ctx* ctx, uint64_t seed);
/* libtorch's intra-op thread count (at::set_num_threads / at::get_num_threads). */
int32_t mt_set_num_threads(mt_ctx* ctx, int32_t n);
int32_t mt_get_num_threads(void);
int32_t mt_cuda_available(void);
int32_t mt_cuda_device_count(void);
int32_t mt_cuda_synchronize(mt_ctx* ctx, int32_t device);
/* out[4] = allocated, reserved, peak allocated, peak reserved (bytes). */
int32_t mt_cuda_memory_stats(mt_ctx* ctx, int32_t device, int64_t* out);
int32_t mt_cuda_reset_peak(mt_ctx* ctx, int32_t device);
mt_generator mt_generator_new(mt_ctx* ctx, uint64_t seed, int32_t device);
void mt_generator_free(mt_generator gen);

/* ---- handles and metadata -------------------------------------------------- */
void mt_free(mt_tensor t);
/* out = [dtype, device, requires_grad, ndim, size0, size1, ...]; returns ndim
 * or -1 if cap is too small. */
int32_t mt_meta(mt_ctx* ctx, mt_tensor t, int64_t* out, int32_t cap);
/* t's version counter (torch's t._version): every in-place write bumps it; -1 on error. */
int64_t mt_version(mt_ctx* ctx, mt_tensor t);

/* ---- creation ---------------------------------------------------------------- */
mt_tensor mt_from_data(mt_ctx* ctx, const void* data, int64_t nbytes,
                       int32_t dtype, const int64_t* shape, int32_t ndim,
                       int32_t device);
mt_tensor mt_full(mt_ctx* ctx, const int64_t* shape, int32_t ndim, double value,
                  int32_t dtype, int32_t device);
mt_tensor mt_arange(mt_ctx* ctx, double start, double end, double step,
                    int32_t dtype, int32_t device);
/* kind 0: uniform [0, 1); kind 1: standard normal. gen may be NULL. */
mt_tensor mt_rand(mt_ctx* ctx, const int64_t* shape, int32_t ndim, int32_t kind,
                  int32_t dtype, int32_t device, mt_generator gen);
/* Copy a tensor's values (any device, any layout) into dst, which must hold
 * exactly numel * element size bytes. */
int32_t mt_copy_to(mt_ctx* ctx, mt_tensor t, void* dst, int64_t nbytes);
int32_t mt_item(mt_ctx* ctx, mt_tensor t, double* out);
/* dtype -1 keeps the dtype; copy != 0 forces a copy. */
mt_tensor mt_to(mt_ctx* ctx, mt_tensor t, int32_t dtype, int32_t device,
                int32_t copy);

/* ---- views and shape ops ------------------------------------------------------ */
mt_tensor mt_reshape(mt_ctx* ctx, mt_tensor t, const int64_t* shape, int32_t nd);
mt_tensor mt_permute(mt_ctx* ctx, mt_tensor t, const int64_t* dims, int32_t nd);
mt_tensor mt_expand(mt_ctx* ctx, mt_tensor t, const int64_t* shape, int32_t nd);
mt_tensor mt_transpose(mt_ctx* ctx, mt_tensor t, int64_t d0, int64_t d1);
mt_tensor mt_slice(mt_ctx* ctx, mt_tensor t, int64_t dim, int64_t start,
                   int64_t end, int64_t step);
mt_tensor mt_narrow(mt_ctx* ctx, mt_tensor t, int64_t dim, int64_t start,
                    int64_t length);
mt_tensor mt_select(mt_ctx* ctx, mt_tensor t, int64_t dim, int64_t index);
mt_tensor mt_squeeze(mt_ctx* ctx, mt_tensor t, int64_t dim);
mt_tensor mt_unsqueeze(mt_ctx* ctx, mt_tensor t, int64_t dim);
mt_tensor mt_contiguous(mt_ctx* ctx, mt_tensor t);
mt_tensor mt_clone(mt_ctx* ctx, mt_tensor t);
mt_tensor mt_cat(mt_ctx* ctx, const mt_tensor* ts, int32_t n, int64_t dim);
mt_tensor mt_stack(mt_ctx* ctx, const mt_tensor* ts, int32_t n, int64_t dim);
/* upper != 0: triu, else tril. */
mt_tensor mt_tri(mt_ctx* ctx, mt_tensor t, int64_t diagonal, int32_t upper);

/* ---- indexing ------------------------------------------------------------------ */
mt_tensor mt_index_select(mt_ctx* ctx, mt_tensor t, int64_t dim, mt_tensor index);
mt_tensor mt_gather(mt_ctx* ctx, mt_tensor t, int64_t dim, mt_tensor index);
mt_tensor mt_scatter(mt_ctx* ctx, mt_tensor t, int64_t dim, mt_tensor index,
                     mt_tensor src);
mt_tensor mt_index_add(mt_ctx* ctx, mt_tensor t, int64_t dim, mt_tensor index,
                       mt_tensor src);
mt_tensor mt_masked_fill(mt_ctx* ctx, mt_tensor t, mt_tensor mask, double value);
mt_tensor mt_where(mt_ctx* ctx, mt_tensor cond, mt_tensor a, mt_tensor b);
mt_tensor mt_embedding(mt_ctx* ctx, mt_tensor weight, mt_tensor index);

/* ---- in-place writes (for caches and optimizers; no autograd history) ---------- */
int32_t mt_copy_(mt_ctx* ctx, mt_tensor dst, mt_tensor src);
int32_t mt_fill_(mt_ctx* ctx, mt_tensor t, double value);
int32_t mt_index_copy_(mt_ctx* ctx, mt_tensor t, int64_t dim, mt_tensor index,
                       mt_tensor src);

/* ---- elementwise ------------------------------------------------------------------ */
enum mt_unary_op {
  MT_NEG = 0, MT_EXP, MT_LOG, MT_SQRT, MT_RSQRT, MT_TANH, MT_SIGMOID, MT_SILU,
  MT_RELU, MT_GELU, MT_ABS, MT_SIN, MT_COS, MT_RECIPROCAL, MT_SQUARE, MT_LOG1P,
  MT_FLOOR, MT_CEIL, MT_ROUND, MT_SIGN, MT_LOGICAL_NOT, MT_ISNAN, MT_ISFINITE,
  MT_UNARY_COUNT
};
enum mt_binary_op {
  MT_ADD = 0, MT_SUB, MT_MUL, MT_DIV, MT_POW, MT_MAXIMUM, MT_MINIMUM, MT_EQ,
  MT_NE, MT_LT, MT_LE, MT_GT, MT_GE, MT_LOGICAL_AND, MT_LOGICAL_OR, MT_RSUB,
  MT_REMAINDER, MT_BINARY_COUNT
};
mt_tensor mt_unary(mt_ctx* ctx, int32_t op, mt_tensor t);
mt_tensor mt_binary(mt_ctx* ctx, int32_t op, mt_tensor a, mt_tensor b);
/* Tensor op scalar (MT_RSUB: scalar - tensor). */
mt_tensor mt_binary_scalar(mt_ctx* ctx, int32_t op, mt_tensor a, double s);
/* flags bit 0: apply lo; bit 1: apply hi. */
mt_tensor mt_clamp(mt_ctx* ctx, mt_tensor t, double lo, double hi, int32_t flags);

/* ---- reductions --------------------------------------------------------------------- */
enum mt_reduce_op {
  MT_SUM = 0, MT_MEAN, MT_AMAX, MT_AMIN, MT_LOGSUMEXP, MT_PROD, MT_ANY, MT_ALL,
  MT_VAR, MT_STD, MT_NORM, MT_REDUCE_COUNT
};
/* nd == 0 reduces over every dim (MT_LOGSUMEXP needs dims). */
mt_tensor mt_reduce(mt_ctx* ctx, int32_t op, mt_tensor t, const int64_t* dims,
                    int32_t nd, int32_t keepdim);
/* out[0] = values, out[1] = indices; is_min selects min. */
int32_t mt_max_dim(mt_ctx* ctx, mt_tensor t, int64_t dim, int32_t keepdim,
                   int32_t is_min, mt_tensor* out);
mt_tensor mt_argmax(mt_ctx* ctx, mt_tensor t, int64_t dim, int32_t keepdim,
                    int32_t is_min);
mt_tensor mt_cumsum(mt_ctx* ctx, mt_tensor t, int64_t dim);

/* ---- linear algebra and NN ----------------------------------------------------------- */
mt_tensor mt_matmul(mt_ctx* ctx, mt_tensor a, mt_tensor b);
mt_tensor mt_bmm(mt_ctx* ctx, mt_tensor a, mt_tensor b);
/* y = x W^T + b; bias may be NULL. */
mt_tensor mt_linear(mt_ctx* ctx, mt_tensor x, mt_tensor w, mt_tensor bias);
/* dtype -1: compute in the input dtype. */
mt_tensor mt_softmax(mt_ctx* ctx, mt_tensor t, int64_t dim, int32_t dtype);
mt_tensor mt_log_softmax(mt_ctx* ctx, mt_tensor t, int64_t dim, int32_t dtype);
/* weight and bias may be NULL. */
mt_tensor mt_layer_norm(mt_ctx* ctx, mt_tensor x, const int64_t* shape,
                        int32_t nd, mt_tensor weight, mt_tensor bias, double eps);

/* ---- selection and sampling ----------------------------------------------------------- */
int32_t mt_topk(mt_ctx* ctx, mt_tensor t, int64_t k, int64_t dim, int32_t largest,
                int32_t sorted, mt_tensor* out);
int32_t mt_sort(mt_ctx* ctx, mt_tensor t, int64_t dim, int32_t descending,
                mt_tensor* out);
mt_tensor mt_multinomial(mt_ctx* ctx, mt_tensor probs, int64_t n,
                         int32_t replacement, mt_generator gen);

/* ---- autograd --------------------------------------------------------------------------- */
int32_t mt_set_requires_grad(mt_ctx* ctx, mt_tensor t, int32_t flag);
/* grad may be NULL (scalar outputs). */
int32_t mt_backward(mt_ctx* ctx, mt_tensor t, mt_tensor grad, int32_t retain_graph);
/* *out = the gradient, or NULL when there is none. */
int32_t mt_grad(mt_ctx* ctx, mt_tensor t, mt_tensor* out);
/* Drops the gradient (PyTorch's zero_grad(set_to_none=True)). */
int32_t mt_clear_grad(mt_ctx* ctx, mt_tensor t);
/* Sets t's gradient to a copy of grad (same shape, dtype and device as t). */
int32_t mt_set_grad(mt_ctx* ctx, mt_tensor t, mt_tensor grad);
mt_tensor mt_detach(mt_ctx* ctx, mt_tensor t);

/* ---- optimizer kernels (the optimizer logic lives in TS) -------------------------------- */
/* One AdamW update of param from its .grad, in place, PyTorch's formula:
 * p -= lr*wd*p; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
 * p -= lr/(1-b1^t) * m / (sqrt(v/(1-b2^t)) + eps). A param without grad is skipped. */
int32_t mt_adamw_step(mt_ctx* ctx, mt_tensor param, mt_tensor exp_avg,
                      mt_tensor exp_avg_sq, int64_t step, double lr, double beta1,
                      double beta2, double eps, double weight_decay);
/* Scales the grads so their global L2 norm is at most max_norm; *total_norm
 * gets the norm before clipping. */
int32_t mt_clip_grad_norm(mt_ctx* ctx, const mt_tensor* params, int32_t n,
                          double max_norm, double* total_norm);

/* ---- fused ops: custom autograd functions that recompute in backward ------------ */
/* y = x W^T + b for a 4-bit NF4 weight W [out, in], or x.bmm(W^T) for stacked
 * W [E, out, in] and x [E, N, in]. parts[7], borrowed: packed uint8 [r, ceil(n/2)],
 * absmax float32 [r, ceil(n/64)] or NULL, then the double-quantised codes,
 * absmax and offset (NULL when absmax is given), the pair table float32
 * [256, 2] and the dynamic map float32 [256, 1] (model/nf4_codec.ts's layout).
 * W is decoded in x's dtype, in pieces of at most chunk values (a multiple of
 * 64), in forward and again in backward: autograd keeps only the 4-bit parts.
 * W gets no gradient; bias may be NULL (2-D W only). */
mt_tensor mt_nf4_linear(mt_ctx* ctx, mt_tensor x, const mt_tensor* parts,
                        const int64_t* shape, int32_t ndim, mt_tensor bias, int64_t chunk);
/* For states x [N, H] and an LM head w [V, H] (bias [V] or NULL): out[0] =
 * log softmax((x w^T + b) / temperature) at targets (int64 [N]), out[1] = the
 * entropy (NULL when entropy is 0: not computed), float32 [N] each, computed
 * chunk rows at a time. Backward recomputes each chunk's logits, so no [N, V]
 * tensor outlives a chunk. */
int32_t mt_token_stats(mt_ctx* ctx, mt_tensor x, mt_tensor w, mt_tensor bias,
                       mt_tensor targets, double temperature, int64_t chunk,
                       int32_t entropy, mt_tensor* out);

/* ---- data parallel: c10d process groups (dist.cpp) --------------------------------------
 * A group is an opaque handle over PyTorch's c10d: a TCPStore rendezvous and a
 * Gloo (CPU tensors) or NCCL (CUDA tensors) process group. Every collective
 * waits for its result up to the group's timeout, and a peer that died or
 * timed out is a failure with a message, never a hang. */
typedef void* mt_group;
/* Backends this build has: bit 0 Gloo, bit 1 NCCL. */
int32_t mt_dist_backends(void);
/* Joins a group of world ranks. backend: "gloo" or "nccl". server: 1 hosts the
 * TCPStore at host:port (rank 0 by convention), 0 connects to one (e.g.
 * torchrun's agent store). prefix namespaces the group's keys in the store.
 * device_host: the address Gloo binds to ("" lets Gloo pick from the hostname,
 * or $GLOO_SOCKET_IFNAME's interface). */
mt_group mt_dist_init(mt_ctx* ctx, const char* backend, const char* host, int32_t port,
                      int32_t world, int32_t rank, int64_t timeout_ms, int32_t server,
                      const char* prefix, const char* device_host);
void mt_dist_free(mt_group g);
/* op: 0 sum, 1 average, 2 max, 3 min; each tensor reduced on its own, in place. */
int32_t mt_dist_allreduce(mt_ctx* ctx, mt_group g, const mt_tensor* ts, int32_t n, int32_t op);
/* Every tensor takes root's values, in place. */
int32_t mt_dist_broadcast(mt_ctx* ctx, mt_group g, const mt_tensor* ts, int32_t n, int32_t root);
/* [world, ...shape]: every rank's t, in rank order (t has the same shape everywhere). */
mt_tensor mt_dist_allgather(mt_ctx* ctx, mt_group g, mt_tensor t);
int32_t mt_dist_barrier(mt_ctx* ctx, mt_group g);

/* ---- process (watchdog.cpp) ---------------------------------------------------------------
 * Starts a thread that, once this process's parent is no longer the process
 * parent (it died: the kernel re-parents orphans), writes message to stderr
 * and ends the process with status 1. It checks every interval_ms, even while
 * the calling thread blocks in another call. */
int32_t mt_exit_with_parent(mt_ctx* ctx, int32_t parent, const char* message, int32_t interval_ms);

/* ---- grouped GEMM (grouped.cpp) ----------------------------------------------------------
 * out[rows of group g] = a[rows of group g] @ b[g]: a [N, K] with its rows
 * sorted by group, b [G, K, M], offs int32 [G] the cumulative row ends. Only
 * where libtorch has at::_grouped_mm (2.8 and later); autograd flows. */
int32_t mt_grouped_mm_available(void);
mt_tensor mt_grouped_mm(mt_ctx* ctx, mt_tensor a, mt_tensor b, mt_tensor offs);
/* ---- CUDA graphs (graph.cpp) -------------------------------------------------------------
 * A graph is an opaque handle over at::cuda::CUDAGraph. The caller issues the
 * ops to record between mt_graph_begin(capture = 1) and mt_graph_end, on
 * tensors that outlive the graph (static inputs and outputs); temporaries
 * allocated in between come from the capture's memory pool. mt_graph_replay
 * then reruns the recording on the current stream with one call. Recorded
 * ops must not synchronise with the host (no item, no copy to the CPU, no
 * tensor made from host data) or draw random numbers from a generator other
 * than the device's default one. A shim built without CUDA headers fails
 * every call below that needs a graph with "CUDA graphs need a CUDA build". */
typedef void* mt_graph;
/* 1 when the shim was compiled with CUDA graph support, else 0. */
int32_t mt_graph_supported(void);
/* Graph handles created and not yet freed. */
int64_t mt_graph_live_count(void);
/* A new memory pool id, out[2]: graphs captured with the same id share one
 * pool (safe when they are replayed one at a time, in any order, and keep no
 * output in the pool). */
int32_t mt_graph_pool_handle(mt_ctx* ctx, int64_t* out);
/* A graph for CUDA device `device`, with a side stream of its own. Free with mt_graph_free. */
mt_graph mt_graph_new(mt_ctx* ctx, int32_t device);
/* Waits for the current stream, then makes the graph's side stream current.
 * capture 0: the ops that follow just run there (warm-up); capture 1: they are
 * also recorded, allocating from pool (int64_t[2] from mt_graph_pool_handle,
 * or NULL for a pool of the graph's own). */
int32_t mt_graph_begin(mt_ctx* ctx, mt_graph g, int32_t capture, const int64_t* pool);
/* Ends mt_graph_begin: finishes and instantiates a capture, waits for the side
 * stream and restores the caller's stream, also when the capture failed (the
 * graph is then reset and the error says why). */
int32_t mt_graph_end(mt_ctx* ctx, mt_graph g);
/* Runs the captured work on the current stream. */
int32_t mt_graph_replay(mt_ctx* ctx, mt_graph g);
/* Drops the recording (and the graph's hold on its pool); the graph can capture again. */
int32_t mt_graph_reset(mt_ctx* ctx, mt_graph g);
/* Ends a capture left open, resets and frees. NULL does nothing. */
void mt_graph_free(mt_graph g);

/* ---- fused attention (attention.cpp) -------------------------------------------------------
 * libtorch's scaled_dot_product_attention: it picks the flash, memory-efficient,
 * cuDNN or math back end for the inputs. Older libtorch builds compile without
 * it and say so (mt_sdpa_available 0, mt_sdpa fails). */
/* Bit 0: mt_sdpa works in this build (libtorch >= 2.1); bit 1: key/value heads
 * are shared through enable_gqa (>= 2.5) rather than repeated. */
int32_t mt_sdpa_available(void);
/* softmax(q k^T * scale + mask) v for q [B, nH, S, d], k and v [B, nKV, T, d]
 * (nKV divides nH: query head h reads key/value head h / (nH / nKV)); returns
 * [B, nH, S, d]. mask may be NULL, additive (q's dtype) or bool (true: attend),
 * broadcastable to [B, nH, S, T]; a bool mask becomes an additive one with the
 * dtype's most negative finite value, so a row that sees no key averages every
 * value, as an additive mask, instead of NaN. is_causal != 0 adds a causal
 * mask aligned at the top left (meant for S == T, without mask). No dropout. */
mt_tensor mt_sdpa(mt_ctx* ctx, mt_tensor q, mt_tensor k, mt_tensor v, mt_tensor mask, double scale,
                  int32_t is_causal);
/* *out = the back end libtorch would pick for these arguments: 0 math, 1 flash,
 * 2 memory-efficient, 3 cuDNN, 4 overrideable, -1 none. */
int32_t mt_sdpa_backend(mt_ctx* ctx, mt_tensor q, mt_tensor k, mt_tensor v, mt_tensor mask, double scale,
                        int32_t is_causal, int32_t* out);

#ifdef __cplusplus
}
#endif
#endif
