"""Scalar heads on the GPT backbone: the reward model of RLHF (Ouyang et al. 2022, InstructGPT;
Stiennon et al. 2020), and the per-token values PPO's critic reads from the same network.

`RewardModel` is a GPT whose final hidden states go through a linear layer to one number per
position; the reward is read at the end-of-answer token (the chat template's end of the
assistant turn): the head there (`readout = "end"`), or the head's outputs summed up to and
including it (`readout = "sum"`, see Choices). Read there, the score has seen the whole prompt
and the whole answer (the backbone is causal), and an answer that never ended can be told
apart by the caller, who knows whether the token is there. `values(idx)` gives the head at
every position, which is what a value model initialised from the reward model needs.

Choices:
- The backbone keeps its language-model head (unused here, so its gradient is None and the
  optimizer skips it): the run dir then holds a complete GPT under `backbone.`, and
  `RewardModel.from_gpt` / `to_gpt` are plain renames.
- The head starts at zero, so every reward is 0 at initialisation and the ranking loss starts
  at log 2: no prompt's order is favoured before training.
- `mean` and `std` of the trained model's rewards (on its training answers) are part of its
  config, so whoever loads it (PPO, a judge) can normalise scores to mean 0 and std 1 without
  the data: `normalized(r)`.
- `readout`: "end" reads the head at the end-of-answer token alone (InstructGPT's choice);
  "sum" adds the head's output at every position up to and including it. What the `request`
  guidelines ask is whether a word of the prompt (a name, an object) occurs anywhere in the
  answer: a per-token head can see that where the word is (one attention hop from the
  answer's token to the prompt's), while a read-out at one token needs that hop and a second
  one to gather it at the end (docs/rlhf.md: 0.715 -> 0.775 held-out accuracy on the same
  data). The positions before the answer are the prompt's, and a causal backbone gives them
  the same states whichever answer follows, so within a prompt they add the same constant
  to every answer: pairwise orders are those of the answer's tokens alone, and the
  `forward(idx, end)` call is the same for either read-out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from tinylm.models.gpt import GPT, GPTConfig
from tinylm.models.layers import Packed

READOUTS = ("end", "sum")  # where the reward is read (RewardConfig.readout)


@dataclass
class RewardConfig:
    backbone: GPTConfig = field(default_factory=GPTConfig)
    mean: float = 0.0  # of the rewards on the training answers (set after training)
    std: float = 1.0
    readout: str = "end"  # "end": the end-of-answer token; "sum": every position up to it

    @property
    def block_size(self) -> int:
        return self.backbone.block_size

    def __post_init__(self):
        if not self.std > 0:
            raise ValueError(f"std={self.std} must be > 0")
        if self.readout not in READOUTS:
            raise ValueError(f"readout={self.readout!r}: use one of {', '.join(READOUTS)}")


class RewardModel(nn.Module):
    family = "reward"

    def __init__(self, config: RewardConfig):
        super().__init__()
        self.config = config
        self.backbone = GPT(config.backbone)
        self.head = nn.Linear(config.backbone.d_model, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_gpt(cls, gpt: GPT, readout: str = "end") -> RewardModel:
        """A reward model on `gpt`'s weights (a copy of its config; the head at zero)."""
        model = cls(RewardConfig(backbone=gpt.config, readout=readout))
        model.backbone.load_state_dict(gpt.state_dict())
        return model

    def values(self, idx: torch.Tensor, packed: Packed | None = None) -> torch.Tensor:
        """idx: (B, T) -> the head's output at every position (B, T); `packed` as forward."""
        h = self.backbone.hidden_states(idx, packed=packed)  # (B, T, C)
        return self.head(h).squeeze(-1).float()  # (B, T)

    def forward(self, idx: torch.Tensor, end: torch.Tensor, packed: Packed | None = None
                ) -> torch.Tensor:
        """idx: (B, T) token ids, right-padded; end: (B,) the position of each row's
        end-of-answer token; packed: idx's rows with their shared prompts laid out once
        (layers.Packed; the same rewards, fewer positions). Returns the rewards (B,); the
        padding after `end` never counts."""
        return self.read(self.backbone.hidden_states(idx, packed=packed), end)

    def read(self, h: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
        """The rewards (B,) from the backbone's hidden states h (B, T, C), however they were
        computed (PPO scores rollouts through the backbone's inference twin, infer/fast.py)."""
        v = self.head(h).squeeze(-1).float()  # (B, T)
        if self.config.readout == "end":
            return v.gather(1, end.view(-1, 1)).squeeze(1)  # (B,)
        upto = torch.arange(h.shape[1], device=h.device) <= end.view(-1, 1)  # (B, T)
        return (v * upto).sum(1)  # (B,)

    def normalized(self, rewards: torch.Tensor) -> torch.Tensor:
        return (rewards - self.config.mean) / self.config.std

    def num_params(self, embeddings: bool = True) -> int:
        head = sum(p.numel() for p in self.head.parameters())
        return self.backbone.num_params(embeddings) + head

    def flops_per_token(self, T: int | None = None) -> float:
        """The backbone's, less its language-model head, which a reward model never runs."""
        return self.backbone.flops_per_token(T) - 6 * self.backbone.lm_head.weight.numel()

    def optim_groups(self) -> dict[str, list[nn.Parameter]]:
        """The backbone's groups; the head's weight is an output head (AdamW, as lm_head)."""
        groups = self.backbone.optim_groups()
        return {"matrix": groups["matrix"], "embed": groups["embed"] + [self.head.weight],
                "other": groups["other"] + [self.head.bias]}
