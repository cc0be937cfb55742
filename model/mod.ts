/**
 * Loading Hugging Face MoE models' files: safetensors checkpoints (single
 * file or sharded) read one tensor at a time and written atomically,
 * `qwen3_moe` / `phimoe` configs, Hub repo ids resolved through the standard
 * HF cache, and tokenizers (HF `tokenizers`) with chat templates.
 *
 * @example
 * ```ts ignore
 * import { Checkpoint, loadModelConfig, resolveModel, Tokenizer } from "./model/mod.ts";
 * const dir = await resolveModel("org/name");          // HF_HUB_OFFLINE=1: cache only
 * const cfg = await loadModelConfig(dir);
 * using ckpt = await Checkpoint.open(dir);
 * const embed = await ckpt.load("model.embed_tokens.weight", { device: "cuda" });
 * const tok = await Tokenizer.load(dir);
 * const ids = await tok.encodeChat([{ role: "user", content: "2+2?" }], { addGenerationPrompt: true });
 * ```
 * @module
 */
export {
  FROM_SAFETENSORS,
  type LoadOptions,
  MAX_HEADER_BYTES,
  parseHeader,
  type SafetensorsDtype,
  SafetensorsError,
  SafetensorsFile,
  type SafetensorsHeader,
  tensorFromBytes,
  type TensorInfo,
  TO_SAFETENSORS,
} from "./safetensors.ts";
export { headerBytes, type HeaderEntry, layoutOrder, writeSafetensors } from "./safetensors_write.ts";
export { Checkpoint, type CheckpointTensorInfo, INDEX_FILE, readIndex, SINGLE_FILE } from "./checkpoint.ts";
export {
  type CommonConfig,
  isMoeLayer,
  loadModelConfig,
  ModelConfigError,
  type ModelType,
  type MoeConfig,
  parseConfig,
  type PhiMoeConfig,
  type Qwen3MoeConfig,
  SUPPORTED_MODEL_TYPES,
} from "./config.ts";
export {
  type HubAuth,
  hubCacheDir,
  hubRequests,
  missingFiles,
  MODEL_FILES,
  parseRepoId,
  repoCacheDir,
  type RepoRef,
  REQUIRED_FILES,
  resolveModel,
  type ResolveOptions,
} from "./hub.ts";
export {
  type AddedTokenInfo,
  type DecodeOptions,
  type EncodeOptions,
  type SpecialTokenName,
  Tokenizer,
  type TokenizerFiles,
  type TokenizerOptions,
  type TokenizerPipeline,
} from "./tokenizer.ts";
export {
  type ChatMessage,
  ChatTemplate,
  type ChatTemplateOptions,
  selectChatTemplate,
} from "./chat_template.ts";
export { leftPad, type PaddedBatch } from "./padding.ts";
export { CausalLM, loadModel, type LoadModelOptions, type ModelOptions, randomModel } from "./model.ts";
export { saveModel } from "./save.ts";
export {
  type AttentionBlock,
  Decoder,
  type DecoderDims,
  type DecoderLayer,
  type DenseMlp,
  type ForwardInput,
  type ForwardOutput,
  type LayerContext,
  type MoeMlp,
} from "./decoder.ts";
export { type FinishReason, generate, type GenerateOptions, type GenerateResult } from "./generate.ts";
export { checkSampling, sampleNext, type SamplingOptions } from "./sampling.ts";
export { KVCache, type KVStore, StaticKVView } from "./kv_cache.ts";
export {
  DECODE_MODES,
  DecodeBuffers,
  type DecodeMode,
  DecodeSession,
  type DecodeSessionOptions,
  type DecodeStats,
} from "./decode_static.ts";
export { type ExpertSlot, expertSlots, type LinearSlot, linearSlots } from "./modules.ts";
export {
  applyRope,
  attention,
  ATTENTION_IMPLS,
  type AttentionImpl,
  causalMask,
  dtypeMin,
  eagerAttention,
  LayerNorm,
  Linear,
  type LinearLayer,
  type Norm,
  resolveAttention,
  RmsNorm,
  ropeCosSin,
} from "./layers.ts";
export {
  dispatch,
  type ExpertBank,
  expertForward,
  expertForwardAll,
  type ExpertNames,
  loadBalancingLoss,
  MOE_DISPATCHES,
  type MoeDispatch,
} from "./moe.ts";
export {
  decodeDispatch,
  type DispatchMeasurement,
  measureDispatch,
  type MeasureOptions,
} from "./dispatch_choice.ts";
export { type Routing, softmaxTopK, sparsemixer, StackedExperts, swiglu } from "./moe.ts";
export { buildQwen3Moe } from "./qwen3_moe.ts";
export { buildPhiMoe } from "./phimoe.ts";
export { AdapterCasts, adapterWeight, dropout, LoraLinear, type LoraOptions, LoraState } from "./lora.ts";
export { type ExpertAdapter, type ExpertLoraForm, LoraExperts } from "./lora_experts.ts";
export {
  DEFAULT_LORA,
  expertWidth,
  isTarget,
  type LoraConfig,
  LoraModel,
  loraParamCount,
  moduleNames,
  slotShape,
} from "./lora_apply.ts";
export { VALUE_HEAD_FILE, ValueHead } from "./value_head.ts";
export {
  type Nf4Backward,
  nf4Bytes,
  Nf4Experts,
  type Nf4LayerOptions,
  Nf4Linear,
  type Nf4Role,
  type QuantEntry,
  quantizeModel,
  type QuantizeModelOptions,
  QuantReport,
  type WeightBytes,
} from "./nf4.ts";
export {
  dequantizeNf4,
  DQ_BLOCK,
  DYNAMIC_MAP,
  NF4_BLOCK,
  NF4_CODE,
  type Nf4DoubleQuant,
  type Nf4Options,
  type Nf4Parts,
  Nf4Tables,
  Nf4Weight,
  quantizeNf4,
} from "./nf4_codec.ts";
export { ADAPTER_CONFIG, ADAPTER_WEIGHTS, loadPeftAdapter, savePeftAdapter } from "./peft.ts";
export {
  CheckpointSource,
  RandomSource,
  type TensorSource,
  WeightLoader,
  type WeightOptions,
} from "./weights.ts";
export type { JsonObject } from "./json.ts";
