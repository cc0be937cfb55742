/**
 * `deno task merge`: a trained adapter merged into its base model's weights and saved as a new model folder
 * (safetensors, config.json, tokenizer files) in Hugging Face's layout, which moerl and transformers load:
 *
 * ```sh
 * deno task merge --adapter runs/<name>[/checkpoint-N] --out DIR [--config F] [--set key=value ...]
 * ```
 *
 * The base comes from the config: --config, else the run's own config.yaml for a checkpoint's adapter (as
 * `deno task evaluate` chooses), else the defaults with the adapter's own base (adapter_config.json's
 * base_model_name_or_path, as PEFT records it) as model.id. It loads on the CPU in `model.dtype`, at full precision
 * even when the run trained over a 4-bit base: the merge adds the adapters to the unquantised weights, as
 * PEFT's `merge_and_unload` does on a reloaded base. Relative paths on the command line are taken from the
 * folder the command was started in. Exit status: 0, 1 on an error while running, 2 for bad arguments or a
 * bad config.
 * @module
 */
import { ADAPTER_CONFIG, loadPeftAdapter, readAdapterConfig } from "../model/peft.ts";
import { modelWeightsIn, saveModel } from "../model/save.ts";
import { failureText, fromStartDir, parseCommandLine } from "../train/cli.ts";
import { optionSettings, parseSets, setHint, type TrainConfig, TrainConfigError } from "../train/config.ts";
import { loadConfiguredModel } from "../train/model.ts";
import { adapterConfig, resolveAdapter } from "./adapter.ts";

const USAGE =
  `usage: deno task merge --adapter DIR --out DIR [--config configs/x.yaml] [--set key.path=value ...]

  --adapter DIR      a PEFT adapter folder, a checkpoint folder, or a run folder (its newest checkpoint)
  -o, --out DIR      a new folder for the merged model
  -c, --config F     the training config whose model.id and model.dtype give the base (without it: the
                     config.yaml of the run a checkpoint adapter is from, else the built-in defaults with
                     the adapter's base_model_name_or_path as model.id)
  --set key=value    a config override (repeatable), e.g. --set model.dtype=bfloat16
  -h, --help         this text

The base loads on the CPU at full precision (model.quantize4bit is ignored). Exit status: 0 done, 1 an error
while running, 2 a bad argument or config.`;

/** The model settings merge sets itself: the base loads on the CPU at full precision. */
const OVERRIDDEN = ["model.device", "model.quantize4bit", "model.doubleQuant"];

/**
 * The hint for an unknown option: merge reads only the config's model section, so only model keys are offered,
 * and not those it overrides.
 */
function modelOptionHint(name: string): string | null {
  const keys = optionSettings(name);
  if (keys.some((k) => OVERRIDDEN.includes(k))) {
    return `the base loads on the CPU at full precision: merge has no use for ${OVERRIDDEN.join(", ")}`;
  }
  if (keys.length === 0 || keys.some((k) => k.startsWith("model."))) return setHint(keys);
  return "merge reads only the model.* settings of a config";
}

/** The command line: returns the exit status. */
export async function main(args: string[]): Promise<number> {
  const parsed = parseCommandLine(
    "merge",
    USAGE,
    args,
    {
      adapter: { type: "string" },
      out: { type: "string", short: "o" },
      config: { type: "string", short: "c" },
      set: { type: "string", multiple: true },
    },
    false,
    modelOptionHint,
  );
  if (typeof parsed === "number") return parsed;
  const v = parsed.values;
  if (v.adapter === undefined || v.out === undefined) {
    console.error(`merge: --adapter and --out are required\n${USAGE}`);
    return 2;
  }
  const at = fromStartDir;
  const out = at(v.out)!;
  let adapter: string;
  try {
    adapter = await resolveAdapter(at(v.adapter)!);
    const held = await modelWeightsIn(out); // saveModel checks too, but only after the model has loaded
    if (held) throw new Error(`--out ${out} already holds a model (${held}): give a new folder`);
  } catch (e) {
    console.error(`merge: ${(e as Error).message}`);
    return 2;
  }
  let cfg: TrainConfig, from: string;
  try {
    let runConfig: string | null;
    ({ cfg, from, runConfig } = await adapterConfig(at(v.config), adapter, v.set ?? []));
    const setId = (parseSets(v.set ?? []).model as { id?: unknown } | undefined)?.id !== undefined; // as parsed
    // A standalone PEFT adapter (one trained elsewhere) names its base; --config or --set model.id overrules it.
    const named = (await readAdapterConfig(adapter)).baseModel;
    if (!v.config && !runConfig && named && !setId) {
      cfg = { ...cfg, model: { ...cfg.model, id: named } };
      from = `${ADAPTER_CONFIG}'s base_model_name_or_path`;
    }
  } catch (e) {
    console.error(`merge: ${(e as Error).message}`);
    return e instanceof TrainConfigError ? 2 : 1;
  }
  try {
    console.log(`base ${cfg.model.id} (${cfg.model.dtype}, from ${from}); adapter ${adapter}`);
    if (cfg.model.quantize4bit) {
      console.log("the run trained over a 4-bit base: merging into the full-precision weights");
    }
    using model = await loadConfiguredModel({ ...cfg.model, device: "cpu", quantize4bit: false });
    using lora = await loadPeftAdapter(adapter, model);
    lora.merge();
    await saveModel(model, out);
    console.log(`saved ${out}: ${lora.trainableCount().toLocaleString("en-US")} adapter parameters merged`);
    return 0;
  } catch (e) {
    console.error(`merge: ${failureText(e)}`);
    return 1;
  }
}

if (import.meta.main) Deno.exit(await main(Deno.args));
