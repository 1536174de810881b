"""Write a Llama-architecture causal LM as a GGUF file that llama.cpp (and Ollama) load.

Names, layout and metadata follow llama.cpp's ``convert_hf_to_gguf.py`` (``LlamaModel``):

* tensors ``token_embd``, ``output_norm``, ``output`` (absent when tied to the embedding),
  ``blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm, ffn_gate, ffn_up, ffn_down}``;
* Q and K rows permuted from Hugging Face's rotary layout (first half / second half of each
  head) to llama.cpp's interleaved one: per head, rows ``(2, d/2)`` become ``(d/2, 2)``.
  transformers' own GGUF loader undoes exactly this, so a round trip gives the same model;
* the tokenizer as ``gpt2`` (byte-level BPE): tokens, merges, token types (control for special
  added tokens, user-defined for other added ones), bos/eos/unk/pad ids, chat template.

Tensor types (``GGUF_TYPES``): f32; f16 or bf16 for the matrices with norms kept f32; q8_0
(blocks of 32 weights with one f16 scale, quantised in numpy by the ``gguf`` package), with a
matrix whose rows do not split into blocks of 32 kept f16. The pre-tokenizer is named
``smollm`` for the SmolLM2 tokenizer and ``default`` for any other (llama.cpp identifies a
tokenizer by hashing its output on a test text; fedtune does not carry that table).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from fedtune.errors import ModelError

log = logging.getLogger(__name__)

GGUF_TYPES = ("float32", "float16", "bfloat16", "q8_0")
TYPE_LABEL = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "q8_0": "Q8_0"}
Q8_BLOCK = 32
SMOLLM_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 of the SmolLM2 tokenizer

LAYER_TENSORS = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def permute_rotary(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Hugging Face Q/K rows -> llama.cpp's: (n_head, 2, d/2, in) -> (n_head, d/2, 2, in). w: (n_head*d, in)"""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(state: dict[str, torch.Tensor], config) -> list[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor) for every weight of a Llama state dict, Q/K permuted."""
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    out, left = [], dict(state)
    for hf, name in (("model.embed_tokens.weight", "token_embd.weight"), ("model.norm.weight", "output_norm.weight")):
        out.append((name, left.pop(hf)))
    head = left.pop("lm_head.weight", None)
    if head is not None and not config.tie_word_embeddings:
        out.append(("output.weight", head))
    for i in range(config.num_hidden_layers):
        for hf, name in LAYER_TENSORS.items():
            w = left.pop(f"model.layers.{i}.{hf}.weight")
            if name == "attn_q":
                w = permute_rotary(w, n_head)
            elif name == "attn_k":
                w = permute_rotary(w, n_kv)
            out.append((f"blk.{i}.{name}.weight", w))
    if left:
        raise ModelError(f"GGUF export: unexpected tensors {sorted(left)[:3]} in a Llama model; export --format hf instead")
    return out


def check_llama(config) -> None:
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    problems = []
    if config.model_type != "llama":
        problems.append(f"model_type is {config.model_type}, not llama")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        problems.append("it has attention or MLP biases")
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        problems.append(f"its rope scaling is {rope.get('rope_type', rope.get('type'))}")
    if problems:
        raise ModelError(f"GGUF export writes plain Llama models, and {'; '.join(problems)}; export --format hf and "
                         "convert it with llama.cpp's convert_hf_to_gguf.py")


def write_gguf(path: Path, model, tokenizer, *, dtype: str, name: str) -> None:
    """Write ``model`` (a transformers Llama, weights on CPU) and ``tokenizer`` as one GGUF file."""
    import gguf

    config = model.config
    check_llama(config)
    writer = gguf.GGUFWriter(str(path), "llama")
    _add_hparams(writer, config, dtype, name)
    _add_tokenizer(writer, tokenizer, config.vocab_size)
    for tname, t in gguf_tensors(model.state_dict(), config):
        data, raw = _encode(t, dtype)
        writer.add_tensor(tname, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _add_hparams(writer, config, dtype: str, name: str) -> None:
    import gguf

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    file_type = {"float32": gguf.LlamaFileType.ALL_F32, "float16": gguf.LlamaFileType.MOSTLY_F16,
                 "bfloat16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    writer.add_file_type(file_type)
    if dtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _encode(t: torch.Tensor, dtype: str):
    """(numpy data, raw GGML type or None) of one tensor; 1-D tensors (norms) stay float32."""
    import gguf

    a = t.detach().to("cpu", torch.float32).numpy()
    if a.ndim == 1 or dtype == "float32":
        return a, None
    if dtype == "bfloat16":
        return gguf.quants.quantize(a, gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16
    if dtype == "q8_0" and a.shape[-1] % Q8_BLOCK == 0:
        return gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return a.astype(np.float16), None


def _add_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    """Byte-level BPE vocabulary as llama.cpp's ``gpt2`` tokenizer model."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    if spec.get("model", {}).get("type") != "BPE":
        raise ModelError("GGUF export needs a byte-level BPE tokenizer (tokenizer.json with a BPE model); export --format hf instead")
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder  # id -> AddedToken
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL if i not in added else
                         gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_add_space_prefix(False)  # byte-level BPE: spaces are in the tokens
    writer.add_tokenizer_pre("smollm" if tokens[:3] == SMOLLM_SPECIALS and vocab_size == 49152 else "default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for setter, tid in ((writer.add_bos_token_id, tokenizer.bos_token_id), (writer.add_eos_token_id, tokenizer.eos_token_id),
                        (writer.add_unk_token_id, tokenizer.unk_token_id), (writer.add_pad_token_id, tokenizer.pad_token_id)):
        if tid is not None:
            setter(int(tid))
    ids = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(bool(ids) and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)
