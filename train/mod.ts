/**
 * The training job behind `deno task train` and `deno task sft`: its config
 * (typed defaults, YAML overrides checked key by key), the update loop,
 * checkpoints with exact resume, metrics logs, the HTML report, the
 * supervised warm-up, and data-parallel launch (torchrun's contract, `--nproc`).
 * @module
 */
export {
  applyOverrides,
  configKeys,
  type DataSettings,
  type DeepReadonly,
  DEFAULTS,
  type EvalSettings,
  formatConfig,
  loadTrainConfig,
  type LoggingSettings,
  type ModelSettings,
  type OutputSettings,
  parseSets,
  parseYaml,
  promptsPerUpdate,
  runDir,
  suggestKey,
  type TrainConfig,
  TrainConfigError,
  type TrainSettings,
} from "./config.ts";
export { train, type TrainOptions, type TrainResult } from "./loop.ts";
export { distTimeoutSeconds, joinReplicas, type LaunchEnv, launchEnv, rankDevice } from "./launch.ts";
export { freePort, spawnLocal, type SpawnOptions, withoutNproc } from "./spawn.ts";
export { collectMetricsOverRanks, evalTotalsOverRanks } from "./rank_metrics.ts";
export { configuredOptimizer, configuredPolicy, loadConfiguredModel } from "./model.ts";
export {
  type CheckpointInput,
  type CheckpointPolicy,
  latestCheckpoint,
  listCheckpoints,
  loadCheckpoint,
  readTrainerState,
  type RngState,
  saveCheckpoint,
  type TrainerState,
} from "./checkpoint.ts";
export { JsonlLog, METRICS_FILE, readRecords, SAMPLES_FILE, type StepRecord } from "./metrics.ts";
export { TensorBoardLog, type TensorBoardLogOptions } from "./tensorboard.ts";
export { writeReport } from "./report.ts";
export { lrFactor, type ScheduleSettings } from "./schedule.ts";
export { nllLoss, type SftOptions, supervisedWarmup } from "./sft.ts";
