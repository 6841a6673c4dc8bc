"""Tiny Hugging Face models built from configs (no download), one per family seqloss.hf supports."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

V = 61  # not a power of two


def gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=V, n_positions=32, n_embd=16, n_layer=1, n_head=2, bos_token_id=1, eos_token_id=1,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32, bos_token_id=1, eos_token_id=2, pad_token_id=0))


def t5():
    return transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=V, d_model=16, d_ff=32, d_kv=8, num_layers=1, num_heads=2, dropout_rate=0.0,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))


def bart():
    return transformers.BartForConditionalGeneration(transformers.BartConfig(
        vocab_size=V, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
        dropout=0.0, attention_dropout=0.0, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        decoder_start_token_id=2, forced_eos_token_id=None))


def blip(label_smoothing=0.1):
    text = dict(vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                max_position_embeddings=32, bos_token_id=3, sep_token_id=2, pad_token_id=0,
                label_smoothing=label_smoothing, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    vision = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                  image_size=16, patch_size=8)
    return transformers.BlipForConditionalGeneration(transformers.BlipConfig(text_config=text, vision_config=vision))


def ids(B=3, N=9, seed=0, low=3):
    return torch.randint(low, V, (B, N), generator=torch.Generator().manual_seed(seed))


def causal_batch(prefix=0, seed=0):
    """input_ids and labels; ``prefix`` leading positions masked -100 (a LLaVA-style image/prompt prefix)."""
    x = ids(seed=seed)
    labels = x.clone()
    labels[:, :prefix] = -100
    labels[0, -2:] = -100                                    # right padding in one row
    return dict(input_ids=x, attention_mask=torch.ones_like(x), labels=labels)


def seq2seq_batch(seed=0):
    labels = ids(N=6, seed=seed + 1)
    labels[1, 4:] = -100
    return dict(input_ids=ids(seed=seed), labels=labels)


def blip_batch(seed=0):
    x = ids(N=8, seed=seed)
    x[:, 0] = 3
    x[0, 6:] = 0
    return dict(pixel_values=torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(seed)),
                input_ids=x, attention_mask=(x != 0).long(), labels=x.masked_fill(x == 0, -100))


FAMILIES = {
    "gpt2": (gpt2, causal_batch),
    "llama": (llama, causal_batch),
    "llava-style": (llama, lambda seed=0: causal_batch(prefix=4, seed=seed)),
    "t5": (t5, seq2seq_batch),
    "bart": (bart, seq2seq_batch),
    "blip": (blip, blip_batch),
}
