"""GGUF, llama.cpp's file format: lmtrain's model in its tensor names and layouts, both ways.

``gguf_names`` maps each Hugging Face tensor name (``hf_format``'s layout) to llama.cpp's, for
the architectures lmtrain writes and reads (llama for Llama and Mistral, qwen2, qwen3, gpt2);
``gguf_layout`` is the change of layout between the two: llama.cpp's llama rotates interleaved
pairs where HF rotates split halves, so its q and k rows are reordered per head (k by the key/value
heads), as llama.cpp's own converter does; GPT-2's Conv1D matrices are stored (out, in). qwen2 and
qwen3 rotate split halves in llama.cpp too: nothing to reorder. ``read_tensors`` reads a file's
tensors, dequantized to fp32 whatever their type (gguf-py dequantizes every type it knows), in
the Hugging Face layout. The export (``lmtrain.export``) and a GGUF source (``lmtrain.pretrained``,
``lmtrain.restore``) both use these tables.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lmtrain.hf_format import GPT2, LLAMA, MISTRAL, QWEN2, QWEN3, architecture_of

# llama.cpp's architecture name for each class lmtrain writes or reads
ARCHS = {LLAMA: "llama", MISTRAL: "llama", QWEN2: "qwen2", QWEN3: "qwen3", GPT2: "gpt2"}

_LLAMA_BLOCK = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
                "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
_GPT2_BLOCK = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
               "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}


def permute_for_llama_cpp(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's llama architecture rotates interleaved pairs; lmtrain (like HF) rotates split
    halves. The same reordering llama.cpp's own HF converter applies to q and k."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_for_llama_cpp(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of ``permute_for_llama_cpp``."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_names(config) -> dict[str, str]:
    """Hugging Face tensor name -> GGUF tensor name, for every tensor of the model."""
    arch = architecture_of(config)
    if arch != GPT2:
        names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                 "lm_head.weight": "output.weight"}
        for i in range(config.n_layer):
            names.update({f"model.layers.{i}.{h}.weight": f"blk.{i}.{g}.weight" for h, g in _LLAMA_BLOCK.items()})
            if arch == QWEN2:  # its q, k and v biases
                names.update({f"model.layers.{i}.self_attn.{p}_proj.bias": f"blk.{i}.attn_{p}.bias" for p in "qkv"})
            if arch == QWEN3:  # its q and k norms
                names.update({f"model.layers.{i}.self_attn.{p}_norm.weight": f"blk.{i}.attn_{p}_norm.weight" for p in "qk"})
        return names
    names = {"transformer.wte.weight": "token_embd.weight", "transformer.wpe.weight": "position_embd.weight",
             "transformer.ln_f.weight": "output_norm.weight", "transformer.ln_f.bias": "output_norm.bias",
             "lm_head.weight": "output.weight"}
    for i in range(config.n_layer):
        for h, g in _GPT2_BLOCK.items():
            names.update({f"transformer.h.{i}.{h}.{kind}": f"blk.{i}.{g}.{kind}" for kind in ("weight", "bias")})
    return names


def gguf_layout(name: str, tensor: torch.Tensor, config, to_gguf: bool) -> torch.Tensor:
    """The layout change between a Hugging Face tensor and its GGUF twin (``to_gguf``, or back)."""
    arch = architecture_of(config)
    if arch in (LLAMA, MISTRAL):
        if name.endswith(("q_proj.weight", "k_proj.weight")):  # k's heads are the key/value heads
            heads = config.n_head if name.endswith("q_proj.weight") else config.kv_heads
            return (permute_for_llama_cpp if to_gguf else unpermute_for_llama_cpp)(tensor, heads)
        return tensor
    if arch in (QWEN2, QWEN3):
        return tensor
    return tensor.t() if name.startswith("transformer.h.") and tensor.dim() == 2 else tensor


def read_tensors(path: Path, config) -> dict[str, torch.Tensor]:
    """The tensors of the GGUF file at ``path`` in the Hugging Face layout, dequantized to fp32;
    a tied head (no ``output.weight``) is left out, as in a Hugging Face state dict. KeyError
    names a tensor the model needs that the file lacks; ``ValueError`` a type gguf-py cannot
    dequantize."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    raw = {}
    for t in reader.tensors:
        # GGUF lists dimensions fastest-first; numpy's (and torch's) order is the reverse.
        shape = tuple(int(d) for d in reversed(t.shape))
        try:
            data = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as exc:
            raise ValueError(f"tensor {t.name} has type {t.tensor_type.name}, which gguf-py cannot dequantize ({exc})") from None
        raw[t.name] = torch.from_numpy(data.reshape(shape).astype("float32"))
    out = {}
    for hf_name, name in gguf_names(config).items():
        if name not in raw and hf_name == "lm_head.weight":
            continue  # tied
        out[hf_name] = gguf_layout(hf_name, raw[name], config, False)
    return out
