"""Hugging Face interop, both ways: a tinylm GPT run <-> a transformers model folder.

`export_hf(run, out)` writes config.json, model.safetensors and the tokenizer files that
`transformers.AutoModelForCausalLM` / `AutoTokenizer` load without tinylm installed.
`import_hf(hf_dir, run)` turns a local GPT-2, Llama, Qwen2 or Qwen3 checkpoint into a run dir,
so real pretrained weights can be fine-tuned and chatted with; `import_checkpoint` does the
same from a config and tensors read elsewhere (a GGUF file, tinylm.gguf). Neither direction
needs transformers itself: both only read and write JSON and safetensors.

Which transformers class a GPTConfig becomes (every other combination is an error that names
the switch with no counterpart):

    pos=learned, norm=layer, mlp=gelu|relu                  -> GPT2LMHeadModel
    pos=rope, norm=rms, mlp=swiglu, qk_norm=false           -> LlamaForCausalLM
    ... and qkv_bias=true, bias=false                       -> Qwen2ForCausalLM
    pos=rope, norm=rms, mlp=swiglu, qk_norm=true, bias=off  -> Qwen3ForCausalLM

GPT-2 always has biases: a tinylm model without them exports zeros there, which computes the
same. tinylm's GELU is the tanh approximation, which is GPT-2's `gelu_new`. Rotary embeddings
use the same rotate-half layout as Llama, so q/k weights copy over unpermuted.

An import is faithful: grouped-query attention stays grouped (`n_kv_head`), a tied embedding
stays one tensor, the norm's epsilon and the rotary theta and scaling are the checkpoint's, and
the vocabulary, special tokens and chat template are kept as they are (the tokenizer's roles
say which token is BOS/EOS/PAD). Only a model without a chat template gets tinylm's four chat
role tokens, as new ids whose embedding (and head) rows are the mean of the existing rows.
The checkpoint's own JSON files are kept in the run (hf-source/), so `export_hf` of an
imported run gives back the original config and tensors.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from tinylm import rundir
from tinylm.errors import UserError
from tinylm.files import atomic_save_tensors, atomic_write_text
from tinylm.models.gpt import GPT, GPTConfig, gpt2_style
from tinylm.models.layers import DEFAULT_EPS
from tinylm.rundir import load_model, save_model
from tinylm.tokenizer import ASSISTANT, END, SYSTEM, USER, Tokenizer

LAYER_NORM_EPS = DEFAULT_EPS["layer"]  # torch's LayerNorm default, as tinylm's make_norm uses it
RMS_NORM_EPS = DEFAULT_EPS["rms"]
CHAT_ROLE_TOKENS = [SYSTEM, USER, ASSISTANT, END]  # what tinylm's chat template renders with


# --- which architecture -------------------------------------------------------------------------
def hf_architecture(c: GPTConfig) -> str:
    """'gpt2', 'llama', 'qwen2' or 'qwen3'; a UserError naming the switch that has no
    counterpart."""
    if c.logit_softcap > 0:
        raise UserError(f"logit_softcap={c.logit_softcap} has no counterpart in transformers' "
                        "GPT-2/Llama/Qwen3; train with model.logit_softcap=0 to export")
    if c.pos == "learned":
        for ok, switch in ((c.norm == "layer", f"norm={c.norm!r} (GPT-2 uses 'layer')"),
                           (c.mlp in ("gelu", "relu"), f"mlp={c.mlp!r} (GPT-2 uses 'gelu')"),
                           (not c.qk_norm, "qk_norm=true (GPT-2 has no QK-norm)"),
                           (c.kv_heads == c.n_head, f"n_kv_head={c.n_kv_head} (GPT-2 has no "
                                                    "grouped-query attention)"),
                           (not c.qkv_bias or c.bias, "qkv_bias=true without bias")):
            if not ok:
                raise UserError(f"pos='learned' means GPT-2, which has no {switch}; "
                                "change that switch to export")
        return "gpt2"
    for ok, switch in ((c.norm == "rms", f"norm={c.norm!r} (Llama/Qwen3 use 'rms')"),
                       (c.mlp == "swiglu", f"mlp={c.mlp!r} (Llama/Qwen3 use 'swiglu')")):
        if not ok:
            raise UserError(f"pos='rope' means Llama or Qwen3, which have no {switch}; "
                            "change that switch to export")
    if c.qk_norm and (c.bias or c.qkv_bias):
        raise UserError("bias=true with qk_norm=true has no counterpart: Qwen3 (the QK-norm "
                        "model) has no MLP biases; train with model.bias=false to export")
    if c.qkv_bias and not c.bias:
        return "qwen2"
    return "qwen3" if c.qk_norm else "llama"


# --- export -------------------------------------------------------------------------------------
def rope_parameters(c: GPTConfig) -> dict[str, Any]:
    """transformers' rope_parameters for the GPTConfig's rotary theta and scaling."""
    rope: dict[str, Any] = {"rope_theta": c.rope_theta, "rope_type": "default"}
    if c.rope_scaling == "linear":
        rope |= {"rope_type": "linear", "factor": c.rope_factor}
    elif c.rope_scaling == "llama3":
        rope |= {"rope_type": "llama3", "factor": c.rope_factor,
                 "low_freq_factor": c.rope_low_freq_factor,
                 "high_freq_factor": c.rope_high_freq_factor,
                 "original_max_position_embeddings": c.rope_original_max_len}
    return rope


def hf_config(c: GPTConfig, arch: str, tok: Tokenizer) -> dict[str, Any]:
    ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
    common = {"vocab_size": c.vocab_size, "tie_word_embeddings": c.tie_embeddings,
              "torch_dtype": "float32", "dtype": "float32", "use_cache": True, **ids}
    if arch == "gpt2":
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
                "n_positions": c.block_size, "n_embd": c.d_model, "n_layer": c.n_layer,
                "n_head": c.n_head, "n_inner": c.hidden,
                "activation_function": "gelu_new" if c.mlp == "gelu" else "relu",
                "layer_norm_epsilon": c.norm_eps or LAYER_NORM_EPS, "resid_pdrop": 0.0,
                "embd_pdrop": 0.0, "attn_pdrop": 0.0, "scale_attn_weights": True, **common}
    rope = rope_parameters(c)
    classes = {"qwen3": "Qwen3ForCausalLM", "qwen2": "Qwen2ForCausalLM"}
    cfg = {"architectures": [classes.get(arch, "LlamaForCausalLM")],
           "model_type": arch, "hidden_size": c.d_model, "intermediate_size": c.hidden,
           "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head,
           "num_key_value_heads": c.kv_heads, "head_dim": c.head_dim,
           "hidden_act": "silu", "max_position_embeddings": c.block_size,
           "rms_norm_eps": c.norm_eps or RMS_NORM_EPS, "rope_theta": c.rope_theta,  # 4.x
           "rope_parameters": rope, "attention_bias": c.bias, "attention_dropout": 0.0,
           **common}
    if rope["rope_type"] != "default":
        cfg["rope_scaling"] = rope  # transformers 4.x
    if arch == "llama":
        cfg["mlp_bias"] = c.bias
    elif arch == "qwen2":
        cfg |= {"use_sliding_window": False, "sliding_window": None}
        del cfg["attention_bias"]
    else:
        cfg |= {"use_sliding_window": False, "sliding_window": None,
                "layer_types": ["full_attention"] * c.n_layer}
    return cfg


def hf_state_dict(model: GPT, arch: str) -> dict[str, torch.Tensor]:
    """tinylm parameter names and layouts -> the transformers class's."""
    c, sd = model.config, model.state_dict()
    out = {}
    if arch == "gpt2":
        for i in range(c.n_layer):  # GPT-2's c_attn: tinylm's q, k and v, concatenated
            for kind in ("weight", "bias"):
                names = [f"blocks.{i}.attn.{x}.{kind}" for x in "qkv"]
                if names[0] in sd:
                    sd[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([sd.pop(n) for n in names])
        for ours, theirs, conv1d in gpt2_names(c.n_layer):
            if ours not in sd:  # a bias tinylm does not have: zero computes the same
                sd[ours] = torch.zeros(sd[ours.removesuffix("bias") + "weight"].shape[0])
            out[theirs] = sd[ours].T if conv1d else sd[ours]
    else:
        out["model.embed_tokens.weight"] = sd["tok_emb.weight"]
        for i in range(c.n_layer):
            b, h = f"blocks.{i}.", f"model.layers.{i}."
            for ours, theirs in LLAMA_NAMES:
                for kind in ("weight", "bias"):
                    if f"{b}{ours}.{kind}" in sd:
                        out[f"{h}{theirs}.{kind}"] = sd[f"{b}{ours}.{kind}"]
        out["model.norm.weight"] = sd["norm_f.weight"]
        if arch == "qwen2":  # q/k/v biases only: the others are tinylm's zeros, if any
            drop_absent_biases(out, {"model_type": "qwen2"})
    if not c.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return {k: v.detach().float().contiguous() for k, v in out.items()}


# The GPT-2 mapping, both ways: (tinylm module, GPT-2 module, kind) inside each layer.
# GPT-2's c_attn fuses q, k and v: "attn.qkv" stands for tinylm's three, concatenated.
GPT2_LAYER_NAMES = [("norm1", "ln_1", "norm"), ("attn.qkv", "attn.c_attn", "conv1d"),
                    ("attn.proj", "attn.c_proj", "conv1d"), ("norm2", "ln_2", "norm"),
                    ("mlp.fc", "mlp.c_fc", "conv1d"), ("mlp.proj", "mlp.c_proj", "conv1d")]


def gpt2_names(n_layer: int) -> list[tuple[str, str, bool]]:
    """(tinylm tensor, GPT-2 tensor, transposed) for every GPT-2 tensor but lm_head. Norms
    and linears have a weight and a bias; a linear is a Conv1D in GPT-2, which stores its
    weight as (in, out), the transpose of nn.Linear's."""
    modules = [("tok_emb", "transformer.wte", "embedding"),
               ("pos_emb", "transformer.wpe", "embedding")]
    for i in range(n_layer):
        modules += [(f"blocks.{i}.{ours}", f"transformer.h.{i}.{theirs}", kind)
                    for ours, theirs, kind in GPT2_LAYER_NAMES]
    modules.append(("norm_f", "transformer.ln_f", "norm"))
    names = []
    for ours, theirs, kind in modules:
        names.append((f"{ours}.weight", f"{theirs}.weight", kind == "conv1d"))
        if kind != "embedding":
            names.append((f"{ours}.bias", f"{theirs}.bias", False))
    return names


LLAMA_NAMES = [("norm1", "input_layernorm"), ("norm2", "post_attention_layernorm"),
               ("attn.q", "self_attn.q_proj"), ("attn.k", "self_attn.k_proj"),
               ("attn.v", "self_attn.v_proj"), ("attn.proj", "self_attn.o_proj"),
               ("attn.q_norm", "self_attn.q_norm"), ("attn.k_norm", "self_attn.k_norm"),
               ("mlp.gate", "mlp.gate_proj"), ("mlp.fc", "mlp.up_proj"),
               ("mlp.proj", "mlp.down_proj")]


def tokenizer_files(tok: Tokenizer, block_size: int, chat_template: str) -> dict[str, str]:
    """tokenizer.json plus the small JSON files PreTrainedTokenizerFast reads; the run's chat
    template goes where transformers' apply_chat_template finds it."""
    special = {"bos_token": tok.roles["bos"], "eos_token": tok.roles["eos"],
               "pad_token": tok.roles["pad"]}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": block_size,
              "clean_up_tokenization_spaces": False, "add_bos_token": False, **special,
              "chat_template": chat_template}
    return {"tokenizer.json": tok.to_str(),
            "tokenizer_config.json": json.dumps(config, indent=2),
            "special_tokens_map.json": json.dumps(special, indent=2)}


def original_config(run_dir: Path, model: GPT) -> dict[str, Any] | None:
    """The imported checkpoint's own config.json (hf-source/), if the run has one and its
    model is still that architecture (vocab_size may have grown by tinylm's chat tokens)."""
    path = Path(run_dir) / rundir.HF_SOURCE / "config.json"
    if not path.is_file():
        return None
    cfg = json.loads(path.read_text())
    try:
        c = gpt_config(cfg, [])
    except UserError:
        return None
    c.vocab_size = model.config.vocab_size
    if c != model.config:
        return None
    return cfg | {"vocab_size": c.vocab_size}


def drop_absent_biases(sd: dict[str, torch.Tensor], cfg: dict[str, Any]) -> None:
    """Remove the bias tensors `cfg`'s architecture does not have (tinylm's `bias=true` gave
    them as zeros on import); one that is no longer zero (fine-tuned) cannot be dropped."""
    kind = cfg.get("model_type")
    if kind == "gpt2":
        return
    qwen2 = kind == "qwen2"
    attn, mlp = (True, False) if qwen2 else (bool(cfg.get("attention_bias")),
                                             bool(cfg.get("mlp_bias")))
    for name in [n for n in sd if n.endswith(".bias")]:
        keep = (attn and not (qwen2 and "o_proj" in name)) if "self_attn" in name else mlp
        if keep:
            continue
        if sd[name].any():
            raise UserError(f"{name} is not zero, but the original {kind} config has no such "
                            "bias; export a run without hf-source/ to write a config that has")
        del sd[name]


def export_hf(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Write `run_dir`'s GPT as a transformers folder in `out_dir` (fp32 safetensors). An
    imported run gives back its original config.json and tokenizer files (hf-source/)."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    model = load_model(run_dir, family="gpt")
    tok = Tokenizer.load(run_dir / "tokenizer.json")
    arch = hf_architecture(model.config)
    if (out_dir / "config.json").exists():
        raise UserError(f"{out_dir} already holds a config.json; pick an empty OUT_DIR")
    original = original_config(run_dir, model)
    cfg = original or hf_config(model.config, arch, tok)
    tensors = hf_state_dict(model, arch)
    if original is not None:
        drop_absent_biases(tensors, original)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(out_dir / "model.safetensors", tensors)
    atomic_write_text(out_dir / "config.json", json.dumps(cfg, indent=2))
    gen = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
    files = {"generation_config.json": json.dumps(gen, indent=2),
             **tokenizer_files(tok, model.config.block_size, rundir.chat_template(run_dir))}
    if original is not None:
        files |= original_tokenizer_files(run_dir, rundir.chat_template(run_dir))
    for name, text in files.items():
        atomic_write_text(out_dir / name, text)
    return out_dir


def original_tokenizer_files(run_dir: Path, template: str) -> dict[str, str]:
    """The imported checkpoint's generation and tokenizer JSON files, with the run's chat
    template (it may have been changed since) where the original kept one."""
    src = Path(run_dir) / rundir.HF_SOURCE
    files = {p.name: p.read_text(encoding="utf-8") for p in sorted(src.iterdir())
             if p.name != "config.json" and p.is_file()}
    if "tokenizer_config.json" in files:
        tc = json.loads(files["tokenizer_config.json"])
        if "chat_template" in tc or "chat_template.jinja" not in files:
            tc["chat_template"] = template
        files["tokenizer_config.json"] = json.dumps(tc, indent=2)
    if "chat_template.jinja" in files:
        files["chat_template.jinja"] = template
    return files


# --- import -------------------------------------------------------------------------------------
SUPPORTED = ("gpt2", "llama", "qwen2", "qwen3")


def read_hf_config(hf_dir: Path) -> dict[str, Any]:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise UserError(f"{hf_dir} holds no config.json; give a transformers model folder")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None
    kind = cfg.get("model_type")
    if kind not in SUPPORTED:
        arch = ", ".join(cfg.get("architectures") or []) or "unknown class"
        raise UserError(f"{hf_dir}: architecture {kind!r} ({arch}) is not supported; tinylm "
                        f"imports {', '.join(SUPPORTED)}")
    return cfg


def read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) safetensors checkpoint; never a pickle."""
    index = hf_dir / "model.safetensors.index.json"
    files = ([hf_dir / "model.safetensors"] if (hf_dir / "model.safetensors").is_file() else
             sorted({hf_dir / f for f in json.loads(index.read_text())["weight_map"].values()})
             if index.is_file() else [])
    if not files:
        if any(hf_dir.glob("*.bin")) or any(hf_dir.glob("*.pt")):
            raise UserError(f"{hf_dir} holds pickle weights (.bin), which tinylm never loads; "
                            "re-save them with save_pretrained(safe_serialization=True)")
        raise UserError(f"{hf_dir} holds no model.safetensors")
    tensors = {}
    for f in files:
        try:
            tensors.update(load_file(str(f)))
        except (SafetensorError, OSError) as e:
            raise UserError(f"{f} is damaged or missing ({e})") from None
    # A bare base model (GPT2Model, LlamaModel) has no "transformer."/"model." prefix.
    prefix = "transformer." if "wte.weight" in tensors else "model." if (
        "embed_tokens.weight" in tensors) else ""
    return {(k if k == "lm_head.weight" else prefix + k): v.float() for k, v in tensors.items()}


def mlp_ratio_for(hidden: int, d_model: int, swiglu: bool) -> float:
    """The mlp_ratio for which GPTConfig.hidden gives exactly `hidden`."""
    if swiglu:
        if hidden % 8:
            raise UserError(f"intermediate_size={hidden} is not a multiple of 8, which "
                            "tinylm's SwiGLU width rule cannot express")
        hidden = math.ceil(3 * hidden / 2)  # GPTConfig takes 2/3 of mlp_ratio * d_model
    return (hidden + 0.5) / d_model  # + 0.5: int() of the product lands on `hidden`


def gpt_config(cfg: dict[str, Any], notes: list[str]) -> GPTConfig:
    """The GPTConfig of a transformers config.json, or a UserError naming what does not fit."""
    kind = cfg["model_type"]
    if kind == "gpt2":
        act = cfg.get("activation_function", "gelu_new")
        mlp = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "relu": "relu"}.get(act)
        d = cfg["n_embd"]
        checks = [(mlp is not None, f"activation_function={act!r} (tinylm has the tanh GELU "
                                    "'gelu_new' and 'relu')"),
                  (not cfg.get("scale_attn_by_inverse_layer_idx"),
                   "scale_attn_by_inverse_layer_idx=true"),
                  (cfg.get("scale_attn_weights", True), "scale_attn_weights=false")]
        _check(checks, kind)
        return gpt2_style(vocab_size=cfg["vocab_size"], block_size=cfg["n_positions"],
                          n_layer=cfg["n_layer"], n_head=cfg["n_head"], d_model=d, mlp=mlp,
                          mlp_ratio=mlp_ratio_for(cfg.get("n_inner") or 4 * d, d, False),
                          tie_embeddings=cfg.get("tie_word_embeddings", True),
                          norm_eps=_eps(cfg.get("layer_norm_epsilon"), LAYER_NORM_EPS))
    d, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    rope = (cfg.get("rope_parameters") or {}) | (cfg.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    n_kv = cfg.get("num_key_value_heads") or heads
    checks = [(heads % n_kv == 0,
               f"num_key_value_heads={cfg.get('num_key_value_heads')} not dividing "
               f"num_attention_heads={heads}"),
              (cfg.get("head_dim") in (None, d // heads), f"head_dim={cfg.get('head_dim')} "
               f"!= hidden_size/num_attention_heads={d // heads}"),
              (cfg.get("hidden_act", "silu") == "silu", f"hidden_act={cfg.get('hidden_act')!r}"),
              (rope_type in ("default", "linear", "llama3"),
               f"rope type {rope_type!r} (tinylm has the plain, 'linear' and 'llama3' ropes)"),
              (not cfg.get("use_sliding_window"), "use_sliding_window=true")]
    _check(checks, kind)
    # Qwen2 has q/k/v biases only (qkv_bias); Llama's attention_bias puts one on o_proj too,
    # which tinylm's bias=true has, with zeros for the MLP's if mlp_bias is off (dropped again
    # on export).
    bias = bool(cfg.get("attention_bias") or cfg.get("mlp_bias")) and kind != "qwen2"
    scaling = {"default": "none"}.get(rope_type, rope_type)
    return GPTConfig(vocab_size=cfg["vocab_size"], block_size=cfg["max_position_embeddings"],
                     n_layer=cfg["num_hidden_layers"], n_head=heads, d_model=d, mlp="swiglu",
                     mlp_ratio=mlp_ratio_for(cfg["intermediate_size"], d, True), norm="rms",
                     pos="rope", rope_theta=float(rope.get("rope_theta",
                                                           cfg.get("rope_theta", 10000.0))),
                     rope_scaling=scaling, rope_factor=float(rope.get("factor", 1.0)),
                     rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
                     rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
                     rope_original_max_len=int(rope.get("original_max_position_embeddings",
                                                        8192)),
                     n_kv_head=n_kv if n_kv < heads else 0, qkv_bias=kind == "qwen2",
                     norm_eps=_eps(cfg.get("rms_norm_eps"), RMS_NORM_EPS),
                     qk_norm=kind == "qwen3", bias=bias, zero_init=False,
                     tie_embeddings=bool(cfg.get("tie_word_embeddings", False)))


def _eps(value: float | None, default: float) -> float:
    """The checkpoint's norm epsilon, exactly; 0 (tinylm's default) where it is that."""
    return 0.0 if value is None or value == default else float(value)


def _check(checks: list[tuple[bool, str]], kind: str) -> None:
    for ok, what in checks:
        if not ok:
            raise UserError(f"this {kind} checkpoint has {what}, which tinylm's GPT has no "
                            "counterpart for")


def tinylm_state_dict(hf: dict[str, torch.Tensor], c: GPTConfig, kind: str
                      ) -> dict[str, torch.Tensor]:
    """transformers names and layouts -> tinylm's (the inverse of hf_state_dict). Grouped
    key/value heads keep their size (GPTConfig.n_kv_head); a tied head is not stored twice."""
    sd: dict[str, torch.Tensor] = {}
    if kind == "gpt2":
        for ours, theirs, conv1d in gpt2_names(c.n_layer):
            sd[ours] = hf[theirs].T if conv1d else hf[theirs]
        for i in range(c.n_layer):  # c_attn back into q, k and v
            for kind_ in ("weight", "bias"):
                qkv = sd.pop(f"blocks.{i}.attn.qkv.{kind_}").chunk(3)
                sd |= {f"blocks.{i}.attn.{x}.{kind_}": w for x, w in zip("qkv", qkv)}
    else:
        sd["tok_emb.weight"] = hf["model.embed_tokens.weight"]
        for i in range(c.n_layer):
            b, h = f"blocks.{i}.", f"model.layers.{i}."
            for ours, theirs in LLAMA_NAMES:
                for kind_ in ("weight", "bias"):
                    if f"{h}{theirs}.{kind_}" in hf:
                        sd[f"{b}{ours}.{kind_}"] = hf[f"{h}{theirs}.{kind_}"]
        sd["norm_f.weight"] = hf["model.norm.weight"]
    if not c.tie_embeddings:
        sd["lm_head.weight"] = hf["lm_head.weight"]
    return sd


def roles_from(cfg: dict[str, Any], data: dict[str, Any]) -> dict[str, str] | None:
    """Which of the checkpoint's tokens are BOS, EOS and PAD (config.json's ids; BOS and PAD
    default to EOS, as GPT-2 and most Llamas use them); None if it names no EOS."""
    names = {t["id"]: t["content"] for t in data.get("added_tokens", [])}
    vocab = data.get("model", {}).get("vocab")
    if isinstance(vocab, dict):
        names = {i: t for t, i in vocab.items()} | names

    def token(key: str) -> str | None:
        value = cfg.get(key)
        value = value[0] if isinstance(value, list) and value else value
        return names.get(value) if isinstance(value, int) else None

    eos = token("eos_token_id")
    if eos is None:
        return None
    return {"pad": token("pad_token_id") or eos, "bos": token("bos_token_id") or eos,
            "eos": eos}


def build_tokenizer(data: dict[str, Any], cfg: dict[str, Any], chat: bool
                    ) -> tuple[Tokenizer, list[str]]:
    """The checkpoint's tokenizer as it is, with its roles; tinylm's chat role tokens are
    added (new ids) only for a model without a chat template (`chat` False), and tinylm's
    whole special set for one with no EOS. Returns the tokenizer and the tokens added."""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTokenizer

    from tinylm.tokenizer import SPECIAL_TOKENS

    hf = HFTokenizer.from_str(json.dumps(data))
    roles = roles_from(cfg, data)
    wanted = SPECIAL_TOKENS if roles is None else [] if chat else CHAT_ROLE_TOKENS
    added = [t for t in wanted if hf.token_to_id(t) is None]
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in added])
    return Tokenizer(hf, roles), added


def read_tokenizer_json(hf_dir: Path) -> dict[str, Any]:
    path = hf_dir / "tokenizer.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    return json.loads(_fast_tokenizer_json(hf_dir))


def read_chat_template(hf_dir: Path) -> str | None:
    """The checkpoint's own Jinja chat template (chat_template.jinja or tokenizer_config.json),
    kept as it is: its special tokens are the tokenizer's, which are not renamed."""
    if (hf_dir / "chat_template.jinja").is_file():
        return (hf_dir / "chat_template.jinja").read_text(encoding="utf-8")
    if (hf_dir / "tokenizer_config.json").is_file():
        template = json.loads((hf_dir / "tokenizer_config.json").read_text()).get(
            "chat_template")
        return template if isinstance(template, str) else None
    return None


def _fast_tokenizer_json(hf_dir: Path) -> str:
    """A tokenizer.json made by transformers from a folder with only slow-tokenizer files."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise UserError(f"{hf_dir} has no tokenizer.json; install transformers "
                        "(pip install 'tinylm[hf]') to convert its tokenizer") from None
    try:
        tok = AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)
        return tok.backend_tokenizer.to_str()
    except Exception as e:  # transformers raises many kinds here
        raise UserError(f"{hf_dir}: could not read its tokenizer ({e})") from None


def grow_vocab(sd: dict[str, torch.Tensor], c: GPTConfig, n: int) -> None:
    """Make room for `n` token ids: new embedding and head rows are the mean of the old ones,
    so new tokens start as an 'average' token rather than at random."""
    if n <= c.vocab_size:
        return
    for name in ("tok_emb.weight", "lm_head.weight"):
        if name in sd:  # a tied head has no tensor of its own
            w = sd[name]
            sd[name] = torch.cat([w, w.mean(0, keepdim=True).expand(n - w.shape[0], -1)])
    c.vocab_size = n


# The checkpoint's small JSON files a run keeps (hf-source/), for a faithful export.
SOURCE_FILES = ("config.json", "generation_config.json", "tokenizer_config.json",
                "special_tokens_map.json", "chat_template.jinja")


def import_hf(hf_dir: str | Path, run_dir: str | Path) -> list[str]:
    """Write a tinylm run dir from a transformers GPT-2 / Llama / Qwen2 / Qwen3 folder; returns
    notes for the user."""
    hf_dir, run_dir = Path(hf_dir), Path(run_dir)
    if not hf_dir.is_dir():
        raise UserError(f"{hf_dir} is not a folder; give a local transformers model folder")
    if (run_dir / "model.safetensors").exists():
        raise UserError(f"{run_dir} already holds a model; pick a new RUN dir")
    cfg = read_hf_config(hf_dir)
    gpt_config(cfg, [])  # what does not fit is an error before any weight is read
    sources = {n: (hf_dir / n).read_text(encoding="utf-8") for n in SOURCE_FILES
               if (hf_dir / n).is_file()}
    return import_checkpoint(cfg, read_hf_weights(hf_dir), read_tokenizer_json(hf_dir),
                             read_chat_template(hf_dir), run_dir, str(hf_dir.resolve()),
                             sources)


def import_checkpoint(cfg: dict[str, Any], hf: dict[str, torch.Tensor],
                      tokenizer: dict[str, Any], template: str | None, run_dir: Path,
                      source: str, sources: dict[str, str]) -> list[str]:
    """Write a run dir from a transformers-style config, tensors with transformers' names
    (fp32), a tokenizer.json's content and a chat template: the part of an import every
    format shares (a transformers folder here, a GGUF file in tinylm.gguf). `sources` are the
    original's JSON files, kept in hf-source/ for export."""
    import tomli_w

    run_dir = Path(run_dir)
    if (run_dir / "model.safetensors").exists():
        raise UserError(f"{run_dir} already holds a model; pick a new RUN dir")
    if cfg.get("model_type") not in SUPPORTED:
        raise UserError(f"{source}: architecture {cfg.get('model_type')!r} is not supported; "
                        f"tinylm imports {', '.join(SUPPORTED)}")
    notes: list[str] = []
    c = gpt_config(cfg, notes)
    tok, added = build_tokenizer(tokenizer, cfg, chat=template is not None)
    try:
        sd = tinylm_state_dict(hf, c, cfg["model_type"])
    except KeyError as e:
        raise UserError(f"{source}: weight {e} is missing; is the checkpoint complete?") from None
    old_vocab = c.vocab_size
    grow_vocab(sd, c, tok.vocab_size)
    if added:
        notes.append(f"the model has no chat template: added tinylm's {', '.join(added)} as "
                     f"new ids {old_vocab}..{c.vocab_size - 1}")
    model = GPT(c)
    for name, p in model.state_dict().items():
        if name.endswith(".bias") and name not in sd:
            sd[name] = torch.zeros_like(p)  # a bias the checkpoint does not have
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and c.tie_embeddings)]
    if missing or unexpected:
        raise UserError(f"{source}: weights do not fit (missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]})")
    run_dir.mkdir(parents=True, exist_ok=True)
    save_model(run_dir, model)
    tok.save(run_dir / "tokenizer.json")
    if template is not None:
        rundir.save_chat_template(run_dir, template)
    rundir.save_hf_source(run_dir, sources)
    atomic_write_text(run_dir / "config.toml", tomli_w.dumps(
        {"source": source, "model": dataclasses.asdict(c)}))
    return notes
