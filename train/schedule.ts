/**
 * The learning-rate schedule: linear warm-up, then constant or cosine decay.
 * The same factor scales both optimiser groups (adapters, value head).
 * @module
 */
import type { TrainSettings } from "./config.ts";

/** The settings the schedule reads. */
export type ScheduleSettings = Pick<TrainSettings, "updates" | "warmupUpdates" | "schedule" | "minLrRatio">;

/**
 * The factor on the peak learning rate for update u (0-based): (u + 1) /
 * warmupUpdates during warm-up, so the first update already moves; then 1
 * ("constant"), or a cosine from 1 down to minLrRatio at the last update.
 */
export function lrFactor(update: number, s: ScheduleSettings): number {
  if (update < s.warmupUpdates) return (update + 1) / s.warmupUpdates;
  if (s.schedule === "constant") return 1;
  const span = s.updates - s.warmupUpdates - 1;
  const progress = span <= 0 ? 1 : Math.min(1, (update - s.warmupUpdates) / span);
  return s.minLrRatio + (1 - s.minLrRatio) * 0.5 * (1 + Math.cos(Math.PI * progress));
}
