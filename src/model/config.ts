/**
 * config.json of a Hugging Face Llama-family checkpoint (Llama and Mistral: the same math), read
 * into the sizes the runner needs, and the tensor shapes those sizes imply.
 *
 * @module
 */
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { ModelError } from "./safetensors.ts";

/** The sizes of a Llama-family model, from its config.json. */
export interface LlamaConfig {
  /** `architectures[0]`: LlamaForCausalLM or MistralForCausalLM. */
  architecture: string;
  modelType: "llama" | "mistral";
  vocab: number;
  hidden: number;
  layers: number;
  heads: number;
  kvHeads: number;
  headDim: number;
  intermediate: number;
  eps: number;
  ropeTheta: number;
  /** The longest sequence the model takes (max_position_embeddings, or a smaller sliding window). */
  context: number;
  /** The output projection is the input embedding (no lm_head.weight). */
  tied: boolean;
}

const ARCHS: Record<string, "llama" | "mistral"> = {
  LlamaForCausalLM: "llama",
  MistralForCausalLM: "mistral",
};

/** Reads and checks `dir/config.json`. */
export function readConfig(dir: string): LlamaConfig {
  const file = join(dir, "config.json");
  let c: Record<string, unknown>;
  try {
    c = JSON.parse(readFileSync(file, "utf8"));
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    throw new ModelError(
      `config.json: ${
        code === "ENOENT" ? `missing: ${file} does not exist` : (e as Error).message
      }`,
      file,
    );
  }
  const fail = (what: string): never => {
    throw new ModelError(`config.json: ${what}`, file);
  };
  const archs = c.architectures;
  const arch = Array.isArray(archs) && typeof archs[0] === "string" ? archs[0] : undefined;
  if (arch === undefined || !(arch in ARCHS)) {
    fail(
      `unsupported architecture ${JSON.stringify(arch ?? archs)}; kivi runs ${
        Object.keys(ARCHS).join(" and ")
      }`,
    );
  }
  const modelType = ARCHS[arch!];
  if (c.model_type !== undefined && c.model_type !== modelType) {
    fail(
      `model_type ${JSON.stringify(c.model_type)} does not match ${arch} (expected "${modelType}")`,
    );
  }
  const int = (key: string, fallback?: number): number => {
    const v = c[key] ?? fallback;
    if (!Number.isSafeInteger(v) || (v as number) < 1) {
      fail(`${key} must be a positive integer, got ${JSON.stringify(v)}`);
    }
    return v as number;
  };
  const hidden = int("hidden_size"), heads = int("num_attention_heads");
  const cfg: LlamaConfig = {
    architecture: arch!,
    modelType,
    vocab: int("vocab_size"),
    hidden,
    layers: int("num_hidden_layers"),
    heads,
    kvHeads: int("num_key_value_heads", heads),
    headDim: int("head_dim", hidden / heads),
    intermediate: int("intermediate_size"),
    eps: typeof c.rms_norm_eps === "number" ? c.rms_norm_eps : 1e-6,
    ropeTheta: 10000,
    context: int("max_position_embeddings"),
    tied: c.tie_word_embeddings === true,
  };
  if (heads % cfg.kvHeads !== 0) {
    fail(
      `num_attention_heads (${heads}) must be a multiple of num_key_value_heads (${cfg.kvHeads})`,
    );
  }
  if ((c.hidden_act ?? "silu") !== "silu") {
    fail(`hidden_act ${JSON.stringify(c.hidden_act)} is not supported; expected "silu"`);
  }
  if (c.attention_bias === true || c.mlp_bias === true) {
    fail(`attention_bias and mlp_bias are not supported; expected false`);
  }
  const rope = (c.rope_parameters ?? c.rope_scaling) as Record<string, unknown> | null | undefined;
  const theta = rope?.rope_theta ?? c.rope_theta ?? 10000;
  if (typeof theta !== "number" || !(theta > 0)) {
    fail(`rope_theta must be a positive number, got ${JSON.stringify(theta)}`);
  }
  cfg.ropeTheta = theta as number;
  const ropeType = rope?.rope_type ?? rope?.type ?? "default";
  if (ropeType !== "default") {
    fail(`rope_type ${JSON.stringify(ropeType)} is not supported; expected "default"`);
  }
  if (typeof c.sliding_window === "number" && c.sliding_window < cfg.context) {
    cfg.context = c.sliding_window;
  }
  return cfg;
}

/** Name and expected shape of every tensor the runner loads, in load order. */
export function expectedTensors(c: LlamaConfig): { name: string; shape: number[] }[] {
  const q = c.heads * c.headDim, kv = c.kvHeads * c.headDim;
  const out = [{ name: "model.embed_tokens.weight", shape: [c.vocab, c.hidden] }];
  for (let l = 0; l < c.layers; l++) {
    const p = `model.layers.${l}.`;
    out.push(
      { name: `${p}input_layernorm.weight`, shape: [c.hidden] },
      { name: `${p}self_attn.q_proj.weight`, shape: [q, c.hidden] },
      { name: `${p}self_attn.k_proj.weight`, shape: [kv, c.hidden] },
      { name: `${p}self_attn.v_proj.weight`, shape: [kv, c.hidden] },
      { name: `${p}self_attn.o_proj.weight`, shape: [c.hidden, q] },
      { name: `${p}post_attention_layernorm.weight`, shape: [c.hidden] },
      { name: `${p}mlp.gate_proj.weight`, shape: [c.intermediate, c.hidden] },
      { name: `${p}mlp.up_proj.weight`, shape: [c.intermediate, c.hidden] },
      { name: `${p}mlp.down_proj.weight`, shape: [c.hidden, c.intermediate] },
    );
  }
  out.push({ name: "model.norm.weight", shape: [c.hidden] });
  if (!c.tied) out.push({ name: "lm_head.weight", shape: [c.vocab, c.hidden] });
  return out;
}
