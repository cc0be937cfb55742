/**
 * moerl: PPO-style RL fine-tuning of Mixture-of-Experts language models, in
 * Deno, on libtorch through a thin C shim.
 *
 * This entry point re-exports the tensor layer: a {@link Tensor} class over
 * libtorch with deterministic memory (dispose, `using`, {@link tidy},
 * {@link tidyAsync}), autograd, AdamW and CUDA queries.
 *
 * @example
 * ```ts ignore
 * import { tensor, tidy, liveTensors } from "jsr:@moerl/moerl";
 * const w = tensor([[1, 2], [3, 4]]).setRequiresGrad();
 * const loss = tidy(() => w.matmul(w).sum());
 * loss.backward();
 * console.log(w.grad?.tolist(), liveTensors());
 * ```
 * @module
 */
export { Tensor, type ValuesIndices } from "./ffi/tensor.ts";
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
} from "./ffi/create.ts";
export { cat, embedding, layerNorm, linear, stack, where } from "./ffi/functional.ts";
export { type Device, type DType, isFloating, type Shape } from "./ffi/dtype.ts";
export { dispose, keep, tidy, tidyAsync, TRACKED, type Tracked } from "./ffi/scope.ts";
export { Handle, liveTensors, setLeakCheck } from "./ffi/handle.ts";
export { libraryPath, nativeLiveCount, TorchError, torchVersion } from "./ffi/lib.ts";
export {
  cuda,
  type CudaMemoryStats,
  type CudaRuntime,
  Generator,
  isGradEnabled,
  manualSeed,
  noGrad,
  setGradEnabled,
} from "./ffi/runtime.ts";
export { type AdamState, AdamW, clipGradNorm, type ParamGroup } from "./ffi/optim.ts";
