"""Tiny random-weight models of every supported architecture, built in-process (no download)."""

from __future__ import annotations

import string

import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Olmo2Config,
    Phi3Config,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from steerlab.models.model import Model

CHARS = string.ascii_letters + string.digits + string.punctuation + " "
SPECIALS = ["<pad>", "<eos>", "<bos>"]
VOCAB = {t: i for i, t in enumerate(SPECIALS + list(CHARS))}
V = len(VOCAB)


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer: one token per character, <bos> prepended."""
    tk = Tokenizer(models.WordLevel(VOCAB, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    from tokenizers import processors

    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")


_COMMON = dict(vocab_size=V, pad_token_id=0, eos_token_id=1, bos_token_id=2)


def configs() -> dict:
    return {
        "llama": LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True, **_COMMON),
        "mistral": MistralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=128, sliding_window=None, **_COMMON),
        "qwen2": Qwen2Config(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=128, **_COMMON),
        "gemma3_text": Gemma3TextConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=1, head_dim=8,
                                        max_position_embeddings=128, sliding_window=16, **_COMMON),
        "qwen3": Qwen3Config(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=8, max_position_embeddings=128, **_COMMON),
        "gemma": GemmaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=1, head_dim=8, max_position_embeddings=128, **_COMMON),
        "gemma2": Gemma2Config(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=8, max_position_embeddings=128, sliding_window=16,
                               **_COMMON),
        "phi3": Phi3Config(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=128, original_max_position_embeddings=128,
                           **_COMMON),
        "olmo2": Olmo2Config(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=128, **_COMMON),
        "gpt2": GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=128, **_COMMON),
        "gpt_neox": GPTNeoXConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                  max_position_embeddings=128, **_COMMON),
    }


ARCHS = list(configs())


def tiny_model(arch: str = "llama", seed: int = 0) -> Model:
    torch.manual_seed(seed)
    cfg = configs()[arch]
    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # random weights with a larger scale than init so differences show up in tests
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
    return Model.wrap(hf, char_tokenizer(), name=f"tiny-{arch}")


PROMPTS = ["hello world", "a", "The quick brown fox!", "steer me"]


def model_dir(tmp_path, arch: str = "llama", seed: int = 0) -> str:
    """A tiny model and its tokenizer saved to ``tmp_path / "tiny"`` (``tiny<seed>`` for other seeds), for the
    command line."""
    m = tiny_model(arch, seed=seed)
    d = tmp_path / ("tiny" if seed == 0 else f"tiny{seed}")
    m.hf.save_pretrained(d)
    m.tok.save_pretrained(d)
    return str(d)


def flat(output: str) -> str:
    """Command-line output with rich's box characters and line wrapping removed, for matching messages."""
    return " ".join(output.translate({ord(c): " " for c in "│╭╮╰╯─"}).split())


def token_by_token_logits(model: Model, ids: torch.Tensor) -> torch.Tensor:
    """Logits ``[T, V]`` of feeding ``ids`` (one row) one token per call with the KV cache, as
    generation does: what a last-position edit sees at every step."""
    steps, past = [], None
    with torch.no_grad():
        for t in range(ids.shape[1]):
            out = model.hf(input_ids=ids[:, t:t + 1], past_key_values=past, use_cache=True)
            past = out.past_key_values
            steps.append(out.logits[0, -1])
    return torch.stack(steps)


def first_real_tokens(mask: torch.Tensor) -> torch.Tensor:
    """Bool ``[B, T]``: the first real (unpadded) position of each left-padded row, found by a loop."""
    out = torch.zeros(mask.shape, dtype=torch.bool)
    for b in range(mask.shape[0]):
        cols = [t for t in range(mask.shape[1]) if mask[b, t]]
        if len(cols) > 1:  # a one-token row keeps its token
            out[b, cols[0]] = True
    return out
