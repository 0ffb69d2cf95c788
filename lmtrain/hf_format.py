"""lmtrain's GPT in Hugging Face's layouts: which transformers architecture computes the same
function, and the weight maps in both directions (export, and ``model.init_from``).

    rope + rmsnorm + swiglu     -> LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM (with
                                   model.qkv_bias) or Qwen3ForCausalLM (with model.qk_norm): one
                                   layout, q/k/v and gate/up split from lmtrain's fused matrices
                                   (k and v with the key/value heads of grouped-query attention);
                                   RoPE needs no permutation (lmtrain rotates split halves, as HF's
                                   rotate_half). A model started from a source keeps its class
                                   (model.hf_class).
    learned + layernorm + gelu  -> GPT2LMHeadModel   (Linear weights transposed to Conv1D; zero
                                   biases where model.bias is false: GPT-2 always has them)
    rope + layernorm + gelu     -> Starcoder2ForCausalLM (sequential blocks, biases everywhere:
                                   zeros where model.bias is false)
    rope + layernorm + swiglu   -> StableLmForCausalLM (full rotary, sequential residual; exact only
                                   without biases: its MLP and output projection have none)
    mlp relu2 (squared ReLU) in place of gelu: GPT-2 (activation_function relu2) and Starcoder2
                                   (hidden_act relu2)

model.logit_softcap has no counterpart in these architectures and is refused.

Any other combination is refused with the list of these. Nothing here imports transformers:
the maps are plain tensors and dicts, so ``lmtrain train`` can start from a Hugging Face directory
with only safetensors installed.
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch

from lmtrain.errors import ConfigError, quoted
from lmtrain.model import LAYERNORM_EPS, RMS_EPS, swiglu_hidden

LLAMA = "llama"
MISTRAL = "mistral"
QWEN2 = "qwen2"
QWEN3 = "qwen3"
GPT2 = "gpt2"
STARCODER2 = "starcoder2"
STABLELM = "stablelm"
LLAMA_FAMILY = (LLAMA, MISTRAL, QWEN2, QWEN3)  # rope + rmsnorm + swiglu, one weight layout
CLASSES = {LLAMA: "LlamaForCausalLM", MISTRAL: "MistralForCausalLM", QWEN2: "Qwen2ForCausalLM",
           QWEN3: "Qwen3ForCausalLM", GPT2: "GPT2LMHeadModel", STARCODER2: "Starcoder2ForCausalLM",
           STABLELM: "StableLmForCausalLM"}
SUPPORTED = ("rope+rmsnorm+swiglu (Llama, Mistral; with model.qkv_bias, Qwen2; with qk_norm, Qwen3), "
             "learned+layernorm+gelu|relu2 (GPT-2), rope+layernorm+gelu|relu2 (Starcoder2) or rope+layernorm+swiglu "
             "without biases (StableLM)")


def architecture_of(config) -> str:
    """The transformers architecture (``llama``, ``qwen2``, ``gpt2``, ...) of a model config
    (``ModelConfig``/``GPTConfig``), or ConfigError. A model started from a Hugging Face source
    keeps its class (``model.hf_class``); otherwise the shape decides."""
    if config.logit_softcap:
        raise ConfigError(f"model.logit_softcap has no exact counterpart in the transformers architectures lmtrain "
                          f"writes ({SUPPORTED}); the export would compute another function")
    shape = (config.pos_embedding, config.norm, config.mlp)
    named = {cls: arch for arch, cls in CLASSES.items()}.get(config.hf_class or "")
    if config.qk_norm and config.bias:
        raise ConfigError(f"model.qk_norm with {'+'.join(shape)} and biases has no exact counterpart in transformers "
                          f"that lmtrain writes; supported: {SUPPORTED}")
    if shape == ("rope", "rmsnorm", "swiglu"):
        arch = named if named in LLAMA_FAMILY else QWEN3 if config.qk_norm else QWEN2 if config.qkv_bias else LLAMA
        return _check_family(config, arch)
    if config.qk_norm:
        raise ConfigError(f"model.qk_norm with {'+'.join(shape)}{' and biases' if config.bias else ''} has no exact "
                          f"counterpart in transformers that lmtrain writes; supported: {SUPPORTED}")
    extras = [k for k in ("n_kv_head", "head_dim", "mlp_hidden", "qkv_bias") if getattr(config, k)]
    if config.rope_scaling != "none":
        extras.append("rope_scaling")
    if extras:
        raise ConfigError(f"model.{', model.'.join(extras)} with {'+'.join(shape)}: lmtrain writes these only for the "
                          f"Llama family (rope+rmsnorm+swiglu); supported: {SUPPORTED}")
    if shape[:2] == ("learned", "layernorm") and config.mlp in ("gelu", "relu2"):
        return GPT2
    if shape[:2] == ("rope", "layernorm") and config.mlp in ("gelu", "relu2"):
        return STARCODER2
    if shape == ("rope", "layernorm", "swiglu") and not config.bias:
        return STABLELM
    raise ConfigError(f"a model with {'+'.join(shape)} has no exact counterpart in transformers that lmtrain "
                      f"writes; supported: {SUPPORTED}")


def _check_family(config, arch: str) -> str:
    """What each Llama-family class can hold: refused where it would compute another function."""
    why = None
    if config.qk_norm != (arch == QWEN3):
        why = "q/k norms (model.qk_norm) are Qwen3's alone"
    elif arch in (MISTRAL, QWEN2, QWEN3) and config.bias:
        why = f"{CLASSES[arch]} has no MLP biases (model.bias)"
    elif config.qkv_bias and arch != QWEN2:
        why = "biases on q, k and v alone (model.qkv_bias) are Qwen2's"
    elif config.rope_scaling != "none" and arch != LLAMA:
        why = "llama3 rope scaling is Llama's"
    if why:
        raise ConfigError(f"model.hf_class {CLASSES[arch]} cannot hold this model: {why}")
    return arch


def to_hf(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """The Hugging Face state dict of an lmtrain model's ``state`` (padded vocab rows dropped)."""
    arch = architecture_of(config)
    V, C = config.vocab_size, config.n_embd
    out: dict[str, torch.Tensor] = {}
    if arch in LLAMA_FAMILY:
        out["model.embed_tokens.weight"] = state["wte.weight"][:V]
        q_rows, kv_rows = config.n_head * config.head_size, config.kv_heads * config.head_size
        for i in range(config.n_layer):
            src, dst = f"blocks.{i}.", f"model.layers.{i}."
            out[dst + "input_layernorm.weight"] = state[src + "norm1.weight"]
            out[dst + "post_attention_layernorm.weight"] = state[src + "norm2.weight"]
            for kind in ("weight", "bias"):
                if f"{src}attn.qkv.{kind}" in state:
                    q, k, v = state[f"{src}attn.qkv.{kind}"].split([q_rows, kv_rows, kv_rows], dim=0)
                    out.update({f"{dst}self_attn.q_proj.{kind}": q, f"{dst}self_attn.k_proj.{kind}": k,
                                f"{dst}self_attn.v_proj.{kind}": v})
                elif kind == "bias" and arch == QWEN2:  # Qwen2 always has q, k and v biases: zero here
                    out.update({f"{dst}self_attn.{p}_proj.bias": torch.zeros(n)
                                for p, n in (("q", q_rows), ("k", kv_rows), ("v", kv_rows))})
                if kind == "weight" or config.bias:
                    gate, up = state[f"{src}mlp.up.{kind}"].split(config.mlp_width, dim=0)
                    out.update({f"{dst}self_attn.o_proj.{kind}": state[f"{src}attn.proj.{kind}"],
                                f"{dst}mlp.gate_proj.{kind}": gate, f"{dst}mlp.up_proj.{kind}": up,
                                f"{dst}mlp.down_proj.{kind}": state[f"{src}mlp.proj.{kind}"]})
            if arch == QWEN3:
                q_scale, k_scale = state[f"{src}attn.qk_norm.weight"].reshape(2, -1)
                out.update({f"{dst}self_attn.q_norm.weight": q_scale, f"{dst}self_attn.k_norm.weight": k_scale})
        out["model.norm.weight"] = state["norm_f.weight"]
    elif arch in (STARCODER2, STABLELM):
        out["model.embed_tokens.weight"] = state["wte.weight"][:V]
        norms = [("norm1", "input_layernorm"), ("norm2", "post_attention_layernorm")]
        for i in range(config.n_layer):
            src, dst = f"blocks.{i}.", f"model.layers.{i}."
            for ours, theirs in norms:
                out[f"{dst}{theirs}.weight"] = state[f"{src}{ours}.weight"]
                out[f"{dst}{theirs}.bias"] = _bias(state, f"{src}{ours}.bias", C)
            q, k, v = state[f"{src}attn.qkv.weight"].split(C, dim=0)
            out.update({f"{dst}self_attn.q_proj.weight": q, f"{dst}self_attn.k_proj.weight": k,
                        f"{dst}self_attn.v_proj.weight": v, f"{dst}self_attn.o_proj.weight": state[f"{src}attn.proj.weight"]})
            if arch == STARCODER2:  # biases on every projection (zeros where lmtrain has none)
                qb, kb, vb = _bias(state, f"{src}attn.qkv.bias", 3 * C).split(C, dim=0)
                out.update({f"{dst}self_attn.q_proj.bias": qb, f"{dst}self_attn.k_proj.bias": kb,
                            f"{dst}self_attn.v_proj.bias": vb,
                            f"{dst}self_attn.o_proj.bias": _bias(state, f"{src}attn.proj.bias", C),
                            f"{dst}mlp.c_fc.weight": state[f"{src}mlp.up.weight"],
                            f"{dst}mlp.c_fc.bias": _bias(state, f"{src}mlp.up.bias", 4 * C),
                            f"{dst}mlp.c_proj.weight": state[f"{src}mlp.proj.weight"],
                            f"{dst}mlp.c_proj.bias": _bias(state, f"{src}mlp.proj.bias", C)})
            else:
                gate, up = state[f"{src}mlp.up.weight"].split(swiglu_hidden(C), dim=0)
                out.update({f"{dst}mlp.gate_proj.weight": gate, f"{dst}mlp.up_proj.weight": up,
                            f"{dst}mlp.down_proj.weight": state[f"{src}mlp.proj.weight"]})
        out["model.norm.weight"] = state["norm_f.weight"]
        out["model.norm.bias"] = _bias(state, "norm_f.bias", C)
    else:
        out["transformer.wte.weight"] = state["wte.weight"][:V]
        out["transformer.wpe.weight"] = state["wpe.weight"]
        for i in range(config.n_layer):
            src, dst = f"blocks.{i}.", f"transformer.h.{i}."
            for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
                out[f"{dst}{theirs}.weight"] = state[f"{src}{ours}.weight"]
                out[f"{dst}{theirs}.bias"] = _bias(state, f"{src}{ours}.bias", C)
            for ours, theirs in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"),
                                 ("mlp.up", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")):
                weight = state[f"{src}{ours}.weight"]
                out[f"{dst}{theirs}.weight"] = weight.t()  # Conv1D stores (in, out)
                out[f"{dst}{theirs}.bias"] = _bias(state, f"{src}{ours}.bias", weight.size(0))
        out["transformer.ln_f.weight"] = state["norm_f.weight"]
        out["transformer.ln_f.bias"] = _bias(state, "norm_f.bias", C)
    if not config.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"][:V]
    return {k: v.detach().contiguous() for k, v in out.items()}


def _bias(state: dict[str, torch.Tensor], key: str, size: int) -> torch.Tensor:
    return state[key] if key in state else torch.zeros(size)


def hf_config(config, eot_id: int) -> dict[str, Any]:
    """``config.json`` for the model: every field transformers needs to rebuild it exactly."""
    arch = architecture_of(config)
    common = {"architectures": [CLASSES[arch]], "model_type": arch, "vocab_size": config.vocab_size,
              "bos_token_id": eot_id, "eos_token_id": eot_id, "tie_word_embeddings": config.tie_embeddings,
              "torch_dtype": "float32", "initializer_range": 0.02, "use_cache": True}
    if arch == GPT2:
        return {**common, "n_embd": config.n_embd, "n_layer": config.n_layer, "n_head": config.n_head,
                "n_positions": config.block_size, "n_ctx": config.block_size, "n_inner": None,
                "activation_function": "relu2" if config.mlp == "relu2" else "gelu_new",
                "layer_norm_epsilon": config.eps, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
                "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False}
    rope_parameters = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling == "llama3":
        rope_parameters = {"rope_type": "llama3", "rope_theta": config.rope_theta, "factor": config.rope_scaling_factor,
                           "low_freq_factor": config.rope_low_freq_factor,
                           "high_freq_factor": config.rope_high_freq_factor,
                           "original_max_position_embeddings": config.rope_original_context}
    rope = {"hidden_size": config.n_embd, "num_hidden_layers": config.n_layer, "num_attention_heads": config.n_head,
            "num_key_value_heads": config.kv_heads, "max_position_embeddings": config.hf_context or config.block_size,
            # Both spellings: transformers 5.x reads rope_parameters, 4.x rope_theta and rope_scaling.
            "rope_theta": config.rope_theta, "rope_parameters": rope_parameters,
            "rope_scaling": rope_parameters if config.rope_scaling != "none" else None, "attention_dropout": 0.0}
    if arch == STARCODER2:
        return {**common, **rope, "intermediate_size": config.mlp_width,
                "hidden_act": "relu2" if config.mlp == "relu2" else "gelu_pytorch_tanh",
                "norm_epsilon": config.eps, "use_bias": True, "sliding_window": None,
                "residual_dropout": 0.0, "embedding_dropout": 0.0}
    if arch == STABLELM:
        return {**common, **rope, "intermediate_size": config.mlp_width, "hidden_act": "silu",
                "layer_norm_eps": config.eps, "use_qkv_bias": False, "qk_layernorm": False,
                "use_parallel_residual": False, "partial_rotary_factor": 1.0, "hidden_dropout": 0.0}
    family = {**common, **rope, "intermediate_size": config.mlp_width, "head_dim": config.head_size,
              "hidden_act": "silu", "rms_norm_eps": config.eps}
    if arch == LLAMA:
        return {**family, "attention_bias": config.bias, "mlp_bias": config.bias, "pretraining_tp": 1}
    if arch == MISTRAL:
        return {**family, "sliding_window": None}
    if arch == QWEN2:
        return {**family, "use_sliding_window": False, "sliding_window": None, "max_window_layers": config.n_layer}
    return {**family, "attention_bias": False, "use_sliding_window": False, "sliding_window": None,
            "max_window_layers": config.n_layer}


# --------------------------------------------------------------------------------------------
# LoRA adapters -> peft
# --------------------------------------------------------------------------------------------

# The Hugging Face module (under its layer) that each lmtrain.lora target adapts. GPT-2's q, k and
# v are one fused module, c_attn.
_ATTENTION = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj"}
_GATED = {"gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
LORA_MODULES = {
    **{arch: {**_ATTENTION, **_GATED} for arch in LLAMA_FAMILY}, STABLELM: {**_ATTENTION, **_GATED},
    STARCODER2: {**_ATTENTION, "up": "mlp.c_fc", "down": "mlp.c_proj"},
    GPT2: {"q": "attn.c_attn", "k": "attn.c_attn", "v": "attn.c_attn", "o": "attn.c_proj", "up": "mlp.c_fc",
           "down": "mlp.c_proj"},
}
_NORM_KEY = ("norm.weight", "norm.bias", "layernorm.weight", "layernorm.bias")


def peft_adapter(adapters: dict[str, torch.Tensor], spec, config) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors of peft's ``adapter_model.safetensors`` and the LoRA fields of its
    ``adapter_config.json``, for the adapters of an lmtrain LoRA checkpoint (``adapters``: its
    tensors, named as in the model; ``spec``: its ``lora.LoraSpec``; ``config``: the GPTConfig).

    Each target maps to one Hugging Face module, except GPT-2's q, k and v, which share c_attn:
    there the adapters stand side by side, A stacked and B block-diagonal (rank and alpha times the
    number of targets, so alpha / r stays), which computes exactly the separate updates. Trained
    norms are whole modules (peft's ``modules_to_save``), taken from ``adapters`` through ``to_hf``
    by the caller.
    """
    from lmtrain.lora import target_rows

    arch = architecture_of(config)
    modules = LORA_MODULES[arch]
    prefix = "transformer.h.{}." if arch == GPT2 else "model.layers.{}."
    tensors: dict[str, torch.Tensor] = {}
    rank_pattern, alpha_pattern = {}, {}
    grouped: dict[str, list[str]] = {}  # Hugging Face module -> the targets it takes (the same in every layer)
    for target in spec.targets:
        grouped.setdefault(modules[target], []).append(target)
    for i in range(config.n_layer):
        for module, targets in grouped.items():
            layers = [target_rows(config, t) for t in targets]
            a = torch.cat([adapters[f"blocks.{i}.{layer}.lora_A.{t}"] for t, (layer, _, _) in zip(targets, layers)])
            if module == "attn.c_attn":
                b = torch.zeros(3 * config.n_embd, len(targets) * spec.rank)
                for j, (t, (layer, start, stop)) in enumerate(zip(targets, layers)):
                    b[start:stop, j * spec.rank:(j + 1) * spec.rank] = adapters[f"blocks.{i}.{layer}.lora_B.{t}"]
                if len(targets) > 1:
                    rank_pattern[module] = len(targets) * spec.rank
                    alpha_pattern[module] = len(targets) * spec.alpha
            else:
                (target,), ((layer, _, _),) = targets, layers
                b = adapters[f"blocks.{i}.{layer}.lora_B.{target}"]
            name = f"base_model.model.{prefix.format(i)}{module}"
            tensors[f"{name}.lora_A.weight"] = a.contiguous()
            tensors[f"{name}.lora_B.weight"] = b.contiguous()
    fields = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": spec.rank, "lora_alpha": spec.alpha,
              "lora_dropout": spec.dropout, "target_modules": sorted({modules[t] for t in spec.targets}),
              "bias": "none", "fan_in_fan_out": arch == GPT2,  # GPT-2's Conv1D stores (in, out)
              "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "use_rslora": False, "use_dora": False,
              "init_lora_weights": True, "inference_mode": True, "modules_to_save": None}
    return tensors, fields


def hf_norms(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The normalisation tensors of a Hugging Face state dict (``to_hf``'s), by name."""
    return {k: v for k, v in hf_state.items() if k.endswith(_NORM_KEY) or ".ln_" in k or k.startswith("ln_")}


# --------------------------------------------------------------------------------------------
# Hugging Face -> lmtrain (model.init_from)
# --------------------------------------------------------------------------------------------


def model_fields_from_hf(hf: dict[str, Any], where: str) -> dict[str, Any]:
    """The ``model.*`` fields (and ``vocab_size``) of a Hugging Face ``config.json``, or a one-line
    ``ConfigError`` naming what lmtrain cannot reproduce exactly. Every value is type-checked:
    ``hidden_size: 64.7`` or ``rms_norm_eps: NaN`` is refused, never rounded or carried along."""
    kind = hf.get("model_type")
    read = _Reader(hf, where)
    try:
        if kind in LLAMA_FAMILY:
            return {**_llama_fields(read, where, kind), "hf_class": CLASSES[kind]}
        if kind == GPT2:
            return {**_gpt2_fields(read, where), "hf_class": CLASSES[GPT2]}
    except KeyError as exc:
        raise ConfigError(f"{where}: config.json has no {exc.args[0]}") from None
    raise ConfigError(f"{where}: model_type {quoted(kind)} is not supported; model.init_from reads "
                      f"{', '.join(CLASSES[a] for a in (*LLAMA_FAMILY, GPT2))} (safetensors) directories")


class _Reader:
    """Typed reads of a ``config.json``'s values: a wrong type or value is a one-line ``ConfigError``
    naming the key; a missing key without a default is a ``KeyError``."""

    def __init__(self, hf: dict[str, Any], where: str) -> None:
        self.hf, self.where = hf, where

    def raw(self, key: str, default: Any = KeyError) -> Any:
        value = self.hf.get(key)
        if value is None:
            if default is KeyError:
                raise KeyError(key)
            return default
        return value

    def whole(self, key: str, default: Any = KeyError, minimum: int = 1) -> int:
        value = self.raw(key, default)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            self._wrong(key, value, "a whole number")
        if value < minimum:
            self._wrong(key, value, f"at least {minimum}")
        return value

    def number(self, key: str, default: Any = KeyError) -> float:
        value = self.raw(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            self._wrong(key, value, "a positive finite number")
        return float(value)

    def flag(self, key: str, default: Any = KeyError) -> bool:
        value = self.raw(key, default)
        if not isinstance(value, bool):
            self._wrong(key, value, "true or false")
        return value

    def _wrong(self, key: str, value: Any, expected: str) -> None:
        raise ConfigError(f"{self.where}: config.json's {key} is {quoted(value)}, expected {expected}")


def _refuse(where: str, what: str) -> None:
    raise ConfigError(f"{where}: {what}; lmtrain would only approximate this model, so it refuses it")


def _llama_fields(read: "_Reader", where: str, kind: str) -> dict[str, Any]:
    """Llama, Mistral, Qwen2 and Qwen3: one layout, with the options each uses."""
    hf = read.hf
    C, heads = read.whole("hidden_size"), read.whole("num_attention_heads")
    kv = read.whole("num_key_value_heads", heads)
    head = read.whole("head_dim", C // heads if C % heads == 0 else 0)
    if heads % kv:
        _refuse(where, f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
    # transformers 4.x writes rope_scaling (null when there is none), 5.x rope_parameters: either may
    # carry the scaling, and a config saved by one and edited for the other may hold both.
    ropes = [hf[key] for key in ("rope_scaling", "rope_parameters") if hf.get(key) is not None]
    if not all(isinstance(r, dict) for r in ropes):
        _refuse(where, f"rope scaling ({quoted(ropes, 60)})")
    scaled = [r for r in ropes if r.get("rope_type", r.get("type", "default")) != "default"]
    rope = scaled[0] if scaled else (ropes[-1] if ropes else {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if len({json.dumps(r, sort_keys=True) for r in scaled}) > 1:
        _refuse(where, f"two different rope scalings ({quoted(scaled, 60)})")
    scaling: dict[str, Any] = {}
    if rope_type == "llama3" and kind == LLAMA:
        r = _Reader(rope, where)
        scaling = {"rope_scaling": "llama3", "rope_scaling_factor": r.number("factor"),
                   "rope_low_freq_factor": r.number("low_freq_factor"), "rope_high_freq_factor": r.number("high_freq_factor"),
                   "rope_original_context": r.whole("original_max_position_embeddings")}
    elif rope_type != "default":
        _refuse(where, f"rope scaling of type {quoted(rope_type)} (lmtrain computes llama3's for Llama, and none)")
    if hf.get("hidden_act", "silu") != "silu":
        _refuse(where, f"hidden_act {quoted(hf['hidden_act'])} (lmtrain's SwiGLU uses silu)")
    context = read.whole("max_position_embeddings")
    window = hf.get("sliding_window")
    windowed = hf.get("use_sliding_window", True) if kind in (QWEN2, QWEN3) else True  # Qwen: off unless asked
    if window is not None and windowed and read.whole("sliding_window") < context:
        _refuse(where, f"a sliding window of {window} tokens, shorter than the context of {context}")
    bias = read.flag("attention_bias", False) if kind in (LLAMA, QWEN3) else False
    if kind == LLAMA and read.flag("mlp_bias", False) != bias:
        _refuse(where, "attention_bias and mlp_bias differ (lmtrain's model.bias covers both)")
    if kind == QWEN3 and bias:
        _refuse(where, "Qwen3 with attention_bias (its MLP has none; lmtrain's model.bias covers both)")
    eps = read.number("rms_norm_eps", RMS_EPS)
    thetas = [r["rope_theta"] for r in ropes if "rope_theta" in r]
    theta = _Reader({"rope_theta": thetas[0]}, where).number("rope_theta") if thetas else read.number("rope_theta", 10000.0)
    width = read.whole("intermediate_size")
    return {"n_layer": read.whole("num_hidden_layers"), "n_head": heads, "n_embd": C, "block_size": context,
            "bias": bias, "pos_embedding": "rope", "norm": "rmsnorm", "mlp": "swiglu",
            "tie_embeddings": read.flag("tie_word_embeddings", False), "rope_theta": theta,
            "n_kv_head": 0 if kv == heads else kv, "head_dim": 0 if head * heads == C else head,
            "mlp_hidden": 0 if width == swiglu_hidden(C) else width, "norm_eps": 0.0 if eps == RMS_EPS else eps,
            "qkv_bias": kind == QWEN2, "qk_norm": kind == QWEN3, **scaling, "vocab_size": read.whole("vocab_size")}


def _gpt2_fields(read: _Reader, where: str) -> dict[str, Any]:
    hf = read.hf
    C = read.whole("n_embd")
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        _refuse(where, f"activation_function {quoted(hf['activation_function'])} (lmtrain's GELU is the tanh one)")
    if read.whole("n_inner", 4 * C) != 4 * C:
        _refuse(where, f"n_inner {hf['n_inner']} (lmtrain's MLP is 4 x n_embd = {4 * C})")
    eps = read.number("layer_norm_epsilon", LAYERNORM_EPS)
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn") \
            or hf.get("scale_attn_weights") is False:
        _refuse(where, "a non-standard attention scaling")
    positions = read.whole("n_positions") if hf.get("n_positions") is not None else read.whole("n_ctx")
    return {"n_layer": read.whole("n_layer"), "n_head": read.whole("n_head"), "n_embd": C,
            "block_size": positions, "bias": True, "pos_embedding": "learned",
            "norm": "layernorm", "mlp": "gelu", "tie_embeddings": read.flag("tie_word_embeddings", True),
            "norm_eps": 0.0 if eps == LAYERNORM_EPS else eps, "vocab_size": read.whole("vocab_size")}


def from_hf(hf_state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """lmtrain's state dict (unpadded vocab rows: the caller pads) from a Hugging Face one.
    ``config`` is the ``GPTConfig`` built from ``model_fields_from_hf``. KeyError if a tensor is
    missing."""
    arch = architecture_of(config)
    sd = {k.removeprefix("transformer.") if arch == GPT2 else k: v.float() for k, v in hf_state.items()}
    out: dict[str, torch.Tensor] = {}
    if arch in LLAMA_FAMILY:
        out["wte.weight"] = sd["model.embed_tokens.weight"]
        for i in range(config.n_layer):
            src, dst = f"model.layers.{i}.", f"blocks.{i}."
            out[dst + "norm1.weight"] = sd[src + "input_layernorm.weight"]
            out[dst + "norm2.weight"] = sd[src + "post_attention_layernorm.weight"]
            for kind in ("weight", "bias"):
                if kind == "weight" or config.bias or config.qkv_bias:
                    out[f"{dst}attn.qkv.{kind}"] = torch.cat([sd[f"{src}self_attn.{p}_proj.{kind}"] for p in "qkv"])
                if kind == "weight" or config.bias:
                    out[f"{dst}attn.proj.{kind}"] = sd[f"{src}self_attn.o_proj.{kind}"]
                    out[f"{dst}mlp.up.{kind}"] = torch.cat([sd[f"{src}mlp.gate_proj.{kind}"], sd[f"{src}mlp.up_proj.{kind}"]])
                    out[f"{dst}mlp.proj.{kind}"] = sd[f"{src}mlp.down_proj.{kind}"]
            if config.qk_norm:
                out[f"{dst}attn.qk_norm.weight"] = torch.stack([sd[f"{src}self_attn.q_norm.weight"],
                                                                sd[f"{src}self_attn.k_norm.weight"]])[:, None]
        out["norm_f.weight"] = sd["model.norm.weight"]
    else:
        out["wte.weight"], out["wpe.weight"] = sd["wte.weight"], sd["wpe.weight"]
        for i in range(config.n_layer):
            src, dst = f"h.{i}.", f"blocks.{i}."
            for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
                out[f"{dst}{ours}.weight"], out[f"{dst}{ours}.bias"] = sd[f"{src}{theirs}.weight"], sd[f"{src}{theirs}.bias"]
            for ours, theirs in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"),
                                 ("mlp.up", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")):
                out[f"{dst}{ours}.weight"] = sd[f"{src}{theirs}.weight"].t().contiguous()
                out[f"{dst}{ours}.bias"] = sd[f"{src}{theirs}.bias"]
        out["norm_f.weight"], out["norm_f.bias"] = sd["ln_f.weight"], sd["ln_f.bias"]
    if not config.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return out
