"""Model families. Each lives in its own file; this registry maps a run dir's
`model.json` "family" onto its class and config dataclass."""

from __future__ import annotations

import importlib

# family -> (module, model class, config class)
FAMILIES: dict[str, tuple[str, str, str]] = {
    "gpt": ("tinylm.models.gpt", "GPT", "GPTConfig"),
    "transformer": ("tinylm.models.transformer", "Transformer", "TransformerConfig"),
    "rnn": ("tinylm.models.rnn", "RNNEncoderDecoder", "RNNConfig"),
    "bert": ("tinylm.models.bert", "BertModel", "BertConfig"),
    "mlp": ("tinylm.models.mlp", "MLP", "MLPConfig"),  # tinylm basics
    "reward": ("tinylm.models.heads", "RewardModel", "RewardConfig"),  # a GPT + scalar head
}
SEQ2SEQ_FAMILIES = ("transformer", "rnn")  # encoder-decoders: source and target tokenizers


def family_classes(family: str) -> tuple[type, type]:
    if family not in FAMILIES:
        raise KeyError(family)
    module, model_cls, config_cls = FAMILIES[family]
    mod = importlib.import_module(module)
    return getattr(mod, model_cls), getattr(mod, config_cls)
