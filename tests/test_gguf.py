"""GGUF import: small llama.cpp files written here with the `gguf` package (random GQA Llama
and Qwen2 models from transformers, quantized tensor by tensor) import with the logits of the
same dequantized weights in transformers, and the file's tokenizer and chat template."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from tinylm import rundir
from tinylm.cli import main
from tinylm.tokenizer import Tokenizer

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
warnings.filterwarnings("ignore", module="transformers")
transformers.logging.set_verbosity_error()
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf.quants import dequantize, quantize  # noqa: E402

TEXT = "Once upon a time, a small dog found a red ball in the park. 12 345\n" * 20
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
          "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\\n' }}{% endif %}")
# A different GGML type for each kind of tensor, so every dequantizer is exercised.
TYPES = {"attn_q": Q.Q8_0, "attn_k": Q.Q4_0, "attn_v": Q.Q4_1, "attn_output": Q.Q5_0,
         "ffn_gate": Q.Q5_1, "ffn_up": Q.F16, "ffn_down": Q.BF16, "token_embd": Q.Q8_0}


def chatml_tokenizer():
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    t = HFTokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320,
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    t.train_from_iterator([TEXT], trainer)
    return t


def hf_model(kind: str, vocab: int):
    torch.manual_seed(0)
    common = dict(vocab_size=vocab, bos_token_id=1, eos_token_id=2, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
                  intermediate_size=128, max_position_embeddings=128, rms_norm_eps=1e-5,
                  rope_theta=100000.0, tie_word_embeddings=True)
    cls = transformers.LlamaConfig if kind == "llama" else transformers.Qwen2Config
    model = transformers.AutoModelForCausalLM.from_config(cls(**common)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py permutation of Llama q/k rows (halves -> pairs)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


GGUF_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
              "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def gguf_name(name: str) -> str:
    if name.startswith("model.layers."):
        _, _, i, rest = name.split(".", 3)
        module, kind = rest.rsplit(".", 1)
        return f"blk.{i}.{GGUF_NAMES[module]}.{kind}"
    return {"model.embed_tokens.weight": "token_embd.weight",
            "model.norm.weight": "output_norm.weight"}[name]


def write_gguf(path, kind: str, model, tok) -> dict[str, torch.Tensor]:
    """The model as llama.cpp would store it; returns the dequantized weights (transformers'
    names), what both sides must compute with."""
    c = model.config
    w = gguf.GGUFWriter(str(path), kind)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(100000.0)
    data = json.loads(tok.to_str())
    vocab = sorted(data["model"]["vocab"].items(), key=lambda kv: kv[1])
    special = {t["content"] for t in data["added_tokens"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t in special else 1 for t, _ in vocab])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m
                        for m in data["model"]["merges"]])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(CHATML)
    dequantized = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied: llama.cpp writes no output.weight
        a = t.numpy().astype(np.float32)
        if kind == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            a = permute(a, c.num_attention_heads if "q_proj" in name else c.num_key_value_heads)
        qtype = TYPES.get(gguf_name(name).split(".")[-2], Q.F32) if a.ndim == 2 else Q.F32
        stored = quantize(a, qtype)
        w.add_tensor(gguf_name(name), stored, raw_shape=stored.shape, raw_dtype=qtype)
        back = dequantize(stored, qtype).reshape(a.shape)
        if kind == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            n = c.num_attention_heads if "q_proj" in name else c.num_key_value_heads
            back = back.reshape(n, back.shape[0] // n // 2, 2, -1).swapaxes(1, 2).reshape(
                a.shape)
        dequantized[name] = torch.from_numpy(np.ascontiguousarray(back))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dequantized


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_a_gguf_file_imports_with_the_logits_of_its_dequantized_weights(tmp_path, kind):
    import tinylm
    from tinylm.data.chat import render

    tok = chatml_tokenizer()
    model = hf_model(kind, tok.get_vocab_size())
    weights = write_gguf(tmp_path / "m.gguf", kind, model, tok)
    assert main(["import-hf", str(tmp_path / "m.gguf"), str(tmp_path / "run")]) == 0
    model.load_state_dict(weights, strict=False)  # transformers on the same dequantized weights
    ours, ttok = tinylm.load(tmp_path / "run")
    text = "Once upon a time, 12 dogs."
    ids = ttok.encode(text)
    assert ids == tok.encode(text, add_special_tokens=False).ids
    x = torch.tensor([ids])
    with torch.no_grad():
        theirs = model(x).logits
        mine = ours(x)
    assert (mine - theirs).abs().max().item() <= 1e-4
    c = ours.config
    assert (c.kv_heads, c.tie_embeddings, c.norm_eps, c.rope_theta) == (2, True, 1e-5, 1e5)
    assert c.qkv_bias == (kind == "qwen2")
    assert (ttok.bos_id, ttok.eos_id, ttok.vocab_size) == (1, 2, tok.get_vocab_size())
    assert ttok.id_to_token(ttok.eos_id) == "<|im_end|>"
    template = rundir.chat_template(tmp_path / "run")
    assert template == CHATML
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "A dog."}]
    rendered = render(ttok, conversation, template)
    assert rendered.ids[0] == 1 and sum(rendered.mask) > 0


def test_export_of_a_gguf_import_loads_in_transformers(tmp_path):
    tok = chatml_tokenizer()
    model = hf_model("llama", tok.get_vocab_size())
    weights = write_gguf(tmp_path / "m.gguf", "llama", model, tok)
    assert main(["import-hf", str(tmp_path / "m.gguf"), str(tmp_path / "run")]) == 0
    assert main(["export-hf", str(tmp_path / "run"), str(tmp_path / "hf")]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    model.load_state_dict(weights, strict=False)
    x = torch.tensor([tok.encode("a red ball", add_special_tokens=False).ids])
    with torch.no_grad():
        assert (back(x).logits - model(x).logits).abs().max().item() <= 1e-4
    assert Tokenizer.load(tmp_path / "run" / "tokenizer.json").roles["eos"] == "<|im_end|>"


def write_minimal(path, arch: str = "llama", qtype=Q.F32, tokenizer: str = "gpt2"):
    w = gguf.GGUFWriter(str(path), arch)
    w.add_tokenizer_model(tokenizer)
    w.add_token_list(["a", "b"])
    a = np.zeros((4, 256), dtype=np.float32)
    stored = quantize(a, qtype) if qtype in (Q.F32, Q.Q8_0) else np.zeros(
        gguf.quants.quant_shape_to_byte_shape(a.shape, qtype), dtype=np.uint8)
    w.add_tensor("token_embd.weight", stored, raw_shape=stored.shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("arch, qtype, tokenizer, message", [
    ("gemma", Q.F32, "gpt2", "GGUF architecture 'gemma' is not supported"),
    ("llama", Q.IQ2_XXS, "gpt2", "is IQ2_XXS, which tinylm does not dequantize"),
    ("llama", Q.F32, "llama", "tokenizer model 'llama' is not supported"),
])
def test_what_tinylm_cannot_import_is_a_one_line_error(tmp_path, capsys, arch, qtype,
                                                       tokenizer, message):
    write_minimal(tmp_path / "x.gguf", arch, qtype, tokenizer)
    assert main(["import-hf", str(tmp_path / "x.gguf"), str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert main(["import-hf", str(tmp_path / "none.gguf"), str(tmp_path / "run")]) == 2
    assert "no such GGUF file" in capsys.readouterr().err
    write_minimal(tmp_path / "y.gguf")  # supported, but without the model's hyperparameters
    assert main(["import-hf", str(tmp_path / "y.gguf"), str(tmp_path / "run")]) == 2
    assert "has no llama.embedding_length" in capsys.readouterr().err
