"""GGUF import: a llama.cpp model file as a transformers-style checkpoint, for tinylm.hf.

`read_gguf(path)` reads a GGUF file with the `gguf` package (llama.cpp's own reader) and
returns what `tinylm.hf.import_checkpoint` takes: a transformers `config.json` (as a dict),
fp32 tensors under transformers' names, the tokenizer as a `tokenizer.json` (as a dict) and
the chat template. The CLI's `tinylm import-hf FILE.gguf RUN` joins the two.

What the format needs undoing:
- quantized tensors are dequantized to fp32 (`gguf.quants.dequantize`: Q4_0, Q4_1, Q5_0,
  Q5_1, Q8_0, the K-quants, F16, BF16, F32). The run holds the dequantized weights, which
  compute exactly what llama.cpp's dequantized weights compute;
- GGUF lists a tensor's dimensions fastest first (ne[0] = a row's length): reversed, they are
  PyTorch's shape;
- llama.cpp's converter permutes a Llama's q and k rows so that its rotary embedding can rotate
  adjacent pairs (GPT-J style); transformers and tinylm rotate halves (GPT-NeoX style), so the
  rows are permuted back. Qwen2/Qwen3 files are stored in NeoX order already;
- the tokenizer is stored as token strings, types and BPE merges; the pre-tokenizer is only a
  name (`tokenizer.ggml.pre`), which maps to the split rules of the model's own tokenizer.json.
Supported: the Llama and Qwen (2, 3) families with a BPE ("gpt2") tokenizer. Anything else is
a one-line UserError naming what is not supported.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tinylm.errors import UserError

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM"}
QUANT_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K",
               "Q4_K", "Q5_K", "Q6_K")

# GGUF tensor names inside a block -> transformers' (under model.layers.N.)
LAYER_NAMES = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj",
               "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
               "attn_k_norm": "self_attn.k_norm", "ffn_norm": "post_attention_layernorm",
               "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
             "output": "lm_head"}

# The split rules of each tokenizer.ggml.pre this reader knows, as in the models' own
# tokenizer.json files (the regexes are those of llama.cpp's llama-vocab.cpp / the HF files).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?"
                 r"[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?"
                r"[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = ("gpt2", "default", "smollm", "qwen2", "llama-bpe")


def _field(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _f32(value: float) -> float:
    """A float32 metadata value as the decimal it was written from (1e-5, not
    9.99999974e-06): the shortest decimal that rounds to the same float32."""
    return float(str(np.float32(value)))


def read_gguf(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor],
                                          dict[str, Any], str | None]:
    """(config.json dict, fp32 tensors with transformers' names, tokenizer.json dict, chat
    template or None) of a GGUF file; a UserError for what tinylm cannot import."""
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such GGUF file")
    try:
        reader = GGUFReader(str(path))
    except (ValueError, OSError) as e:
        raise UserError(f"{path} is not a readable GGUF file ({e})") from None
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise UserError(f"{path}: GGUF architecture {arch!r} is not supported; tinylm imports "
                        f"{', '.join(ARCHITECTURES)}")
    if any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise UserError(f"{path}: the file has rope_freqs (a Llama 3.1 scaled rope stored as "
                        "factors); import the transformers folder instead")
    check_types(reader, path)
    tokenizer = tokenizer_json(reader, path)
    cfg = gguf_config(reader, arch, len(_field(reader, "tokenizer.ggml.tokens") or []), path)
    tensors = read_tensors(reader, arch, cfg, path)
    cfg["tie_word_embeddings"] = "lm_head.weight" not in tensors
    return cfg, tensors, tokenizer, _field(reader, "tokenizer.chat_template")


def check_types(reader, path: Path) -> None:
    """A UserError for the first tensor of a type tinylm does not dequantize."""
    from gguf import GGMLQuantizationType

    for t in reader.tensors:
        kind = GGMLQuantizationType(t.tensor_type).name
        if kind not in QUANT_TYPES:
            raise UserError(f"{path}: tensor {t.name} is {kind}, which tinylm does not "
                            f"dequantize; use a file of {', '.join(QUANT_TYPES)}")


def gguf_config(reader, arch: str, n_tokens: int, path: Path) -> dict[str, Any]:
    """The transformers config.json the GGUF metadata describes."""
    def get(key: str, default: Any = None) -> Any:
        return _field(reader, f"{arch}.{key}", default)

    for key in ("embedding_length", "attention.head_count", "block_count",
                "feed_forward_length", "context_length"):
        if get(key) is None:
            raise UserError(f"{path}: the GGUF metadata has no {arch}.{key}; the file is "
                            "incomplete")
    heads = get("attention.head_count")
    d = get("embedding_length")
    cfg = {"architectures": [ARCHITECTURES[arch]], "model_type": arch, "hidden_size": d,
           "intermediate_size": get("feed_forward_length"),
           "num_hidden_layers": get("block_count"), "num_attention_heads": heads,
           "num_key_value_heads": get("attention.head_count_kv", heads),
           "head_dim": get("attention.key_length", d // heads), "hidden_act": "silu",
           "max_position_embeddings": get("context_length"),
           "rms_norm_eps": _f32(get("attention.layer_norm_rms_epsilon", 1e-6)),
           "rope_theta": _f32(get("rope.freq_base", 10000.0)),
           "vocab_size": get("vocab_size", n_tokens), "torch_dtype": "float32",
           "dtype": "float32", "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
           "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
           "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id")}
    rope = {"rope_theta": cfg["rope_theta"], "rope_type": "default"}
    scaling = get("rope.scaling.type", "none")
    if scaling == "linear":
        rope |= {"rope_type": "linear", "factor": _f32(get("rope.scaling.factor", 1.0))}
    elif scaling not in ("none", None):
        rope["rope_type"] = scaling  # refused by tinylm.hf.gpt_config with a one-line error
    cfg["rope_parameters"] = rope
    if arch == "llama":
        cfg |= {"attention_bias": False, "mlp_bias": False}
    return cfg


def read_tensors(reader, arch: str, cfg: dict[str, Any], path: Path
                 ) -> dict[str, torch.Tensor]:
    """Every tensor, dequantized to fp32, under transformers' names and layouts."""
    from gguf.quants import dequantize

    out = {}
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))  # GGUF lists ne[0] first
        w = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)
                             ).reshape(shape)
        name = hf_name(t.name, path)
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            n = cfg["num_attention_heads"] if "q_proj" in name else cfg["num_key_value_heads"]
            w = unpermute(w, n)
        out[name] = w
    return out


def hf_name(name: str, path: Path) -> str:
    """blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight, and the top tensors."""
    stem, _, kind = name.rpartition(".")
    if stem in TOP_NAMES:
        return f"{TOP_NAMES[stem]}.{kind}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in LAYER_NAMES:
        return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.{kind}"
    raise UserError(f"{path}: tensor {name!r} has no place in a Llama/Qwen model")


def unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k permutation: its converter turns each head's rows from halves
    [x0..x(D/2-1), y0..] into interleaved pairs [x0, y0, x1, y1, ...] (its rope rotates
    adjacent pairs); rows (n_head * D, in) back to halves."""
    D = w.shape[0] // n_head
    return w.reshape(n_head, D // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def tokenizer_json(reader, path: Path) -> dict[str, Any]:
    """The GGUF vocabulary as a tokenizers BPE (byte-level, with the model's pre-tokenizer);
    control and user-defined tokens become special added tokens, as in the original."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    model = _field(reader, "tokenizer.ggml.model")
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if model != "gpt2":
        raise UserError(f"{path}: tokenizer model {model!r} is not supported (tinylm reads "
                        "GGUF BPE tokenizers, 'gpt2'); import the transformers folder instead")
    if pre not in PRE_TOKENIZERS:
        raise UserError(f"{path}: pre-tokenizer {pre!r} is not known to tinylm (it knows "
                        f"{', '.join(PRE_TOKENIZERS)})")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    types = list(_field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges") or []]
    hf = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                ignore_merges=pre == "llama-bpe"))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        hf.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("qwen2", "llama-bpe"):
        split = _QWEN2_SPLIT if pre == "qwen2" else _LLAMA3_SPLIT
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        hf.pre_tokenizer = byte_level
    hf.decoder = decoders.ByteLevel()
    special = [t for t, kind in zip(tokens, types) if kind in (3, 4)]  # CONTROL, USER_DEFINED
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    return json.loads(hf.to_str())
