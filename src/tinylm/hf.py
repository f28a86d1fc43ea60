"""Hugging Face interop, both ways: a tinylm GPT run <-> a transformers model folder.

`export_hf(run, out)` writes config.json, model.safetensors and the tokenizer files that
`transformers.AutoModelForCausalLM` / `AutoTokenizer` load without tinylm installed.
`import_hf(hf_dir, run)` turns a local GPT-2, Llama, Qwen2 or Qwen3 checkpoint into a run dir,
so real pretrained weights can be fine-tuned and chatted with. Neither direction needs
transformers itself: both only read and write JSON and safetensors.

Which transformers class a GPTConfig becomes (every other combination is an error that names
the switch with no counterpart):

    pos=learned, norm=layer, mlp=gelu|relu                  -> GPT2LMHeadModel
    pos=rope, norm=rms, mlp=swiglu, qk_norm=false           -> LlamaForCausalLM
    pos=rope, norm=rms, mlp=swiglu, qk_norm=true, bias=off  -> Qwen3ForCausalLM

GPT-2 always has biases: a tinylm model without them exports zeros there, which computes the
same. tinylm's GELU is the tanh approximation, which is GPT-2's `gelu_new`. Rotary embeddings
use the same rotate-half layout as Llama, so q/k weights copy over unpermuted.

Importing a tokenizer: tinylm needs its special tokens (<|bos|>, <|eos|>, <|pad|>, chat roles).
The checkpoint's own BOS/EOS/PAD tokens are *renamed* to tinylm's (same ids, so the model
keeps the meaning it learned for them, and generation stops at its real end-of-text); the
other special tokens are added with new ids, and the embedding (and output head) grows to
cover them with rows set to the mean of the existing rows.
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
from tinylm.rundir import load_model, save_model
from tinylm.tokenizer import BOS, EOS, PAD, SPECIAL_TOKENS, Tokenizer

LAYER_NORM_EPS = 1e-5  # torch's LayerNorm default, as tinylm's make_norm uses it
RMS_NORM_EPS = 1e-6


# --- which architecture -------------------------------------------------------------------------
def hf_architecture(c: GPTConfig) -> str:
    """'gpt2', 'llama' or 'qwen3'; a UserError naming the switch that has no counterpart."""
    if c.logit_softcap > 0:
        raise UserError(f"logit_softcap={c.logit_softcap} has no counterpart in transformers' "
                        "GPT-2/Llama/Qwen3; train with model.logit_softcap=0 to export")
    if c.pos == "learned":
        for ok, switch in ((c.norm == "layer", f"norm={c.norm!r} (GPT-2 uses 'layer')"),
                           (c.mlp in ("gelu", "relu"), f"mlp={c.mlp!r} (GPT-2 uses 'gelu')"),
                           (not c.qk_norm, "qk_norm=true (GPT-2 has no QK-norm)")):
            if not ok:
                raise UserError(f"pos='learned' means GPT-2, which has no {switch}; "
                                "change that switch to export")
        return "gpt2"
    for ok, switch in ((c.norm == "rms", f"norm={c.norm!r} (Llama/Qwen3 use 'rms')"),
                       (c.mlp == "swiglu", f"mlp={c.mlp!r} (Llama/Qwen3 use 'swiglu')")):
        if not ok:
            raise UserError(f"pos='rope' means Llama or Qwen3, which have no {switch}; "
                            "change that switch to export")
    if c.qk_norm and c.bias:
        raise UserError("bias=true with qk_norm=true has no counterpart: Qwen3 (the QK-norm "
                        "model) has no MLP biases; train with model.bias=false to export")
    return "qwen3" if c.qk_norm else "llama"


# --- export -------------------------------------------------------------------------------------
def hf_config(c: GPTConfig, arch: str, tok: Tokenizer) -> dict[str, Any]:
    ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
    common = {"vocab_size": c.vocab_size, "tie_word_embeddings": c.tie_embeddings,
              "torch_dtype": "float32", "dtype": "float32", "use_cache": True, **ids}
    if arch == "gpt2":
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
                "n_positions": c.block_size, "n_embd": c.d_model, "n_layer": c.n_layer,
                "n_head": c.n_head, "n_inner": c.hidden,
                "activation_function": "gelu_new" if c.mlp == "gelu" else "relu",
                "layer_norm_epsilon": LAYER_NORM_EPS, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
                "attn_pdrop": 0.0, "scale_attn_weights": True, **common}
    rope = {"rope_theta": c.rope_theta, "rope_type": "default"}
    cfg = {"architectures": ["Qwen3ForCausalLM" if arch == "qwen3" else "LlamaForCausalLM"],
           "model_type": arch, "hidden_size": c.d_model, "intermediate_size": c.hidden,
           "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head,
           "num_key_value_heads": c.n_head, "head_dim": c.d_model // c.n_head,
           "hidden_act": "silu", "max_position_embeddings": c.block_size,
           "rms_norm_eps": RMS_NORM_EPS, "rope_theta": c.rope_theta,  # transformers 4.x
           "rope_parameters": rope, "attention_bias": c.bias, "attention_dropout": 0.0,
           **common}
    if arch == "llama":
        cfg["mlp_bias"] = c.bias
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
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": block_size,
              "clean_up_tokenization_spaces": False, "add_bos_token": False, **special,
              "chat_template": chat_template}
    return {"tokenizer.json": tok.to_str(),
            "tokenizer_config.json": json.dumps(config, indent=2),
            "special_tokens_map.json": json.dumps(special, indent=2)}


def export_hf(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Write `run_dir`'s GPT as a transformers folder in `out_dir` (fp32 safetensors)."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    model = load_model(run_dir, family="gpt")
    tok = Tokenizer.load(run_dir / "tokenizer.json")
    arch = hf_architecture(model.config)
    if (out_dir / "config.json").exists():
        raise UserError(f"{out_dir} already holds a config.json; pick an empty OUT_DIR")
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(out_dir / "model.safetensors", hf_state_dict(model, arch))
    atomic_write_text(out_dir / "config.json",
                      json.dumps(hf_config(model.config, arch, tok), indent=2))
    gen = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
    atomic_write_text(out_dir / "generation_config.json", json.dumps(gen, indent=2))
    files = tokenizer_files(tok, model.config.block_size, rundir.chat_template(run_dir))
    for name, text in files.items():
        atomic_write_text(out_dir / name, text)
    return out_dir


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
                  (math.isclose(cfg.get("layer_norm_epsilon", 1e-5), LAYER_NORM_EPS),
                   f"layer_norm_epsilon={cfg.get('layer_norm_epsilon')} (tinylm uses 1e-5)"),
                  (not cfg.get("scale_attn_by_inverse_layer_idx"),
                   "scale_attn_by_inverse_layer_idx=true"),
                  (cfg.get("scale_attn_weights", True), "scale_attn_weights=false")]
        _check(checks, kind)
        return gpt2_style(vocab_size=cfg["vocab_size"], block_size=cfg["n_positions"],
                          n_layer=cfg["n_layer"], n_head=cfg["n_head"], d_model=d, mlp=mlp,
                          mlp_ratio=mlp_ratio_for(cfg.get("n_inner") or 4 * d, d, False),
                          tie_embeddings=cfg.get("tie_word_embeddings", True))
    d, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    checks = [(heads % (cfg.get("num_key_value_heads") or heads) == 0,
               f"num_key_value_heads={cfg.get('num_key_value_heads')} not dividing "
               f"num_attention_heads={heads}"),
              (cfg.get("head_dim") in (None, d // heads), f"head_dim={cfg.get('head_dim')} "
               f"!= hidden_size/num_attention_heads={d // heads}"),
              (cfg.get("hidden_act", "silu") == "silu", f"hidden_act={cfg.get('hidden_act')!r}"),
              (rope_type == "default", f"rope type {rope_type!r} (rope scaling)"),
              (not cfg.get("use_sliding_window"), "use_sliding_window=true")]
    _check(checks, kind)
    eps = cfg.get("rms_norm_eps", RMS_NORM_EPS)
    if not math.isclose(eps, RMS_NORM_EPS):
        notes.append(f"rms_norm_eps={eps} differs from tinylm's 1e-6: logits will differ "
                     "very slightly from the original")
    # Qwen2 has q/k/v biases (no switch); tinylm's bias=true gives every linear a bias, and
    # the ones the checkpoint lacks are loaded as zeros.
    bias = kind == "qwen2" or bool(cfg.get("attention_bias") or cfg.get("mlp_bias"))
    return GPTConfig(vocab_size=cfg["vocab_size"], block_size=cfg["max_position_embeddings"],
                     n_layer=cfg["num_hidden_layers"], n_head=heads, d_model=d, mlp="swiglu",
                     mlp_ratio=mlp_ratio_for(cfg["intermediate_size"], d, True), norm="rms",
                     pos="rope", rope_theta=float(rope.get("rope_theta",
                                                           cfg.get("rope_theta", 10000.0))),
                     qk_norm=kind == "qwen3", bias=bias, zero_init=False,
                     tie_embeddings=bool(cfg.get("tie_word_embeddings", False)))


def _check(checks: list[tuple[bool, str]], kind: str) -> None:
    for ok, what in checks:
        if not ok:
            raise UserError(f"this {kind} checkpoint has {what}, which tinylm's GPT has no "
                            "counterpart for")


def tinylm_state_dict(hf: dict[str, torch.Tensor], c: GPTConfig, kind: str, n_kv: int
                      ) -> dict[str, torch.Tensor]:
    """transformers names and layouts -> tinylm's (the inverse of hf_state_dict).

    Grouped-query attention (n_kv key/value heads shared by groups of query heads) becomes
    plain multi-head attention by repeating each key/value head's projection rows for every
    query head of its group: the same numbers, computed with bigger k/v weights."""
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
            if n_kv < c.n_head:
                for name in (f"{b}attn.{x}.{kind_}" for x in "kv" for kind_ in ("weight", "bias")):
                    if name in sd:  # (n_kv * head_dim, ...) -> (n_head * head_dim, ...)
                        w = sd[name].unflatten(0, (n_kv, -1))
                        sd[name] = w.repeat_interleave(c.n_head // n_kv, 0).flatten(0, 1)
        sd["norm_f.weight"] = hf["model.norm.weight"]
    sd["lm_head.weight"] = hf.get("lm_head.weight", sd["tok_emb.weight"])
    return sd


def import_tokenizer(hf_dir: Path, cfg: dict[str, Any]) -> tuple[Tokenizer, dict[str, str]]:
    """The checkpoint's tokenizer with tinylm's special tokens (see the module docstring), and
    the special tokens it renamed ({old: new}), which its chat template must follow."""
    path = hf_dir / "tokenizer.json"
    if path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
    else:
        data = json.loads(_fast_tokenizer_json(hf_dir))
    roles: dict[int, str] = {}
    for key, name in (("eos_token_id", EOS), ("bos_token_id", BOS), ("pad_token_id", PAD)):
        value = cfg.get(key)
        value = value[0] if isinstance(value, list) and value else value
        if isinstance(value, int) and value not in roles and name not in roles.values():
            roles[value] = name
    renames = _rename_tokens(data, roles)
    data["post_processor"] = None  # tinylm adds BOS itself where it wants one
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer.from_str(json.dumps(data))
    missing = [t for t in SPECIAL_TOKENS if hf.token_to_id(t) is None]
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
    return Tokenizer(hf), renames


def import_chat_template(hf_dir: Path, renames: dict[str, str]) -> str | None:
    """The checkpoint's own Jinja chat template (tokenizer_config.json or
    chat_template.jinja), with renamed special tokens spelled as they are now."""
    template = None
    if (hf_dir / "chat_template.jinja").is_file():
        template = (hf_dir / "chat_template.jinja").read_text(encoding="utf-8")
    elif (hf_dir / "tokenizer_config.json").is_file():
        template = json.loads((hf_dir / "tokenizer_config.json").read_text()).get(
            "chat_template")
    if not isinstance(template, str):
        return None
    for old, new in renames.items():
        template = template.replace(old, new)
    return template


def _rename_tokens(data: dict[str, Any], roles: dict[int, str]) -> dict[str, str]:
    """Give the special tokens with ids in `roles` tinylm's names, in the added tokens and the
    model vocab. An id that is an ordinary token (merges may build on it) keeps its name."""
    vocab = data.get("model", {}).get("vocab")
    added = {t["id"]: t for t in data.get("added_tokens", []) if t.get("special")}
    renames = {}
    for i, name in roles.items():
        if i not in added:
            continue
        old = added[i]["content"]
        added[i]["content"] = name
        renames[old] = name
        if isinstance(vocab, dict) and vocab.get(old) == i:
            del vocab[old]
            vocab[name] = i
        elif isinstance(vocab, list) and i < len(vocab) and vocab[i][0] == old:  # Unigram
            vocab[i] = [name, vocab[i][1]]
    return renames


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
        w = sd[name]
        sd[name] = torch.cat([w, w.mean(0, keepdim=True).expand(n - w.shape[0], -1)])
    c.vocab_size = n


def import_hf(hf_dir: str | Path, run_dir: str | Path) -> list[str]:
    """Write a tinylm run dir from a transformers GPT-2 / Llama / Qwen2 / Qwen3 folder; returns
    notes for the user (e.g. small numeric differences)."""
    import tomli_w

    hf_dir, run_dir = Path(hf_dir), Path(run_dir)
    if not hf_dir.is_dir():
        raise UserError(f"{hf_dir} is not a folder; give a local transformers model folder")
    if (run_dir / "model.safetensors").exists():
        raise UserError(f"{run_dir} already holds a model; pick a new RUN dir")
    cfg = read_hf_config(hf_dir)
    notes: list[str] = []
    c = gpt_config(cfg, notes)
    tok, renames = import_tokenizer(hf_dir, cfg)
    hf = read_hf_weights(hf_dir)
    n_kv = cfg.get("num_key_value_heads") or c.n_head
    try:
        sd = tinylm_state_dict(hf, c, cfg["model_type"], n_kv)
    except KeyError as e:
        raise UserError(f"{hf_dir}: weight {e} is missing; is the checkpoint complete?") from None
    old_vocab = c.vocab_size
    grow_vocab(sd, c, tok.vocab_size)
    if c.vocab_size > old_vocab:
        notes.append(f"added {c.vocab_size - old_vocab} tinylm special tokens as new ids "
                     f"{old_vocab}..{c.vocab_size - 1}")
    if c.tie_embeddings:
        del sd["lm_head.weight"]
    model = GPT(c)
    for name, p in model.state_dict().items():
        if name.endswith(".bias") and name not in sd:
            sd[name] = torch.zeros_like(p)  # a bias the checkpoint does not have
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and c.tie_embeddings)]
    if missing or unexpected:
        raise UserError(f"{hf_dir}: weights do not fit (missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]})")
    run_dir.mkdir(parents=True, exist_ok=True)
    save_model(run_dir, model)
    tok.save(run_dir / "tokenizer.json")
    template = import_chat_template(hf_dir, renames)
    if template is not None:
        rundir.save_chat_template(run_dir, template)
    atomic_write_text(run_dir / "config.toml", tomli_w.dumps(
        {"source": str(hf_dir.resolve()), "model": dataclasses.asdict(c)}))
    return notes
