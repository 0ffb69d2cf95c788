"""`lmtrain export`: a checkpoint as a Hugging Face model directory or a GGUF file for llama.cpp.

    --format hf    PATH/  model.safetensors, config.json, generation_config.json, tokenizer.json,
                          tokenizer_config.json, README.md (a model card)
    --format gguf  FILE   one GGUF file (architecture llama or gpt2, the byte-level BPE inside)
    --format peft  PATH/  a LoRA run's adapters as peft loads them on top of the base's hf export:
                          adapter_config.json, adapter_model.safetensors, README.md

A LoRA run exports as hf or gguf with its adapters merged into the weights (what ``load_model``
gives); ``peft`` keeps them apart.

The architecture mapping and the weight maps are in ``lmtrain.hf_format``; the padded vocabulary
rows are dropped, so no consumer can ever produce an id without a token. Like every artifact, an
export is written under a temporary name and renamed into place. Reading the checkpoint takes no
lock (an export is a reader of the run): it reads the checkpoint once, whatever the trainer prunes
meanwhile.

``force`` replaces only an earlier export that lmtrain can prove it wrote (``check_out``): a
directory holding ``lmtrain-export.json`` and nothing but the files an export writes, or a GGUF
file carrying the ``lmtrain.export`` key. Never a run directory, anything of a run's own
(checkpoints, shards, tokenizer, logs), a folder holding other files, or a link; the earlier
export is moved aside and removed only once the new one is whole in its place.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmtrain.errors import ConfigError, LmtrainError
from lmtrain.fsutil import (STAGING_MARK, TMP_MARKER, atomic_dir, atomic_path, describe_os_error, fsync_dir,
                            remove_stale_tmp, seal_staging, stale_leftovers, staging_dir, write_json)
from lmtrain.gguf_format import ARCHS, gguf_layout, gguf_names, read_tensors
from lmtrain.hf_format import GPT2, LLAMA, MISTRAL, QWEN3, architecture_of, hf_config, to_hf
from lmtrain.inference import LoadedModel, load_model
from lmtrain.rundir import RUN_ARTIFACTS, is_run_dir, tokenizer_path
from lmtrain.chat_template import end_of_turn_id, read_template
from lmtrain.tokenizer import SOURCE_TOKENIZER_FILES

FORMATS = ("hf", "gguf", "peft")
GGUF_ARCHS = {arch: name for arch, name in ARCHS.items() if arch != QWEN3}  # what the export writes (llama.cpp's names)
# GGUF tensor types for --quant: llama.cpp's names. Matrices take the type (those whose rows are
# not a whole number of quantization blocks fall back to f16); 1-D tensors stay f32.
GGUF_QUANTS = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
ARCH_NAMES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "gpt2": "GPT-2",
              "starcoder2": "Starcoder2", "stablelm": "StableLM"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
EXPORT_MARK = "lmtrain-export.json"  # in every directory export: what lmtrain wrote, from which run
GGUF_MARK = "lmtrain.export"  # the same, as a GGUF metadata key
EXPORT_FILES = {  # what a directory export holds: --force replaces a folder holding nothing else
    "hf": {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
           "special_tokens_map.json", "chat_template.jinja", "README.md", EXPORT_MARK},
    "peft": {"adapter_model.safetensors", "adapter_config.json", "README.md", EXPORT_MARK},
}


class ExportError(LmtrainError):
    """An export cannot be written (it exists, the disk is full, the format cannot hold the model)."""


@dataclass
class ExportResult:
    path: Path
    format: str
    architecture: str
    checkpoint: str
    step: int
    vocab_size: int
    params: int


def export(run_dir: Path, fmt: str, out: Path, checkpoint: str = "best", dtype: str = "fp32",
           force: bool = False, quant: str | None = None) -> ExportResult:
    """Write the checkpoint ``checkpoint`` of ``run_dir`` to ``out`` in ``fmt``; a GGUF file's
    matrices in ``quant`` (one of ``GGUF_QUANTS``; by default the type of ``dtype``)."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if quant is not None and fmt != "gguf":
        raise ConfigError(f"--quant is for --format gguf; --format {fmt} takes --dtype")
    if quant is not None and dtype != "fp32":
        raise ConfigError("give --quant or --dtype, not both: --quant f16 is --dtype fp16 for GGUF")
    if quant is not None and quant not in GGUF_QUANTS:
        raise ConfigError(f"--quant must be one of {', '.join(GGUF_QUANTS)}, got {quant!r}")
    quant = quant or {"fp32": "f32", "fp16": "f16", "bf16": "bf16"}[dtype]
    out = check_out(Path(out), fmt, force)
    loaded = load_model(run_dir, checkpoint, "cpu")
    arch = architecture_of(loaded.model.config)
    if fmt == "gguf" and arch not in GGUF_ARCHS:
        raise ExportError(f"GGUF export writes the llama (Llama, Mistral), qwen2 and gpt2 architectures; this model "
                          f"maps to {arch} in transformers: export it with --format hf instead")
    if fmt == "gguf" and loaded.model.config.rope_scaling != "none":
        raise ExportError("GGUF export does not write llama3 rope scaling (llama.cpp reads it as a rope_freqs "
                          "tensor lmtrain does not write); export it with --format hf instead")
    if fmt == "gguf" and loaded.model.config.mlp == "relu2":
        raise ExportError("llama.cpp's gpt2 architecture computes GELU, and this model has model.mlp: relu2; "
                          "export it with --format hf instead")
    if fmt == "gguf" and arch in (LLAMA, MISTRAL) and loaded.model.config.bias:
        raise ExportError("llama.cpp's llama architecture has no MLP biases, and this model has model.bias: "
                          "true; export it with --format hf instead")
    state = {k: v for k, v in loaded.model.state_dict().items()}
    tensors = to_hf(state, loaded.model.config)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if fmt == "hf":
            _write_hf(loaded, tensors, out, dtype, run_dir)
        elif fmt == "peft":
            written = _write_peft(loaded, tensors, out, dtype)
            return ExportResult(out, fmt, arch, loaded.checkpoint.name, loaded.step, loaded.model.config.vocab_size,
                                sum(t.numel() for t in written.values()))
        else:
            _write_gguf(loaded, tensors, out, quant, run_dir)
    except OSError as exc:
        raise ExportError(f"could not write {out}: {describe_os_error(exc)}; "
                          f"{'the previous export is intact' if out.exists() else 'nothing was written'}") from None
    return ExportResult(out, fmt, arch, loaded.checkpoint.name, loaded.step, loaded.model.config.vocab_size,
                        sum(t.numel() for t in tensors.values()))


def check_out(out: Path, fmt: str, force: bool) -> Path:
    """``out`` made absolute, once it is a place an export may go: never a run directory or inside
    a run's own artifacts; an existing path only with ``force``, and only when it is an earlier
    lmtrain export of the same kind (see the module docstring). Checked before anything is read."""
    out = Path(os.path.abspath(out.expanduser()))
    for holder in (out, *out.parents):
        if is_run_dir(holder):
            if holder == out:
                raise ExportError(f"--out {out} is a run directory; an export goes into a new path of its own")
            if out.relative_to(holder).parts[0] in RUN_ARTIFACTS:
                raise ExportError(f"--out {out} is inside the run's own {out.relative_to(holder).parts[0]}; "
                                  "an export goes into a new path of its own")
    _recover_moved_aside(out)
    if not out.exists() and not out.is_symlink():
        return out
    if not force:
        raise ExportError(f"{out} already exists; --force replaces it (only an earlier lmtrain export)")
    if out.is_symlink():
        raise ExportError(f"--out {out} is a symbolic link; --force replaces only an earlier export, never a link")
    reason = _not_an_export(out, fmt)
    if reason is not None:
        raise ExportError(f"--force replaces only an earlier lmtrain export, and {out} {reason}; "
                          "choose another --out (nothing was changed)")
    return out


def _not_an_export(out: Path, fmt: str) -> str | None:
    """Why ``out`` is not an earlier export of ``fmt`` that --force may replace; None when it is."""
    if fmt == "gguf":
        if out.is_dir():
            return "is a directory, and --format gguf writes a file"
        try:
            from gguf import GGUFReader

            return None if GGUF_MARK in GGUFReader(str(out)).fields else "is a GGUF file lmtrain did not write"
        except ImportError:
            return "cannot be checked without the gguf package (pip install 'lmtrain[hf]')"
        except Exception:  # gguf-py raises assorted errors for what is not a GGUF file
            return "is not a GGUF file lmtrain wrote"
    if not out.is_dir():
        return f"is a file, and --format {fmt} writes a directory"
    try:
        mark = json.loads((out / EXPORT_MARK).read_text("utf-8")[:65536])
    except (OSError, ValueError, RecursionError):
        return f"has no readable {EXPORT_MARK} (lmtrain writes one into every export)"
    if not isinstance(mark, dict) or mark.get("format") != fmt:
        return f"is not a --format {fmt} export ({EXPORT_MARK} says {str(mark)[:40]!r})"
    others = sorted(p.name for p in out.iterdir() if p.name not in EXPORT_FILES[fmt] or not p.is_file())
    if others:
        return f"holds files an export does not write ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''})"
    return None


def _recover_moved_aside(out: Path) -> None:
    """An export killed between moving the earlier one aside and putting the new one in place
    left it as ``OUT.tmp-PID.old``: put it back where ``out`` is missing, else it is a leftover."""
    for aside in stale_leftovers(out.parent, out.name, suffix=".old"):
        if not out.exists() and not out.is_symlink():
            (aside / STAGING_MARK).unlink(missing_ok=True)
            aside.rename(out)
        else:
            shutil.rmtree(aside, ignore_errors=True)


def _write_atomically(write, out: Path, directory: bool) -> None:
    """``write(tmp)`` fills a temporary sibling of ``out`` (a directory or a file), which then takes
    ``out``'s place; an ``out`` that exists (``--force``, checked by ``check_out``) goes only once
    the new one is complete."""
    remove_stale_tmp(out.parent, out.name)  # a killed export's staging, provably lmtrain's
    if not directory:
        with atomic_path(out) as tmp:  # os.replace: the old file stays until the rename
            write(tmp)
        return
    if not out.exists():
        with atomic_dir(out) as tmp:
            write(tmp)
        return
    staged = staging_dir(out)
    try:
        write(staged)
        seal_staging(staged)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    aside = out.with_name(f"{out.name}{TMP_MARKER}{os.getpid()}.old")
    out.rename(aside)
    (aside / STAGING_MARK).write_text(f"{os.getpid()}\n")  # now provably ours to remove
    staged.rename(out)
    fsync_dir(out.parent)
    shutil.rmtree(aside, ignore_errors=True)


def _export_mark(loaded: LoadedModel, fmt: str, run_dir: Path) -> str:
    """What ``lmtrain-export.json`` (or the GGUF key) says: lmtrain wrote this, from which checkpoint."""
    return json.dumps({"format": fmt, "run": str(Path(run_dir).resolve()), "checkpoint": loaded.checkpoint.name,
                       "step": loaded.step})


# --------------------------------------------------------------------------------------------
# Hugging Face directory
# --------------------------------------------------------------------------------------------


def _write_hf(loaded: LoadedModel, tensors: dict[str, torch.Tensor], out: Path, dtype: str, run_dir: Path) -> None:
    from safetensors.torch import save_file

    config = loaded.model.config
    cast = {k: v.to(DTYPES[dtype]).contiguous() for k, v in tensors.items()}
    hf = hf_config(config, loaded.eot_id)
    hf["torch_dtype"] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype]
    sample = loaded.config.sample
    # A chat model stops at its template's end-of-turn token too (transformers' generate reads the list).
    turn_end = end_of_turn_id(tokenizer_path(run_dir).parent, loaded.tokenizer, loaded.config.tokenizer.special_tokens[0])
    eos = [loaded.eot_id, turn_end] if turn_end is not None else loaded.eot_id
    generation = {"bos_token_id": loaded.eot_id, "eos_token_id": eos, "pad_token_id": loaded.eot_id,
                  "do_sample": sample.temperature > 0, "temperature": sample.temperature or 1.0,
                  "top_k": sample.top_k or 0, "top_p": sample.top_p, "max_new_tokens": sample.max_new_tokens}
    eot = loaded.config.tokenizer.special_tokens[0]
    tokenizer_config = {
        # The fast tokenizer over tokenizer.json, as both transformers 4.x and 5.x load it; no BOS is
        # added (there is no post-processor), and decoding must not "clean up" spaces, or the
        # byte-exact round trip breaks.
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": eot, "eos_token": eot,
        "model_max_length": config.block_size, "clean_up_tokenization_spaces": False,
        "add_bos_token": False, "add_eos_token": False,
    }

    def write_dir(tmp: Path) -> None:
        save_file(cast, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_json(tmp / "config.json", hf)
        write_json(tmp / "generation_config.json", generation)
        write_json(tmp / "tokenizer_config.json", tokenizer_config)
        # A run started from a model keeps its tokenizer's files (BOS/EOS settings, the chat
        # template, the generation config with every EOS id): they go back as they came.
        for name in ("tokenizer.json", *SOURCE_TOKENIZER_FILES):
            if (tokenizer_path(run_dir).parent / name).is_file():
                shutil.copyfile(tokenizer_path(run_dir).parent / name, tmp / name)
        (tmp / "README.md").write_text(model_card(loaded, run_dir, architecture_of(config)), encoding="utf-8")
        (tmp / EXPORT_MARK).write_text(_export_mark(loaded, "hf", run_dir) + "\n", encoding="utf-8")

    _write_atomically(write_dir, out, directory=True)


def _write_peft(loaded: LoadedModel, hf_tensors: dict[str, torch.Tensor], out: Path, dtype: str) -> dict:
    """A LoRA checkpoint's adapters in peft's layout (``hf_format.peft_adapter``); trained norms as
    peft's ``modules_to_save`` (their values from the merged model's ``hf_tensors``)."""
    from safetensors.torch import save_file

    from lmtrain.hf_format import hf_norms, peft_adapter
    from lmtrain.lora import LoraRecord

    if loaded.adapters is None:
        raise ExportError(f"{loaded.checkpoint} holds a whole model (train.lora_rank 0), not LoRA adapters: "
                          "export it with --format hf")
    record = LoraRecord.from_state(loaded.state, loaded.checkpoint)
    tensors, fields = peft_adapter(loaded.adapters, record.spec, loaded.model.config)
    if record.spec.train_norms:
        norms = hf_norms(hf_tensors)
        tensors.update({f"base_model.model.{k}": v for k, v in norms.items()})
        fields["modules_to_save"] = sorted({k.rsplit(".", 1)[0] for k in norms})
    fields["base_model_name_or_path"] = record.base
    cast = {k: v.to(DTYPES[dtype]).contiguous() for k, v in tensors.items()}

    def write_dir(tmp: Path) -> None:
        save_file(cast, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        write_json(tmp / "adapter_config.json", fields)
        (tmp / "README.md").write_text(adapter_card(loaded, record, fields), encoding="utf-8")
        (tmp / EXPORT_MARK).write_text(_export_mark(loaded, "peft", loaded.checkpoint.parent.parent) + "\n",
                                       encoding="utf-8")

    _write_atomically(write_dir, out, directory=True)
    return cast


def adapter_card(loaded: LoadedModel, record, fields: dict) -> str:
    """The adapter's README: what it adapts, and how to load it with peft."""
    spec = record.spec
    if (Path(record.base) / "config.json").is_file():
        base = f"the Hugging Face model at `{record.base}`"
    else:
        run, step = Path(record.base).parent.parent, Path(record.base).name
        base = (f"the lmtrain checkpoint `{record.base}`; export it first: `lmtrain export --run {run} "
                f"--checkpoint {step} --format hf --out BASE`")
    return f"""---
library_name: peft
tags:
- lmtrain
- lora
---
# {loaded.config.run.name}: LoRA adapters

LoRA rank {spec.rank}, alpha {spec.alpha:g}, on {', '.join(fields['target_modules'])}
{'(and the normalisation weights, as modules_to_save) ' if spec.train_norms else ''}of {base}.
Trained by [lmtrain](https://pypi.org/project/lmtrain/) for {loaded.step} steps ({loaded.checkpoint.name}).

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), ADAPTER)
```

`lmtrain export --format hf` on this run writes the model with the adapters merged in.
"""


def model_card(loaded: LoadedModel, run_dir: Path, arch: str) -> str:
    """A Hub-style README: what the model is, what it was trained on, how well, and the config."""
    state = loaded.state  # as read with the weights: the trainer may have pruned the checkpoint since
    last = state.get("last_val") or {}
    config = loaded.config
    params = loaded.model.num_params()
    val = (f"val loss {last['val_loss']:.4f} nats/token, {last['val_bpb']:.4f} bits per byte (step {last['step']})"
           if "val_loss" in last else "not evaluated")
    front = "\n".join(["---", "library_name: transformers", "license: other", "pipeline_tag: text-generation",
                       "tags:", "- lmtrain", f"- {arch}", "- causal-lm", "---", ""])
    origin = "trained from scratch"
    if config.model.init_from:
        origin = f"fine-tuned from `{config.model.init_from}`"
        if state.get("lora"):
            origin += f" (LoRA rank {state['lora']['rank']}, the adapters merged into the weights)"
    return front + f"""# {config.run.name}

A {params / 1e6:.2f}M-parameter causal language model ({ARCH_NAMES[arch]} architecture,
{config.model.n_layer} layers, width {config.model.n_embd}, context {config.model.block_size}) {origin}
with [lmtrain](https://pypi.org/project/lmtrain/).

- **Corpus:** `{config.data.source}` (validation: {config.data.val_source or f'{config.data.val_fraction:.1%} of documents held out'})
- **Tokenizer:** byte-level BPE, {loaded.model.config.vocab_size} tokens; `{config.tokenizer.special_tokens[0]}` ends every document
- **Trained:** {state.get('step')} steps, {state.get('tokens_seen', 0):,} tokens ({loaded.checkpoint.name})
- **Result:** {val}

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(PATH)
tokenizer = AutoTokenizer.from_pretrained(PATH)
```

## The lmtrain config that made it

```yaml
{config.to_yaml().rstrip()}
```
"""


# --------------------------------------------------------------------------------------------
# GGUF
# --------------------------------------------------------------------------------------------


def gguf_tensors(tensors: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """GGUF tensor names and contents (``(out, in)`` weights) from the Hugging Face state dict; a
    tied head is written as ``output.weight`` too (llama.cpp expects it)."""
    embed = "transformer.wte.weight" if architecture_of(config) == GPT2 else "model.embed_tokens.weight"
    return {g: gguf_layout(h, tensors.get(h, tensors[embed]) if h == "lm_head.weight" else tensors[h], config, True)
            for h, g in gguf_names(config).items()}


def _write_gguf(loaded: LoadedModel, tensors: dict[str, torch.Tensor], out: Path, quant: str, run_dir: Path) -> None:
    try:
        import gguf
    except ImportError:
        raise ExportError("--format gguf needs the gguf package: pip install 'lmtrain[hf]'") from None
    config = loaded.model.config
    arch = architecture_of(config)
    raw = json.loads(tokenizer_path(run_dir).read_text("utf-8"))
    if raw["model"].get("type") != "BPE" or "ByteLevel" not in json.dumps(raw.get("pre_tokenizer")):
        raise ExportError(f"GGUF holds byte-level BPE tokenizers (llama.cpp's gpt2 type); this run's is "
                          f"{raw['model'].get('type')} (tokenizer.model: unigram): export it with --format hf "
                          "instead, or train the run with tokenizer.model: bpe")
    merges = [m if isinstance(m, str) else " ".join(m) for m in raw["model"].get("merges", [])]
    tokenizer = loaded.tokenizer
    tokens = [tokenizer.id_to_token(i) for i in range(config.vocab_size)]
    specials = set(loaded.config.tokenizer.special_tokens)
    types = [gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t in tokens]
    file_type = gguf.LlamaFileType.ALL_F32 if quant == "f32" else getattr(gguf.LlamaFileType, f"MOSTLY_{quant.upper()}")

    def write_file(tmp: Path) -> None:
        writer = gguf.GGUFWriter(str(tmp), GGUF_ARCHS[arch])
        writer.add_name(loaded.config.run.name)
        writer.add_context_length(config.hf_context or config.block_size)
        writer.add_embedding_length(config.n_embd)
        writer.add_block_count(config.n_layer)
        writer.add_head_count(config.n_head)
        writer.add_feed_forward_length(config.mlp_width)
        if arch != GPT2:
            writer.add_head_count_kv(config.kv_heads)
            writer.add_layer_norm_rms_eps(config.eps)
            writer.add_rope_freq_base(config.rope_theta)
            writer.add_rope_dimension_count(config.head_size)
            if config.head_dim:  # a head size other than n_embd / n_head
                writer.add_key_length(config.head_size)
                writer.add_value_length(config.head_size)
            writer.add_vocab_size(config.vocab_size)
        else:
            writer.add_layer_norm_eps(config.eps)
        writer.add_file_type(file_type)
        writer.add_tokenizer_model("gpt2")  # byte-level BPE, in llama.cpp's words
        writer.add_tokenizer_pre("gpt-2")  # the GPT-2 split regex: what tokenizers' ByteLevel uses
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        writer.add_bos_token_id(loaded.eot_id)
        writer.add_eos_token_id(loaded.eot_id)
        writer.add_add_bos_token(False)
        template = read_template(tokenizer_path(run_dir).parent)
        if template is not None:  # llama.cpp's chat and server apply it; it stops at the end-of-turn token
            writer.add_chat_template(template)
            turn_end = end_of_turn_id(tokenizer_path(run_dir).parent, loaded.tokenizer,
                                      loaded.config.tokenizer.special_tokens[0])
            if turn_end is not None:
                writer.add_eot_token_id(turn_end)
        writer.add_string(GGUF_MARK, _export_mark(loaded, "gguf", run_dir))
        for name, tensor in gguf_tensors(tensors, config).items():
            writer.add_tensor(name, *_gguf_data(gguf, tensor, quant))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    _write_atomically(write_file, out, directory=False)


def _gguf_data(gguf, tensor: torch.Tensor, quant: str) -> tuple[Any, ...]:
    """(array,) or (quantized, its shape, its type) for ``GGUFWriter.add_tensor``: 1-D tensors (norms, biases) stay f32, as llama.cpp
    expects; matrices take ``quant``, or f16 where their rows do not split into its blocks."""
    array = tensor.detach().float().contiguous().numpy()
    if tensor.dim() == 1 or quant == "f32":
        return (array,)
    kind = getattr(gguf.GGMLQuantizationType, quant.upper())
    block = gguf.GGML_QUANT_SIZES[kind][0]
    if quant == "f16" or array.shape[-1] % block:
        return (array.astype("float16"),)
    quantized = gguf.quants.quantize(array, kind)  # uint8 rows of blocks (uint16 for bf16)
    return (quantized, quantized.shape, kind)  # the writer takes the byte shape and works out the rest


def read_gguf(path: Path, config) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A GGUF file this module wrote, read back: lmtrain's state dict (every tensor dequantized to
    fp32; the vocabulary unpadded, as ``hf_format.from_hf`` returns it) and the token list.
    ``config`` is the model's ``GPTConfig``."""
    import gguf

    from lmtrain.hf_format import from_hf

    try:
        tensors = read_tensors(path, config)
        field = gguf.GGUFReader(str(path)).fields["tokenizer.ggml.tokens"]
    except (OSError, ValueError) as exc:
        raise ExportError(f"{path} is not a readable GGUF file ({exc})") from None
    tokens = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
    if not config.tie_embeddings and "lm_head.weight" not in tensors:
        raise KeyError("output.weight")
    return from_hf(tensors, config), tokens


def load_gguf_into(loaded: LoadedModel, path: Path) -> None:
    """Replace ``loaded``'s weights by those of the GGUF export at ``path`` (dequantized), so that
    what quantization costs can be measured on the run's own val split. The file must hold this
    model's shape and the run's tokenizer."""
    model = loaded.model
    try:
        state, tokens = read_gguf(path, model.config)
    except KeyError as exc:
        raise ExportError(f"{path} lacks the tensor {exc.args[0]}: it was not exported from this run's model") from None
    run_tokens = [loaded.tokenizer.id_to_token(i) for i in range(model.config.vocab_size)]
    if tokens != run_tokens:
        raise ExportError(f"{path} holds another tokenizer than {loaded.config.run_dir}: it was not exported from this run")
    full = model.state_dict()
    with torch.no_grad():
        for key, value in state.items():
            target = full[key]
            if value.shape[1:] != target.shape[1:] or value.shape[0] > target.shape[0]:
                raise ExportError(f"{path}: {key} has shape {tuple(value.shape)}, this run's model {tuple(target.shape)}")
            target[: value.shape[0]].copy_(value.to(target.device))


def describe(result: ExportResult) -> str:
    return (f"exported {result.checkpoint} (step {result.step}) as {result.format} ({result.architecture}, "
            f"{result.params / 1e6:.2f}M parameters, vocab {result.vocab_size}) to {result.path}")
