"""Tiny random models of real architectures, built in-process: what the tests run on.

`tiny:llama` and `tiny:gemma3` are 2-layer models with a byte-level tokenizer made here (256
byte tokens plus 4 specials), so nothing is downloaded and every code path (batching, padding,
chat rendering, LoRA, TRL trainers, save/load) runs as it does on a real model, in seconds.
"""

from __future__ import annotations

from pathlib import Path

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
TINY_ARCHES = ("llama", "gemma3")


def build_byte_tokenizer():
    """A byte-level BPE tokenizer with no merges: every UTF-8 byte is one token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in sorted(byte_chars):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def build_tiny_model(arch: str = "llama", seed: int = 0, vocab_size: int = 260):
    """A 2-layer, 64-wide random causal LM of a real architecture."""
    import torch
    from transformers import AutoModelForCausalLM

    if arch == "llama":
        from transformers import LlamaConfig

        config = LlamaConfig(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
        )
    elif arch == "gemma3":
        from transformers import Gemma3TextConfig

        config = Gemma3TextConfig(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
            sliding_window=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        )
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {', '.join(TINY_ARCHES)}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Wider-than-default init so a random model's next-token distribution is far from uniform:
    # tests of sampling, scoring and training then see real differences between texts.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    model.generation_config.pad_token_id = 0
    model.generation_config.bos_token_id = 1
    model.generation_config.eos_token_id = 2
    return model


def save_tiny_model(arch: str, folder: str | Path, seed: int = 0) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    build_tiny_model(arch, seed=seed).save_pretrained(folder)
    build_byte_tokenizer().save_pretrained(folder)
    return folder
