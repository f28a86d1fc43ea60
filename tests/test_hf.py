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
                                      eos_token_id=fast.eos_token_id)
    elif kind == "llama":
        cfg = transformers.LlamaConfig(num_key_value_heads=4, intermediate_size=176, **common)
    elif kind == "llama-gqa-attention-bias":  # 2 key/value heads for 4 query heads
        cfg = transformers.LlamaConfig(num_key_value_heads=2, intermediate_size=176,
                                       attention_bias=True, **common)
    elif kind == "qwen2-gqa":  # q/k/v biases, no o_proj bias
        cfg = transformers.Qwen2Config(num_key_value_heads=2, intermediate_size=128,
                                       tie_word_embeddings=True, **common)
    else:
        cfg = transformers.Qwen3Config(num_key_value_heads=4, head_dim=16, intermediate_size=128,
                                       tie_word_embeddings=True, **common)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # norms and biases away from their init of ones and zeros
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("kind", ["gpt2", "llama", "llama-gqa-attention-bias", "qwen2-gqa",
                                  "qwen3"])
def test_imported_checkpoint_gives_the_same_logits(tmp_path, kind):
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
    assert tok.id_to_token(tok.eos_id) == EOS and tok.decode(ids) == text


def test_import_then_export_round_trips(tmp_path):
    hf_dir = tmp_path / "hf"
    fast = hf_tokenizer_llama(hf_dir)
    model = hf_model("llama", fast)
    model.save_pretrained(str(hf_dir))
    import_hf(hf_dir, tmp_path / "run")
    export_hf(tmp_path / "run", tmp_path / "back")
    x = torch.tensor([fast("a red ball", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        expected = model(x).logits
    again = hf_logits(tmp_path / "back", x)[..., : expected.shape[-1]]
    assert (again - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("config, message", [
    ({"model_type": "bert", "architectures": ["BertForMaskedLM"]},
     "architecture 'bert' (BertForMaskedLM) is not supported"),
    ({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
      "intermediate_size": 128, "vocab_size": 10, "num_hidden_layers": 1,
      "max_position_embeddings": 32, "rope_scaling": {"rope_type": "linear", "factor": 2.0}},
     "rope type 'linear' (rope scaling)"),
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


def test_an_imported_model_keeps_its_own_chat_template(tmp_path):
    """ChatML over the checkpoint's tokens; a renamed special token (</s> is the EOS, which
    tinylm names <|eos|>) is renamed in the template too, so the ids do not change."""
    from tinylm.data.chat import render

    hf_dir = tmp_path / "hf"
    fast = hf_tokenizer_llama(hf_dir)
    fast.chat_template = ("{% for m in messages %}{{ '<s>' + m['role'] + ': ' + m['content'] "
                          "+ '</s>' }}{% endfor %}{% if add_generation_prompt %}"
                          "{{ '<s>assistant: ' }}{% endif %}")
    fast.save_pretrained(str(hf_dir))
    hf_model("llama", fast).save_pretrained(str(hf_dir))
    import_hf(hf_dir, tmp_path / "run")
    template = rundir.chat_template(tmp_path / "run")
    assert "<|eos|>" in template and "</s>" not in template
    ours = render(Tokenizer.load(tmp_path / "run" / "tokenizer.json"), CONVERSATION, template)
    theirs = fast.apply_chat_template(CONVERSATION, tokenize=True)
    theirs = theirs["input_ids"] if hasattr(theirs, "keys") else theirs
    assert ours.ids == list(theirs)
    assert sum(ours.mask) > 0
