"""Hugging Face interop: exported runs load in transformers with the same logits, imported
transformers checkpoints give tinylm models with the same logits."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from tinylm import config as configlib
from tinylm import rundir
from tinylm.cli import main
from tinylm.hf import export_hf, gpt2_names, hf_architecture, import_hf
from tinylm.models.gpt import GPT, GPTConfig, gpt2_style
from tinylm.rundir import save_model
from tinylm.stages.pretrain import PretrainConfig
from tinylm.tokenizer import EOS, Tokenizer, train_bpe, train_char

transformers = pytest.importorskip("transformers")
warnings.filterwarnings("ignore", module="transformers")
transformers.logging.set_verbosity_error()

TEXT = "Once upon a time, a small dog found a red ball in the park. " * 20 + "héllo ✓\n"
SMALL = dict(depth=0, n_layer=2, n_head=2, d_model=64, block_size=48, dropout=0.0)


@pytest.fixture(scope="module")
def tok():
    return train_char(TEXT)


def make_run(path, cfg: GPTConfig, tok, seed: int = 0):
    """A run dir with random weights, every parameter perturbed (norm weights and biases
    too), so a wrongly mapped tensor cannot hide behind an init of ones or zeros."""
    torch.manual_seed(seed)
    cfg.vocab_size = tok.vocab_size
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    save_model(path, model)
    tok.save(path / "tokenizer.json")
    return model.eval()


def hf_logits(folder, ids: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    with torch.no_grad():
        return model(ids).logits


def preset_model_configs() -> dict[str, GPTConfig]:
    """The GPT of every shipped preset that builds one, shrunk to test size."""
    out = {}
    for path in sorted(configlib.PRESET_DIR.glob("*.toml")):
        data = configlib.read_toml(path)
        data["model"] = data.get("model", {}) | SMALL
        try:
            cfg = configlib.build(PretrainConfig, data)
        except Exception:  # a preset of another stage or family
            continue
        out[path.stem] = cfg.model
    return out


VARIANTS = {
    "gpt2-style": gpt2_style(**SMALL),
    "gpt2-untied-relu-nobias": gpt2_style(**SMALL, tie_embeddings=False, mlp="relu",
                                          bias=False, mlp_ratio=3.0),
    "llama": GPTConfig(**SMALL, mlp="swiglu", qk_norm=False, rope_theta=5000.0),
    "llama-bias-tied": GPTConfig(**SMALL, mlp="swiglu", qk_norm=False, bias=True,
                                 tie_embeddings=True),
    "qwen3 (default preset style)": GPTConfig(**SMALL, mlp="swiglu", qk_norm=True),
    **{f"preset {k}": v for k, v in preset_model_configs().items()},
}
EXPECTED = {"gpt2-style": "gpt2", "gpt2-untied-relu-nobias": "gpt2", "llama": "llama",
            "llama-bias-tied": "llama", "qwen3 (default preset style)": "qwen3"}


def exportable(cfg: GPTConfig) -> bool:
    try:
        hf_architecture(cfg)
        return True
    except Exception:
        return False


@pytest.mark.parametrize("name", [n for n, c in VARIANTS.items() if exportable(c)])
def test_exported_folder_gives_the_same_logits_in_transformers(tmp_path, tok, name):
    cfg = VARIANTS[name]
    model = make_run(tmp_path / "run", cfg, tok)
    export_hf(tmp_path / "run", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert "auto_map" not in config  # plain transformers classes, no tinylm code needed
    if name in EXPECTED:
        assert config["model_type"] == EXPECTED[name]
    ids = torch.tensor([tok.encode(TEXT[:40]), tok.encode(TEXT[100:140])])
    with torch.no_grad():
        ours = model(ids)
    theirs = hf_logits(tmp_path / "hf", ids)
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_the_gpt2_mapping_names_every_tensor_of_both_models():
    """Export and import both follow gpt2_names, so it must name each side's tensors, all of
    them (lm_head aside: tied, or copied as it is)."""
    c = gpt2_style(**SMALL, vocab_size=10)
    ours, theirs, _ = zip(*gpt2_names(c.n_layer))
    unfused = {n.replace("attn.qkv", f"attn.{x}") for n in ours for x in "qkv"}
    assert unfused == set(GPT(c).state_dict()) - {"lm_head.weight"}
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=c.n_layer, n_head=c.n_head, n_embd=c.d_model, n_positions=c.block_size,
        vocab_size=10, bos_token_id=None, eos_token_id=None))
    assert set(theirs) == set(hf.state_dict()) - {"lm_head.weight"}


def test_the_default_preset_is_exportable():
    presets = preset_model_configs()
    if "tinystories-bpe" not in presets:
        pytest.skip("the tinystories-bpe preset is not there yet")
    assert hf_architecture(presets["tinystories-bpe"]) in ("llama", "qwen3")


def test_exported_tokenizer_loads_in_transformers_and_encodes_alike(tmp_path):
    tok = train_bpe(TEXT, 300)
    make_run(tmp_path / "run", gpt2_style(**SMALL), tok)
    export_hf(tmp_path / "run", tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    text = "Once upon a time, héllo ✓ dog."
    assert hf_tok(text)["input_ids"] == tok.encode(text)
    assert hf_tok.decode(tok.encode(text)) == text
    assert (hf_tok.eos_token_id, hf_tok.pad_token_id) == (tok.eos_id, tok.pad_id)


def test_transformers_generate_runs_on_an_export(tmp_path, tok):
    model = make_run(tmp_path / "run", gpt2_style(**SMALL), tok)
    export_hf(tmp_path / "run", tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    ids = torch.tensor([tok.encode("Once upon")])
    out = hf.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None)
    from tinylm.infer.engine import SamplingParams, naive_generate

    ref = naive_generate(model, ids, SamplingParams(max_new_tokens=8, temperature=0))
    assert out.tolist() == ref.tolist()


@pytest.mark.parametrize("cfg, switch", [
    (GPTConfig(**SMALL), "mlp='relu2'"),
    (GPTConfig(**SMALL, mlp="swiglu", logit_softcap=15.0), "logit_softcap=15.0"),
    (GPTConfig(**SMALL, mlp="swiglu", norm="layer"), "norm='layer'"),
    (gpt2_style(**SMALL, qk_norm=True), "qk_norm=true"),
    (gpt2_style(**SMALL, norm="rms"), "norm='rms'"),
    (GPTConfig(**SMALL, mlp="swiglu", bias=True), "bias=true with qk_norm=true"),
])
def test_export_without_a_counterpart_names_the_switch(tmp_path, tok, capsys, cfg, switch):
    make_run(tmp_path / "run", cfg, tok)
    assert main(["export-hf", str(tmp_path / "run"), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert switch in err and err.count("\n") == 1
    assert not (tmp_path / "hf").exists()


# --- import -------------------------------------------------------------------------------------
def hf_tokenizer_gpt2(folder):
    """A GPT-2 style byte-level BPE with <|endoftext|> as BOS = EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    t.train_from_iterator([TEXT], trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<|endoftext|>",
                                                eos_token="<|endoftext|>")
    fast.save_pretrained(str(folder))
    return fast


def hf_tokenizer_llama(folder):
    """A sentencepiece-like BPE with byte fallback and <unk>, <s>, </s> at ids 0, 1, 2."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers

    t = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    t.normalizer = normalizers.Replace(" ", "▁")
    t.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                   decoders.Fuse()])
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"],
                                  show_progress=False)
    t.train_from_iterator([TEXT], trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>",
                                                eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(folder))
    return fast


def hf_model(kind: str, fast):
    """A random transformers model of `kind` whose special ids are those of tokenizer `fast`."""
    torch.manual_seed(0)
    vocab = len(fast)
    common = dict(vocab_size=vocab, bos_token_id=fast.bos_token_id,
                  eos_token_id=fast.eos_token_id, num_hidden_layers=2, num_attention_heads=4,
                  hidden_size=64, max_position_embeddings=128, rms_norm_eps=1e-6)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=64,
                                      vocab_size=vocab, bos_token_id=fast.bos_token_id,
                                      eos_token_id=fast.eos_token_id, layer_norm_epsilon=1e-6)
    elif kind == "llama":
        cfg = transformers.LlamaConfig(num_key_value_heads=4, intermediate_size=176, **common)
    elif kind == "llama-gqa-attention-bias":  # 2 key/value heads for 4 query heads
        cfg = transformers.LlamaConfig(num_key_value_heads=2, intermediate_size=176,
                                       attention_bias=True, **common)
    elif kind == "smollm2-like":  # SmolLM2's switches: GQA 3 of 6, eps 1e-5, theta 1e5, tied
        cfg = transformers.LlamaConfig(**common | {"num_attention_heads": 6, "hidden_size": 96,
                                                   "rms_norm_eps": 1e-5},
                                       num_key_value_heads=2, intermediate_size=256,
                                       rope_theta=100000.0, tie_word_embeddings=True)
    elif kind == "llama3-rope":  # Llama 3.1's scaled rope, one key/value head
        cfg = transformers.LlamaConfig(**common | {"max_position_embeddings": 512},
                                       num_key_value_heads=1, intermediate_size=176,
                                       rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                     "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0,
                                                     "original_max_position_embeddings": 16,
                                                     "rope_theta": 500000.0})
    elif kind == "qwen2-gqa":  # q/k/v biases, no o_proj bias
        cfg = transformers.Qwen2Config(num_key_value_heads=2, intermediate_size=128,
                                       tie_word_embeddings=True, **common)
    else:
        cfg = transformers.Qwen3Config(num_key_value_heads=2, head_dim=16, intermediate_size=128,
                                       tie_word_embeddings=True, **common)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # norms and biases away from their init of ones and zeros
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


IMPORT_KINDS = ["gpt2", "llama", "llama-gqa-attention-bias", "smollm2-like", "llama3-rope",
                "qwen2-gqa", "qwen3"]


@pytest.mark.parametrize("kind", IMPORT_KINDS)
def test_imported_checkpoint_gives_the_same_logits(tmp_path, kind):
    """Same ids, logits within 1e-4 in fp32 (the norm's eps, rotary theta and scaling taken
    exactly), key/value heads kept grouped (weights and cache n_kv_head heads wide), a tied
    embedding stored once, and the checkpoint's own end-of-text token."""
    from safetensors import safe_open

    import tinylm

    hf_dir = tmp_path / "hf"
    fast = (hf_tokenizer_gpt2 if kind == "gpt2" else hf_tokenizer_llama)(hf_dir)
    model = hf_model(kind, fast)
    model.save_pretrained(str(hf_dir))
    assert main(["import-hf", str(hf_dir), str(tmp_path / "run")]) == 0
    ours, tok = tinylm.load(tmp_path / "run")
    text = "Once upon a time, a dog."
    ids = tok.encode(text)
    assert ids == fast(text, add_special_tokens=False)["input_ids"]
    x = torch.tensor([ids])
    with torch.no_grad():
        theirs = model(x).logits
        mine = ours(x)[..., : theirs.shape[-1]]
    assert (mine - theirs).abs().max().item() <= 1e-4
    assert tok.eos_id == model.config.eos_token_id  # the checkpoint's own end-of-text
    assert tok.id_to_token(tok.eos_id) == fast.eos_token and tok.decode(ids) == text
    n_kv = getattr(model.config, "num_key_value_heads", None) or model.config.num_attention_heads
    c = ours.config
    assert c.kv_heads == n_kv and ours.new_cache(1, 4).k.shape[2] == n_kv
    assert ours.blocks[0].attn.k.weight.shape[0] == n_kv * c.head_dim  # not expanded
    with safe_open(str(tmp_path / "run" / "model.safetensors"), "pt") as f:
        assert ("lm_head.weight" in f.keys()) == (not model.config.tie_word_embeddings)
    size = (tmp_path / "run" / "model.safetensors").stat().st_size
    assert abs(size / (hf_dir / "model.safetensors").stat().st_size - 1) < 0.05


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
          "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\\n' }}{% endif %}")


def hf_tokenizer_chatml(folder):
    """SmolLM2's special tokens: <|endoftext|>, <|im_start|> (BOS), <|im_end|> (EOS), with a
    ChatML template over them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300,
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    t.train_from_iterator([TEXT], trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<|im_start|>",
                                                eos_token="<|im_end|>", pad_token="<|im_end|>")
    fast.chat_template = CHATML
    fast.save_pretrained(str(folder))
    return fast


@pytest.mark.parametrize("kind", ["llama", "llama-gqa-attention-bias", "smollm2-like",
                                  "llama3-rope", "qwen2-gqa", "qwen3"])
def test_import_then_export_round_trips_exactly(tmp_path, kind):
    """export-hf of an imported run gives back the original config.json and every tensor,
    bit for bit (no expanded heads, no second copy of a tied embedding, no added biases)."""
    from safetensors.torch import load_file

    hf_dir = tmp_path / "hf"
    fast = hf_tokenizer_chatml(hf_dir)
    model = hf_model(kind, fast)
    model.save_pretrained(str(hf_dir))
    import_hf(hf_dir, tmp_path / "run")
    export_hf(tmp_path / "run", tmp_path / "back")
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config == json.loads((hf_dir / "config.json").read_text())
    want, got = (load_file(str(d / "model.safetensors")) for d in (hf_dir, tmp_path / "back"))
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    x = torch.tensor([fast("a red ball", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        expected = model(x).logits
    assert torch.equal(hf_logits(tmp_path / "back", x), expected)
    back = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "back"))
    assert (back.eos_token, back.bos_token) == ("<|im_end|>", "<|im_start|>")


def test_special_tokens_and_chat_template_survive_import(tmp_path):
    """A ChatML model keeps its vocabulary (no tinylm token added), its special tokens under
    their own names and its template verbatim; rendering a conversation gives transformers'
    apply_chat_template ids, and tinylm chat stops answers at <|im_end|>."""
    from tinylm.data.chat import render
    from tinylm.infer.chat import turn_end_ids

    hf_dir = tmp_path / "hf"
    fast = hf_tokenizer_chatml(hf_dir)
    hf_model("smollm2-like", fast).save_pretrained(str(hf_dir))
    assert import_hf(hf_dir, tmp_path / "run") == []
    tok = Tokenizer.load(tmp_path / "run" / "tokenizer.json")
    assert tok.vocab_size == len(fast) and tok.special_id(EOS) is None
    assert tok.roles == {"pad": "<|im_end|>", "bos": "<|im_start|>", "eos": "<|im_end|>"}
    assert (tok.bos_id, tok.eos_id) == (fast.bos_token_id, fast.eos_token_id)
    template = rundir.chat_template(tmp_path / "run")
    assert template == CHATML
    for gen in (False, True):
        ours = render(tok, CONVERSATION, template, add_generation_prompt=gen)
        theirs = fast.apply_chat_template(CONVERSATION, tokenize=True, add_generation_prompt=gen)
        theirs = theirs["input_ids"] if hasattr(theirs, "keys") else theirs
        assert ours.ids == list(theirs)
    assert sum(ours.mask) > 0
    assert turn_end_ids(tok, template) == [fast.eos_token_id]


def test_a_model_without_a_chat_template_gets_tinylms_role_tokens(tmp_path):
    """GPT-2 has no chat template: tinylm's four role tokens are added as new ids (embedding
    rows the mean of the others), so tinylm's template works; its own tokens keep their ids."""
    from tinylm.data.chat import render
    from tinylm.tokenizer import ASSISTANT, END

    hf_dir = tmp_path / "hf"
    fast = hf_tokenizer_gpt2(hf_dir)
    hf_model("gpt2", fast).save_pretrained(str(hf_dir))
    notes = import_hf(hf_dir, tmp_path / "run")
    assert "no chat template" in notes[0]
    tok = Tokenizer.load(tmp_path / "run" / "tokenizer.json")
    assert tok.vocab_size == len(fast) + 4 and tok.special_id(END) == len(fast) + 3
    assert tok.id_to_token(tok.eos_id) == "<|endoftext|>" == tok.id_to_token(tok.pad_id)
    ids = render(tok, CONVERSATION[:3], rundir.chat_template(tmp_path / "run")).ids
    assert tok.special_id(ASSISTANT) in ids


@pytest.mark.parametrize("config, message", [
    ({"model_type": "bert", "architectures": ["BertForMaskedLM"]},
     "architecture 'bert' (BertForMaskedLM) is not supported"),
    ({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
      "intermediate_size": 128, "vocab_size": 10, "num_hidden_layers": 1,
      "max_position_embeddings": 32, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}},
     "rope type 'yarn' (tinylm has the plain, 'linear' and 'llama3' ropes)"),
    ({"model_type": "qwen3", "hidden_size": 64, "num_attention_heads": 4, "head_dim": 32,
      "intermediate_size": 128, "vocab_size": 10, "num_hidden_layers": 1,
      "max_position_embeddings": 32}, "head_dim=32 != hidden_size/num_attention_heads=16"),
])
def test_import_of_an_unsupported_folder_is_a_one_line_error(tmp_path, capsys, config, message):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    assert main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_import_refuses_pickle_weights(tmp_path, capsys):
    hf_dir = tmp_path / "hf"
    fast = hf_tokenizer_gpt2(hf_dir)
    hf_model("gpt2", fast).config.save_pretrained(str(hf_dir))
    (hf_dir / "pytorch_model.bin").write_bytes(b"not loaded")
    assert main(["import-hf", str(hf_dir), str(tmp_path / "run")]) == 2
    assert "pickle" in capsys.readouterr().err


CONVERSATION = [{"role": "system", "content": "You tell stories."},
                {"role": "user", "content": "A dog."},
                {"role": "assistant", "content": "Once upon a time, a dog."},
                {"role": "user", "content": "More!"}]


def test_the_chat_template_travels_to_transformers(tmp_path, tok):
    """export-hf writes the run's template; apply_chat_template gives tinylm's ids."""
    from tinylm.data.chat import render

    make_run(tmp_path / "run", gpt2_style(**SMALL), tok)
    export_hf(tmp_path / "run", tmp_path / "hf")
    fast = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    for gen in (False, True):
        theirs = fast.apply_chat_template(CONVERSATION, tokenize=True,
                                          add_generation_prompt=gen)
        theirs = theirs["input_ids"] if hasattr(theirs, "keys") else theirs
        assert list(theirs) == render(tok, CONVERSATION, add_generation_prompt=gen).ids
