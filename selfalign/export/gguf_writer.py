"""Write a merged transformers model as one GGUF file that llama.cpp, Ollama and LM Studio load.

The file is written with the `gguf` package's `GGUFWriter`; tensor names come from the same
package's `TensorNameMap`, the table llama.cpp's own converter (`convert_hf_to_gguf.py`) and
transformers' GGUF reader both use. What llama.cpp expects beyond names, per architecture:

- llama: the q and k projections are stored with their rotary halves interleaved (llama.cpp's
  `LlamaModel.permute`), and the metadata names the head size as `rope.dimension_count`;
- gemma3: every RMSNorm weight is stored as `1 + w` (transformers' Gemma norm multiplies by
  `1 + w`, llama.cpp's by the stored weight); the output layer is tied to the embedding, so only
  `token_embd` is written; head size goes in `attention.key_length`/`value_length`, plus the
  sliding window.

Weights: 1-D tensors (norms) stay float32, as llama.cpp's converter keeps them; matrices are f16,
or q8_0 when asked (a matrix whose rows do not split into 32-value blocks stays f16, as llama.cpp
does). The vocabulary: copied from the GGUF the base model came from when there is one (the
embedded gemma is such a round trip), else built from `tokenizer.json` (byte-level BPE as
`gpt2`, sentencepiece-style BPE with byte fallback through `gguf.LlamaHfVocab` as `llama`).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from selfalign.core.chat import adds_bos
from selfalign.core.errors import SelfAlignError

# transformers model_type -> GGUF architecture name
SUPPORTED = {"llama": "llama", "gemma3_text": "gemma3"}
FORMATS = ("f16", "q8_0")


def gguf_arch(model_type: str) -> str:
    """The GGUF architecture for a transformers `model_type`, or a one-line error naming it."""
    if model_type not in SUPPORTED:
        raise SelfAlignError(
            f"GGUF export does not support the architecture {model_type!r} (supported: {', '.join(SUPPORTED)})",
            "export without --gguf and convert the folder with llama.cpp's convert_hf_to_gguf.py",
        )
    return SUPPORTED[model_type]


def permute_rotary(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k layout for llama: within each head, interleave the two rotary halves.

    transformers' GGUF reader undoes exactly this (`LlamaTensorProcessor._reverse_permute_weights`)."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _rope_theta(config, layer_type: str = "full_attention") -> float:
    """rope_theta from a transformers 5 config (`rope_parameters`, maybe per layer type) or an older one."""
    params = getattr(config, "rope_parameters", None) or {}
    if layer_type in params and isinstance(params[layer_type], dict):
        params = params[layer_type]
    kind = params.get("rope_type", "default")
    if kind != "default":
        raise SelfAlignError(f"GGUF export does not write rope scaling of type {kind!r} yet",
                             "export without --gguf and convert the folder with llama.cpp's convert_hf_to_gguf.py")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise SelfAlignError("the model config names no rope_theta; cannot write GGUF rope metadata")
    return float(theta)


def _check_gemma3_fixed_hparams(config) -> None:
    """llama.cpp's gemma3 reads no metadata for these and assumes Gemma 3's values: every 6th layer
    global, a local rope base of 10000. A model that differs would load and silently compute wrong."""
    n = config.num_hidden_layers
    pattern = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n)]
    if getattr(config, "layer_types", None) and list(config.layer_types) != pattern:
        raise SelfAlignError("GGUF export: this gemma3 model's sliding/global layer pattern is not llama.cpp's "
                             "fixed one (every 6th layer global)")
    local = _rope_theta(config, "sliding_attention") if "sliding_attention" in (
        getattr(config, "rope_parameters", None) or {}) else 10000.0
    if local != 10000.0:
        raise SelfAlignError(f"GGUF export: gemma3 local rope base {local} differs from llama.cpp's fixed 10000")


def _write_hparams(writer, arch: str, config) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(_rope_theta(config))
    if arch == "llama":
        writer.add_vocab_size(config.vocab_size)
        writer.add_rope_dimension_count(head_dim)
        if head_dim != config.hidden_size // config.num_attention_heads:
            writer.add_key_length(head_dim)
            writer.add_value_length(head_dim)
    elif arch == "gemma3":
        _check_gemma3_fixed_hparams(config)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_sliding_window(config.sliding_window)


def _tensor_name(name_map, hf_name: str) -> str:
    base, suffix = hf_name.rsplit(".", 1) if hf_name.endswith((".weight", ".bias")) else (hf_name, "")
    mapped = name_map.get_name(base)
    if mapped is None:
        raise SelfAlignError(f"GGUF export: no llama.cpp name for tensor {hf_name!r}")
    return mapped + ("." + suffix if suffix else "")


def gguf_tensors(model, arch: str):
    """Yield (GGUF name, float32 numpy array) for every tensor llama.cpp needs, transformed as it expects."""
    import gguf

    config = model.config
    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    name_map = gguf.get_tensor_name_map(arch_enum, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and tied:
            continue  # llama.cpp reuses token_embd when output.weight is absent
        name = _tensor_name(name_map, hf_name)
        data = tensor.detach().float().cpu().numpy()
        if arch == "llama" and name.endswith("attn_q.weight"):
            data = permute_rotary(data, config.num_attention_heads)
        elif arch == "llama" and name.endswith("attn_k.weight"):
            data = permute_rotary(data, config.num_key_value_heads)
        elif arch == "gemma3" and name.endswith("norm.weight"):
            data = data + 1.0
        yield name, data


def _encode(data: np.ndarray, fmt: str):
    """(array to write, its GGML type or None for a plain numpy dtype)."""
    import gguf

    if data.ndim <= 1:
        return data.astype(np.float32), None
    if fmt == "q8_0" and data.shape[-1] % 32 == 0:
        qtype = gguf.GGMLQuantizationType.Q8_0
        return gguf.quants.quantize(data.astype(np.float32), qtype), qtype
    return data.astype(np.float16), None


# -- vocabulary ---------------------------------------------------------------------------------
def _copy_tokenizer_fields(writer, source_gguf: Path) -> None:
    """Copy every `tokenizer.ggml.*` field of the GGUF the base came from (not its chat template)."""
    import gguf

    reader = gguf.GGUFReader(str(source_gguf))
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer.ggml."):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)


def _byte_level_vocab(writer, tokenizer, tok_json: dict, vocab_size: int) -> None:
    import gguf

    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    special = set(tokenizer.all_special_ids)
    tokens, types = [], []
    for i in range(vocab_size):
        if i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL)
        else:  # embedding rows beyond the tokenizer: llama.cpp's converter names them the same way
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok_json["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # A pure byte vocabulary (the tiny test models) has no merges, and GGUF cannot hold an empty
    # array: the key is then absent, which transformers reads (merges rebuilt from the all-equal
    # scores: none) but llama.cpp refuses. Every real byte-level BPE vocabulary has merges.
    writer.add_token_merges(merges)
    writer.add_token_scores([0.0] * len(tokens))


def _sentencepiece_vocab(writer, tokenizer) -> None:
    import gguf

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        vocab = gguf.LlamaHfVocab(Path(tmp))
        tokens, scores, types = zip(*vocab.all_tokens(), strict=True)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(list(tokens))
    writer.add_token_scores(list(scores))
    writer.add_token_types(list(types))


def _write_vocab(writer, tokenizer, vocab_size: int, source_gguf: Path | None) -> None:
    if source_gguf is not None and Path(source_gguf).exists():
        _copy_tokenizer_fields(writer, Path(source_gguf))
        return
    tok_json = json.loads(tokenizer.backend_tokenizer.to_str())
    model = tok_json.get("model", {})
    if model.get("type") == "BPE" and not model.get("byte_fallback"):
        _byte_level_vocab(writer, tokenizer, tok_json, vocab_size)
    elif model.get("type") == "BPE":
        _sentencepiece_vocab(writer, tokenizer)
    else:
        raise SelfAlignError(f"GGUF export: tokenizer model {model.get('type')!r} is not supported (BPE only)")
    for token_id, add in ((tokenizer.bos_token_id, writer.add_bos_token_id),
                          (tokenizer.eos_token_id, writer.add_eos_token_id),
                          (tokenizer.unk_token_id, writer.add_unk_token_id),
                          (tokenizer.pad_token_id, writer.add_pad_token_id)):
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(adds_bos(tokenizer))
    writer.add_add_eos_token(False)


def write_gguf(model, tokenizer, path: Path, fmt: str = "f16", name: str = "selfalign model",
               chat_template: str | None = None, source_gguf: Path | None = None) -> Path:
    """Write `model` (a merged, plain transformers causal LM) and its vocabulary to one GGUF file."""
    import gguf

    if fmt not in FORMATS:
        raise SelfAlignError(f"unknown GGUF format {fmt!r}", f"use one of {', '.join(FORMATS)}")
    arch = gguf_arch(model.config.model_type)
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    writer = gguf.GGUFWriter(str(tmp), arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if fmt == "q8_0" else gguf.LlamaFileType.MOSTLY_F16)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _write_hparams(writer, arch, model.config)
    _write_vocab(writer, tokenizer, model.config.vocab_size, source_gguf)
    if chat_template:
        writer.add_chat_template(chat_template)
    for tname, data in gguf_tensors(model, arch):
        array, qtype = _encode(data, fmt)
        writer.add_tensor(tname, array, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(path)
    return path
