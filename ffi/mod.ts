/**
 * moerl's tensor layer: a {@link Tensor} class over
 * libtorch with deterministic memory (dispose, `using`, {@link tidy},
 * {@link tidyAsync}), autograd, AdamW and CUDA queries.
 *
 * @example
 * ```ts ignore
 * import { tensor, tidy, liveTensors } from "jsr:@moerl/moerl";
 * using w = tensor([[1, 2], [3, 4]]).setRequiresGrad();
 * using loss = tidy(() => w.matmul(w).sum()); // the product is freed here, the sum returned
 * loss.backward();
 * // `w.grad` is a new handle at every read: read it in a scope (or dispose it).
 * console.log(tidy(() => w.grad?.tolist()), liveTensors()); // [[7, 11], [9, 13]] 2
 * ```
 * @module
 */
export { hostReadCount, hostUploadCount, Tensor, type ValuesIndices } from "./tensor.ts";
export {
  arange,
  type CreateOptions,
  fromTypedArray,
  full,
  type NestedArray,
  ones,
  rand,
  randn,
  type RandomOptions,
  tensor,
  type TensorData,
  zeros,
} from "./create.ts";
export {
  cat,
  embedding,
  groupedMm,
  groupedMmAvailable,
  layerNorm,
  linear,
  stack,
  where,
} from "./functional.ts";
export {
  sdpa,
  sdpaAvailable,
  type SdpaBackend,
  sdpaBackend,
  type SdpaOptions,
  type SdpaSupport,
  sdpaSupport,
} from "./attention.ts";
export { nf4Linear, type Nf4LinearParts, tokenLogprobs, type TokenStats, tokenStats } from "./fused.ts";
export { type Device, type DType, ELEMENT_SIZE, isFloating, type Shape } from "./dtype.ts";
export { dispose, keep, tidy, tidyAsync, TRACKED, type Tracked } from "./scope.ts";
export { Handle, liveTensors, setLeakCheck } from "./handle.ts";
export { libraryPath, nativeLiveCount, TorchError, torchVersion } from "./lib.ts";
export {
  cuda,
  type CudaMemoryStats,
  type CudaRuntime,
  exitWithParent,
  Generator,
  isGradEnabled,
  manualSeed,
  noGrad,
  numThreads,
  setGradEnabled,
  setNumThreads,
  useAvailableCores,
} from "./runtime.ts";
export { type AdamState, AdamW, ADAMW_DEFAULTS, clipGradNorm, type ParamGroup } from "./optim.ts";
export {
  CudaGraph,
  type CudaGraphOptions,
  cudaGraphsSupported,
  type GraphPool,
  graphPool,
  inGraphFunction,
  liveGraphs,
} from "./graph.ts";
export {
  type DistBackend,
  distBackends,
  ProcessGroup,
  type ProcessGroupOptions,
  type ReduceOp,
} from "./dist.ts";
