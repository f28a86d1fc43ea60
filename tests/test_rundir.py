"""Run dirs: checksummed weights, nested configs, tinylm.load for every family."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

import tinylm
from tinylm import rundir
from tinylm.errors import UserError
from tinylm.models.gpt import GPT, GPTConfig
from tinylm.models.rnn import RNNConfig, RNNEncoderDecoder
from tinylm.tokenizer import train_char


def tiny_gpt() -> GPT:
    return GPT(GPTConfig(vocab_size=64, n_layer=1, n_head=2, d_model=32, block_size=16))


def test_model_json_holds_the_weights_checksum_and_a_flipped_byte_is_caught(tmp_path):
    rundir.save_model(tmp_path, tiny_gpt())
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["weights"]["size"] == (tmp_path / "model.safetensors").stat().st_size
    rundir.load_model(tmp_path)  # intact: loads
    data = bytearray((tmp_path / "model.safetensors").read_bytes())
    data[-5] ^= 0x40  # a flip inside the last tensor: the file still parses
    (tmp_path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(UserError, match="does not match its sha256"):
        rundir.load_model(tmp_path)


def test_a_run_dir_without_a_checksum_still_loads(tmp_path):
    """Run dirs written before checksums existed."""
    model = tiny_gpt()
    rundir.save_model(tmp_path, model)
    meta = json.loads((tmp_path / "model.json").read_text())
    del meta["weights"]
    (tmp_path / "model.json").write_text(json.dumps(meta))
    loaded = rundir.load_model(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 loaded.state_dict().values()))


@dataclass
class HeadConfig:
    width: int = 4


@dataclass
class WithHeadConfig:
    """A config that nests two others, as a reward model's (backbone + head) will."""

    backbone: GPTConfig = field(default_factory=GPTConfig)
    head: HeadConfig = field(default_factory=HeadConfig)


class WithHead(nn.Module):
    family = "with-head"

    def __init__(self, config: WithHeadConfig):
        super().__init__()
        self.config = config
        self.backbone = GPT(config.backbone)
        self.head = nn.Linear(config.backbone.d_model, config.head.width)


def test_a_nested_config_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setitem(rundir.FAMILIES, "with-head", ("", "", ""))
    monkeypatch.setattr(rundir, "family_classes", lambda f: (WithHead, WithHeadConfig))
    cfg = WithHeadConfig(GPTConfig(vocab_size=64, n_layer=1, n_head=2, d_model=32),
                         HeadConfig(width=3))
    model = WithHead(cfg)
    rundir.save_model(tmp_path, model)
    loaded = rundir.load_model(tmp_path)
    assert loaded.config == cfg and isinstance(loaded.config.backbone, GPTConfig)
    assert torch.equal(loaded.head.weight, model.head.weight)


def test_tinylm_load_reads_an_encoder_decoder_with_two_tokenizers(tmp_path):
    src, tgt = train_char("hello world"), train_char("bonjour le monde")
    model = RNNEncoderDecoder(RNNConfig(vocab_size=src.vocab_size, tgt_vocab_size=tgt.vocab_size,
                                        d_model=16))
    rundir.save_model(tmp_path, model)
    rundir.save_tokenizers(tmp_path, src, tgt)
    loaded, tok = tinylm.load(tmp_path)
    assert loaded.family == "rnn" and not loaded.training
    assert tok.to_str() == src.to_str()
    _, s, t = rundir.load_seq2seq(tmp_path)
    assert (s.to_str(), t.to_str()) == (src.to_str(), tgt.to_str())
    with pytest.raises(UserError, match="needs gpt"):
        tinylm.load(tmp_path, family="gpt")


def test_load_seq2seq_refuses_a_gpt_run(tmp_path):
    rundir.save_model(tmp_path, tiny_gpt())
    with pytest.raises(UserError, match="holds a gpt model; this needs an encoder-decoder"):
        rundir.load_seq2seq(tmp_path)


def test_a_tied_head_is_stored_once_and_loads_tied(tmp_path):
    from safetensors.torch import load_file

    from tinylm.models.gpt import GPT, GPTConfig
    from tinylm.rundir import load_model, save_model

    model = GPT(GPTConfig(vocab_size=40, block_size=8, n_layer=1, n_head=2, d_model=16,
                          tie_embeddings=True))
    save_model(tmp_path, model)
    assert "lm_head.weight" not in load_file(str(tmp_path / "model.safetensors"))
    back = load_model(tmp_path)
    assert back.lm_head.weight is back.tok_emb.weight
    assert torch.equal(back.tok_emb.weight, model.tok_emb.weight)
