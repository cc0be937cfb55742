/**
 * The shim's symbol table for Deno.dlopen, one entry per function in
 * ffi/shim/moerl.h. C types are noted where the FFI type hides them:
 * "pointer" is an opaque handle (mt_ctx*, mt_tensor, mt_generator),
 * "buffer" an int64_t* or handle array owned by the caller.
 * @module
 */

const T = "pointer" as const; // mt_tensor
const C = "pointer" as const; // mt_ctx*
const I64 = "i64" as const;
const I32 = "i32" as const;
const F64 = "f64" as const;
const BUF = "buffer" as const;
const G = "pointer" as const; // mt_group
const GR = "pointer" as const; // mt_graph

/** Signature of every exported shim function. */
export const symbols = {
  mt_ctx_new: { parameters: [], result: C },
  mt_ctx_free: { parameters: [C], result: "void" },
  mt_ctx_message: { parameters: [C], result: "pointer" }, // const char*
  mt_ctx_set_grad: { parameters: [C, I32], result: "void" },
  mt_ctx_grad: { parameters: [C], result: I32 },
  mt_torch_version: { parameters: [], result: "pointer" }, // const char*
  mt_abi_version: { parameters: [], result: I32 },
  mt_live_count: { parameters: [], result: I64 },

  mt_manual_seed: { parameters: [C, "u64"], result: I32 },
  mt_set_num_threads: { parameters: [C, I32], result: I32 },
  mt_get_num_threads: { parameters: [], result: I32 },
  mt_cuda_available: { parameters: [], result: I32 },
  mt_cuda_device_count: { parameters: [], result: I32 },
  mt_cuda_synchronize: { parameters: [C, I32], result: I32 },
  mt_cuda_memory_stats: { parameters: [C, I32, BUF], result: I32 }, // int64_t out[4]
  mt_cuda_reset_peak: { parameters: [C, I32], result: I32 },
  mt_generator_new: { parameters: [C, "u64", I32], result: "pointer" },
  mt_generator_free: { parameters: ["pointer"], result: "void" },

  mt_free: { parameters: [T], result: "void" },
  mt_meta: { parameters: [C, T, BUF, I32], result: I32 }, // int64_t* out
  mt_version: { parameters: [C, T], result: I64 },

  // data: const void*, shape: const int64_t*
  mt_from_data: { parameters: [C, BUF, I64, I32, BUF, I32, I32], result: T },
  mt_full: { parameters: [C, BUF, I32, F64, I32, I32], result: T },
  mt_arange: { parameters: [C, F64, F64, F64, I32, I32], result: T },
  mt_rand: { parameters: [C, BUF, I32, I32, I32, I32, "pointer"], result: T },
  mt_copy_to: { parameters: [C, T, BUF, I64], result: I32 }, // void* dst
  mt_item: { parameters: [C, T, BUF], result: I32 }, // double* out
  mt_to: { parameters: [C, T, I32, I32, I32], result: T },

  mt_reshape: { parameters: [C, T, BUF, I32], result: T },
  mt_permute: { parameters: [C, T, BUF, I32], result: T },
  mt_expand: { parameters: [C, T, BUF, I32], result: T },
  mt_transpose: { parameters: [C, T, I64, I64], result: T },
  mt_slice: { parameters: [C, T, I64, I64, I64, I64], result: T },
  mt_narrow: { parameters: [C, T, I64, I64, I64], result: T },
  mt_select: { parameters: [C, T, I64, I64], result: T },
  mt_squeeze: { parameters: [C, T, I64], result: T },
  mt_unsqueeze: { parameters: [C, T, I64], result: T },
  mt_contiguous: { parameters: [C, T], result: T },
  mt_clone: { parameters: [C, T], result: T },
  mt_cat: { parameters: [C, BUF, I32, I64], result: T }, // const mt_tensor*
  mt_stack: { parameters: [C, BUF, I32, I64], result: T }, // const mt_tensor*
  mt_tri: { parameters: [C, T, I64, I32], result: T },

  mt_index_select: { parameters: [C, T, I64, T], result: T },
  mt_gather: { parameters: [C, T, I64, T], result: T },
  mt_scatter: { parameters: [C, T, I64, T, T], result: T },
  mt_index_add: { parameters: [C, T, I64, T, T], result: T },
  mt_masked_fill: { parameters: [C, T, T, F64], result: T },
  mt_where: { parameters: [C, T, T, T], result: T },
  mt_embedding: { parameters: [C, T, T], result: T },

  mt_copy_: { parameters: [C, T, T], result: I32 },
  mt_fill_: { parameters: [C, T, F64], result: I32 },
  mt_index_copy_: { parameters: [C, T, I64, T, T], result: I32 },

  mt_unary: { parameters: [C, I32, T], result: T },
  mt_binary: { parameters: [C, I32, T, T], result: T },
  mt_binary_scalar: { parameters: [C, I32, T, F64], result: T },
  mt_clamp: { parameters: [C, T, F64, F64, I32], result: T },

  mt_reduce: { parameters: [C, I32, T, BUF, I32, I32], result: T },
  mt_max_dim: { parameters: [C, T, I64, I32, I32, BUF], result: I32 }, // mt_tensor out[2]
  mt_argmax: { parameters: [C, T, I64, I32, I32], result: T },
  mt_cumsum: { parameters: [C, T, I64], result: T },

  mt_matmul: { parameters: [C, T, T], result: T },
  mt_bmm: { parameters: [C, T, T], result: T },
  mt_linear: { parameters: [C, T, T, T], result: T },
  mt_softmax: { parameters: [C, T, I64, I32], result: T },
  mt_log_softmax: { parameters: [C, T, I64, I32], result: T },
  mt_layer_norm: { parameters: [C, T, BUF, I32, T, T, F64], result: T },

  mt_topk: { parameters: [C, T, I64, I64, I32, I32, BUF], result: I32 }, // mt_tensor out[2]
  mt_sort: { parameters: [C, T, I64, I32, BUF], result: I32 }, // mt_tensor out[2]
  mt_multinomial: { parameters: [C, T, I64, I32, "pointer"], result: T },

  mt_set_requires_grad: { parameters: [C, T, I32], result: I32 },
  mt_backward: { parameters: [C, T, T, I32], result: I32 },
  mt_grad: { parameters: [C, T, BUF], result: I32 }, // mt_tensor* out
  mt_clear_grad: { parameters: [C, T], result: I32 },
  mt_set_grad: { parameters: [C, T, T], result: I32 },
  mt_detach: { parameters: [C, T], result: T },

  mt_adamw_step: {
    parameters: [C, T, T, T, I64, F64, F64, F64, F64, F64],
    result: I32,
  },
  mt_clip_grad_norm: { parameters: [C, BUF, I32, F64, BUF], result: I32 }, // handles, double*

  mt_nf4_linear: { parameters: [C, T, BUF, BUF, I32, T, I64], result: T }, // mt_tensor parts[7], int64_t* shape
  mt_token_stats: { parameters: [C, T, T, T, T, F64, I64, I32, BUF], result: I32 }, // mt_tensor out[2]

  mt_exit_with_parent: { parameters: [C, I32, BUF, I32], result: I32 }, // watchdog.cpp; the message a C string

  // data parallel (dist.cpp); "pointer" results/params named G are mt_group, strings are C strings
  mt_dist_backends: { parameters: [], result: I32 },
  mt_dist_init: { parameters: [C, BUF, BUF, I32, I32, I32, I64, I32, BUF, BUF], result: G },
  mt_dist_free: { parameters: [G], result: "void" },
  mt_dist_allreduce: { parameters: [C, G, BUF, I32, I32], result: I32 },
  mt_dist_broadcast: { parameters: [C, G, BUF, I32, I32], result: I32 },
  mt_dist_allgather: { parameters: [C, G, T], result: T },
  mt_dist_barrier: { parameters: [C, G], result: I32 },

  mt_grouped_mm_available: { parameters: [], result: I32 },
  mt_grouped_mm: { parameters: [C, T, T, T], result: T },
  // CUDA graphs (graph.cpp); "pointer" params/results named GR are mt_graph
  mt_graph_supported: { parameters: [], result: I32 },
  mt_graph_live_count: { parameters: [], result: I64 },
  mt_graph_pool_handle: { parameters: [C, BUF], result: I32 }, // int64_t out[2]
  mt_graph_new: { parameters: [C, I32], result: GR },
  mt_graph_begin: { parameters: [C, GR, I32, BUF], result: I32 }, // const int64_t pool[2] or NULL
  mt_graph_end: { parameters: [C, GR], result: I32 },
  mt_graph_replay: { parameters: [C, GR], result: I32 },
  mt_graph_reset: { parameters: [C, GR], result: I32 },
  mt_graph_free: { parameters: [GR], result: "void" },
  // fused attention (attention.cpp)
  mt_sdpa_available: { parameters: [], result: I32 },
  mt_sdpa: { parameters: [C, T, T, T, T, F64, I32], result: T },
  mt_sdpa_backend: { parameters: [C, T, T, T, T, F64, I32, BUF], result: I32 }, // int32_t* out
} as const satisfies Deno.ForeignLibraryInterface;

/** The loaded shim: `Deno.dlopen` over {@link symbols}. */
export type ShimLibrary = Deno.DynamicLibrary<typeof symbols>;
