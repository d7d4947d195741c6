"""Write a tiny Llama-architecture model (a test fixture's random twin) as an F32 GGUF file, so the
llama.cpp engine can be tested offline on the same weights the transformers engine runs.

    python -c "from tests.tiny_gguf import write_llama_gguf; write_llama_gguf('/tmp/tiny-llama', '/tmp/tiny.gguf')"

Only what llama.cpp needs to load a `llama` model: hyper-parameters, the byte-level BPE vocabulary and
merges ("gpt2" tokenizer, GPT-2 pre-tokenizer), special tokens, the chat template, and the tensors under
llama.cpp's names. Query and key projections are re-ordered because transformers rotates the two halves
of each head while llama.cpp rotates adjacent pairs: the same rotation, so both engines compute the same
logits (tests/test_engines.py checks it).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def interleave_heads(weight: np.ndarray, heads: int) -> np.ndarray:
    """(heads * head_dim, hidden) with each head's rotary halves [x0..x(d/2-1), y0..] laid out as
    pairs [x0, y0, x1, y1, …], the order llama.cpp's rope expects."""
    rows, cols = weight.shape
    half = rows // heads // 2
    return weight.reshape(heads, 2, half, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def write_llama_gguf(model_dir: str | Path, out_path: str | Path) -> Path:
    """Convert a saved LlamaForCausalLM + fast BPE tokenizer directory to an F32 GGUF file."""
    import gguf
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    c = model.config
    head_dim = c.hidden_size // c.num_attention_heads
    writer = gguf.GGUFWriter(str(out_path), "llama")
    writer.add_name(Path(model_dir).name)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"] if getattr(c, "rope_parameters", None)
                              else c.rope_theta)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(c.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    vocab = tok.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = set(tok.all_special_ids) | set(tok.added_tokens_decoder)  # "<|im_start|>" is one token in text
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
                            for i in range(len(tokens))])
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(tok.bos_token_id)
    writer.add_eos_token_id(tok.eos_token_id)
    writer.add_add_bos_token(False)
    if tok.chat_template:
        writer.add_chat_template(tok.chat_template)

    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        writer.add_tensor(f"blk.{i}.attn_norm.weight", state[p + "input_layernorm.weight"])
        writer.add_tensor(f"blk.{i}.attn_q.weight",
                          interleave_heads(state[p + "self_attn.q_proj.weight"], c.num_attention_heads))
        writer.add_tensor(f"blk.{i}.attn_k.weight",
                          interleave_heads(state[p + "self_attn.k_proj.weight"], c.num_key_value_heads))
        writer.add_tensor(f"blk.{i}.attn_v.weight", state[p + "self_attn.v_proj.weight"])
        writer.add_tensor(f"blk.{i}.attn_output.weight", state[p + "self_attn.o_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", state[p + "post_attention_layernorm.weight"])
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", state[p + "mlp.gate_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_up.weight", state[p + "mlp.up_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_down.weight", state[p + "mlp.down_proj.weight"])
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    writer.add_tensor("output.weight", state.get("lm_head.weight", state["model.embed_tokens.weight"]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(out_path)
