/**
 * The RL side: the policy (LoRA-adapted model + value head) and, as they
 * land, rewards, advantages and the PPO step.
 * @module
 */
export {
  Policy,
  type PolicyOptions,
  type PolicyOutput,
  type SequenceBatch,
  sequenceValues,
} from "./policy.ts";
