"""Run directories: the one thing that flows between stages, and the ground floor every stage
and tool stands on. Every write is atomic (tinylm.files); every load is verified.

    run/model.safetensors   weights, plain parameter names (never a DDP/compile prefix)
    run/model.json          {"family", "config", "weights": {"size", "sha256"}}
    run/tokenizer.json      HF tokenizers; seq2seq runs with two vocabularies add
    run/tokenizer-target.json
    run/chat_template.jinja the Jinja chat template (an imported model's own; tinylm's
                            otherwise, over the role tokens every tinylm tokenizer has)
    run/tokenizer.roles.json which tokens are BOS/EOS/PAD, for a tokenizer with its own
                            (an imported one); tinylm's tokenizers have none
    run/hf-source/          an imported checkpoint's own config.json and tokenizer JSON files,
                            so export-hf gives back the original (tinylm.hf)
    run/config.toml         the resolved config of the stage that wrote it
    run/state/step-N/       resume state (tinylm.train.checkpoint)

`model.json` names the family (tinylm.models.FAMILIES) and holds the model's config as a
nested table, rebuilt through `config.build`, so a config that nests another config, or a
model with extra heads, loads the same way as a plain GPT.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from tinylm import config as configlib
from tinylm.data import chat
from tinylm.errors import UserError
from tinylm.files import atomic_save_tensors, atomic_write_text, check_entry, manifest_entry
from tinylm.models import FAMILIES, SEQ2SEQ_FAMILIES, family_classes
from tinylm.tokenizer import Tokenizer

WEIGHTS, META, TOKENIZER, TARGET_TOKENIZER, CHAT_TEMPLATE, HF_SOURCE = (
    "model.safetensors", "model.json", "tokenizer.json", "tokenizer-target.json",
    "chat_template.jinja", "hf-source")


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """{name: first name} for every state-dict entry that is the same tensor as an earlier one
    (a tied output head is the token embedding): stored once, loaded through the first."""
    first: dict[int, str] = {}
    aliases = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in first:
            aliases[name] = first[id(t)]
        else:
            first[id(t)] = name
    return aliases


def save_model(run_dir: Path, model: nn.Module) -> None:
    """Weights first, then model.json with their checksum: a crash between the two leaves a
    model.json whose checksum no longer matches, which a load reports instead of using. A tied
    weight is written once (an imported model's run dir is the size of the original)."""
    model = unwrap(model)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    aliases = tied_aliases(model)
    atomic_save_tensors(run_dir / WEIGHTS, {k: v for k, v in model.state_dict().items()
                                            if k not in aliases})
    meta = {"family": model.family, "config": dataclasses.asdict(model.config),
            "weights": manifest_entry(run_dir / WEIGHTS)}
    atomic_write_text(run_dir / META, json.dumps(meta, indent=2))


def read_model_meta(run_dir: Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run dir {run_dir} does not exist; train one first (tinylm pretrain)")
    meta_path = run_dir / META
    if not meta_path.is_file():
        raise UserError(f"{run_dir} holds no {META}; is it a tinylm run dir?")
    try:
        meta = json.loads(meta_path.read_text())
        family, config = meta["family"], meta["config"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"{meta_path} is damaged; retrain or restore the run") from None
    if family not in FAMILIES:
        raise UserError(f"{run_dir}: unknown model family {family!r}")
    return {"family": family, "config": config, "weights": meta.get("weights")}


def build_model(family: str, config: dict[str, Any]) -> nn.Module:
    """A freshly initialised model of `family` from its config table (nested tables too)."""
    model_cls, config_cls = family_classes(family)
    return model_cls(configlib.build(config_cls, config, f"{META} config."))


def load_model(run_dir: Path, family: str | tuple[str, ...] | None = None,
               device: str | torch.device = "cpu") -> nn.Module:
    """The model saved in `run_dir`, checked to be of `family` (one name or several)."""
    run_dir = Path(run_dir)
    meta = read_model_meta(run_dir)
    wanted = (family,) if isinstance(family, str) else family
    if wanted and meta["family"] not in wanted:
        raise UserError(f"{run_dir} holds a {meta['family']} model, but this command needs "
                        f"{' or '.join(wanted)}; pass a run dir of that family")
    model = build_model(meta["family"], meta["config"])
    load_weights(model, run_dir / WEIGHTS, meta["weights"])
    return model.to(device)


def load_weights(model: nn.Module, path: Path, entry: dict | None = None) -> None:
    """Load safetensors weights into `model`, checked against their manifest `entry` (size
    and sha256) when there is one; run dirs written before checksums have none."""
    if not path.is_file():
        raise UserError(f"{path} is missing; the run has no saved weights yet")
    problem = check_entry(path, entry) if entry else None
    if problem:
        raise UserError(f"{path.parent}: {problem}; restore it or retrain")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path} is damaged or truncated ({e}); restore it or retrain") from None
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    aliases = tied_aliases(model)
    missing = [k for k in missing if aliases.get(k) in (None, *missing)]
    if missing or unexpected:
        raise UserError(f"{path} does not fit the model in {META} "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")


def save_tokenizers(run_dir: Path, tok: Tokenizer, target: Tokenizer | None = None) -> None:
    """tokenizer.json, and tokenizer-target.json when the target side has its own."""
    tok.save(Path(run_dir) / TOKENIZER)
    if target is not None and target is not tok:
        target.save(Path(run_dir) / TARGET_TOKENIZER)


def load_tokenizers(run_dir: Path) -> tuple[Tokenizer, Tokenizer]:
    """(source, target) tokenizers; the same object twice when the run has one."""
    tok = Tokenizer.load(Path(run_dir) / TOKENIZER)
    target = Path(run_dir) / TARGET_TOKENIZER
    return tok, Tokenizer.load(target) if target.is_file() else tok


def save_chat_template(run_dir: Path, template: str) -> None:
    atomic_write_text(Path(run_dir) / CHAT_TEMPLATE, template)


def save_hf_source(run_dir: Path, files: dict[str, str]) -> None:
    """An imported checkpoint's own small JSON files (name -> text), in hf-source/."""
    folder = Path(run_dir) / HF_SOURCE
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        atomic_write_text(folder / name, text)


def chat_template(run_dir: Path, required: bool = False) -> str:
    """The run's chat template: its chat_template.jinja, else tinylm's own (data.chat), the
    one SFT gives a pre-trained tinylm run. `required`: a run without one (never fine-tuned
    for chat) is a UserError that says how to make one."""
    path = Path(run_dir) / CHAT_TEMPLATE
    if path.is_file():
        return path.read_text(encoding="utf-8")
    if required:
        raise UserError(f"{run_dir} has no chat template ({CHAT_TEMPLATE}): it is not a chat "
                        f"model; fine-tune it first: tinylm sft --init {run_dir} --data FILE")
    return chat.TEMPLATE


def load(run_dir: str | Path, device: str = "cpu", family: str | tuple[str, ...] | None = None
         ) -> tuple[nn.Module, Tokenizer]:
    """The model (eval mode) and tokenizer of any run dir. A seq2seq run's tokenizer is its
    source side's; `load_seq2seq` gives both sides."""
    model = load_model(Path(run_dir), family=family, device=device).eval()
    return model, Tokenizer.load(Path(run_dir) / TOKENIZER)


def load_seq2seq(run_dir: str | Path, device: str = "cpu"
                 ) -> tuple[nn.Module, Tokenizer, Tokenizer]:
    """(model in eval mode, source tokenizer, target tokenizer) of an encoder-decoder run."""
    family = read_model_meta(Path(run_dir))["family"]
    if family not in SEQ2SEQ_FAMILIES:
        raise UserError(f"{run_dir} holds a {family} model; this needs an encoder-decoder run, "
                        "trained with `tinylm seq2seq`")
    model = load_model(Path(run_dir), device=device).eval()
    return (model, *load_tokenizers(run_dir))
