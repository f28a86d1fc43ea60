"""PPO for a chat model: rollouts -> reward with a per-token KL penalty -> GAE -> clipped
policy and value updates (Schulman et al. 2017), as Ziegler et al. 2019 and InstructGPT
(Ouyang et al. 2022) apply it to language models.

One iteration: sample K answers to each of a batch of prompts with the one generation engine
(`Engine.generate`, logprobs on); score each answer with a reward callable over (prompt ids,
answer ids); read the frozen reference's and the value model's numbers on the same tokens;
turn them into per-token rewards and advantages; then `epochs` passes over the rollout in
minibatches, each minibatch one `train.loop.optimizer_step` of the policy (clipped surrogate,
plus the pre-training loss for PPO-ptx) and one of the value model (clipped value loss).
Optimizers, the LR schedule, clipping, bf16 and checkpoints are the training loop's own
(`setup()`, `optimizer_step()`, `checkpoint.save_state`), not a second copy. `train.steps`
counts iterations and the LR schedule is a function of the iteration; prompts and sampling
seeds are functions of (seed, iteration), so `--resume` ends in the same weights. One process:
setup() would wrap the models in DDP under torchrun, but rollouts are not split across ranks.

An episode is one answer: the state is the prompt and the answer so far, an action is one
token. Every token's reward is -beta * KL_t (the policy against the reference, k1 or k3
estimator of Schulman's "Approximating KL divergence"); the reward model's score is added at
the answer's last token, so the return of a whole answer is score - beta * KL(answer).

Where this departs from the textbook algorithm, and why:
- Rewards are sparse and episodes end where the answer ends: at the end-of-answer token, or
  cut at `max_new_tokens` (not bootstrapped: the reward model judges what was said). An answer
  without the end-of-answer token has its score lowered by `missing_eos_penalty` (TRL), since
  a reward model read at a token that is not the end of an answer reads out of distribution.
  Everything after the last real token is padding: zero reward, zero value, no loss.
- The behaviour policy's logprobs come from the engine (at temperature 1 they are the model's
  own distribution, so no extra forward pass); at another temperature the policy is defined as
  the tempered distribution (logits / T, as TRL does) and its logprobs are recomputed. With
  one epoch of one minibatch they are also the "old" logprobs of the ratio, which is then 1
  up to float rounding (TRL's num_iterations=1 takes the update's own, detached: the same
  gradient), so no pass is spent on them either way.
- The reference's logprobs (and, at a temperature other than 1, the policy's before the
  update) are read through the FastGPT twin (infer/fast.py), the inference code the engine's
  logprobs come from, so both sides of the KL are read alike; the frozen reference's twin is
  built once. Generation and these reads run in the training arithmetic (`train.dtype`, as
  TRL's bf16=True autocasts its generation and reference): bf16 weights under bf16, which
  on a CPU with AMX samples a 32-answer rollout about 1.6x faster than fp32. Every logprob
  is computed on the answer tokens only: the trunk runs on the whole row, the head and the
  log-softmax only where an answer token is predicted (never on the prompt or the padding,
  and no (N, L, V) tensor is made). The training forwards
  (policy and value) lay each prompt out once beside its K answers (`shared_prompts`,
  models/layers.py Packed): the same numbers on about a third fewer positions.
- The value model is a network of its own (the reward model's backbone and head, trained per
  token), with its own optimizer: no shared trunk, so there is no value-loss weight (vf_coef).
- GAE's advantages are whitened once per rollout, over all its real tokens, not per
  minibatch (GRPO's are normalised within each group already).
- Dropout is off in every model: the ratio of a network with dropout to itself is noise.
- `advantage = "grpo"`: the group-relative baseline of Shao et al. 2024 (DeepSeekMath) instead
  of GAE. The advantage of every token of an answer is its return (score - beta * summed KL)
  minus the mean of the returns of the K answers to the same prompt, divided by their spread
  (`scale_rewards = false`: not divided, as Liu et al. 2025, "Dr. GRPO", argue: a group whose
  answers the judge barely tells apart would otherwise get full-size advantages from noise).
  Unlike GRPO the KL stays in the reward (as RLOO keeps it), so both estimators optimise the
  same objective; no value model is needed or trained.
- PPO-ptx (InstructGPT): `ptx_coef * ` the next-token loss on a pre-training batch is added
  to the policy loss of every minibatch.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from tinylm.errors import UserError
from tinylm.feedback.preferences import logits_at, token_logprobs
from tinylm.infer.engine import Completion, Engine, SamplingParams
from tinylm.infer.fast import FastGPT
from tinylm.models.layers import Packed
from tinylm.rundir import save_model
from tinylm.train import checkpoint
from tinylm.train.loop import MetricsLog, Setup, TrainConfig, optimizer_step, setup
from tinylm.train.optim import lr_factor, set_lr

# (prompt ids, answer ids) of a batch of answers -> their scores (N,)
RewardFn = Callable[[Sequence[Sequence[int]], Sequence[Sequence[int]]], torch.Tensor]
# (prompt indices, answer texts) -> gold scores (N,): a guideline labeler, for watching only
GoldFn = Callable[[Sequence[int], Sequence[str]], torch.Tensor]


@dataclass
class PPOConfig:
    prompts_per_step: int = 8  # prompts per rollout; each gets k answers
    k: int = 4  # answers per prompt (they share the prompt; GRPO's group)
    max_new_tokens: int = 64
    temperature: float = 1.0  # rollout sampling; the policy is the tempered distribution
    epochs: int = 2  # passes over each rollout
    # minibatch = train.batch_size * train.grad_accum answers; one optimizer step each
    advantage: str = "gae"  # gae | grpo (group-relative baseline, no value model)
    scale_rewards: bool = True  # grpo: divide by the group's spread (false: Dr. GRPO)
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    kl_estimator: str = "k1"  # k1 = log p - log p_ref (unbiased) | k3 (unbiased, >= 0)
    kl_coef: float = 0.05  # beta: the initial coefficient of the KL penalty
    adaptive_kl: bool = False  # Ziegler et al. 2019: steer beta towards kl_target
    kl_target: float = 6.0  # nats per answer
    kl_horizon: int = 10000  # answers over which beta adapts
    missing_eos_penalty: float = 1.0  # subtracted from the score of an unfinished answer
    ptx_coef: float = 0.0  # PPO-ptx: weight of the pre-training loss (needs ptx batches)
    value_lr: float = 1e-4  # the value model's AdamW LR (train.lr is the policy's)
    value_muon_lr: float = 0.005

    def __post_init__(self):
        checks = [
            (self.k >= 2 or self.advantage == "gae",
             f"ppo.k={self.k}: a group-relative baseline needs k >= 2 answers per prompt"),
            (self.k >= 1 and self.prompts_per_step >= 1, "ppo.k and ppo.prompts_per_step >= 1"),
            (self.max_new_tokens >= 1, "ppo.max_new_tokens must be at least 1"),
            (self.temperature > 0, "ppo.temperature must be > 0 (PPO needs sampling)"),
            (self.epochs >= 1, "ppo.epochs must be at least 1"),
            (self.advantage in ("gae", "grpo"), f"ppo.advantage={self.advantage!r}: use gae "
             "or grpo"),
            (self.kl_estimator in ("k1", "k3"), f"ppo.kl_estimator={self.kl_estimator!r}: "
             "use k1 or k3"),
            (0 < self.cliprange < 1 and self.cliprange_value > 0,
             "ppo.cliprange must be in (0, 1) and ppo.cliprange_value > 0"),
            (0 <= self.gamma <= 1 and 0 <= self.lam <= 1, "ppo.gamma and ppo.lam in [0, 1]"),
            (self.kl_coef >= 0 and self.kl_target > 0 and self.kl_horizon > 0,
             "ppo.kl_coef >= 0, ppo.kl_target > 0 and ppo.kl_horizon > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


# --- numerics -----------------------------------------------------------------------------------
def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from the logprobs of sampled tokens.
    k1 = log(p / p_ref): unbiased, can be negative. k3 = r - 1 - log r with r = p_ref / p:
    unbiased too, never negative, lower variance when the two are close."""
    log_ratio = logp - ref_logp
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}")


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the real tokens; padding stays 0."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """(N,) position of each row's last real token in a (N, R) mask whose ones are a prefix."""
    return (mask.sum(1).long() - 1).clamp(min=0)


def end_scores(scores: torch.Tensor, ended: torch.Tensor, penalty: float) -> torch.Tensor:
    """Scores (N,) with `penalty` taken off every answer that did not end properly."""
    return scores - penalty * (~ended).to(scores.dtype)


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor,
                  beta: float) -> torch.Tensor:
    """(N, R) rewards: -beta * KL on every answer token, + the score at the last real one.
    Padding after the answer gets nothing, whatever its KL entries hold."""
    rewards = -beta * kl * mask  # (N, R)
    rows = torch.arange(len(scores), device=scores.device)
    rewards[rows, last_index(mask)] += scores
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) on (N, R) tensors whose real
    tokens are a prefix of each row: delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t +
    gamma lam A_{t+1}. Values and rewards on padding count as 0, so an answer's last token
    sees a terminal next state. Returns (advantages, returns = advantages + values)."""
    rewards, values = rewards * mask, values * mask
    adv = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])  # (N,)
    R = rewards.shape[1]
    for t in reversed(range(R)):
        next_v = values[:, t + 1] if t + 1 < R else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        running = delta + gamma * lam * running
        adv[:, t] = running
    return adv * mask, (adv + values) * mask


def group_advantages(returns: torch.Tensor, k: int, eps: float = 1e-6, scale: bool = True
                     ) -> torch.Tensor:
    """GRPO's group-relative advantage of each answer: (R_i - mean of its group) / (std of
    its group + eps), or without the division when not `scale`, for returns (N,) laid out as
    consecutive groups of k answers."""
    g = returns.view(-1, k)  # (N / k, k)
    adv = g - g.mean(1, keepdim=True)
    if scale:
        adv = adv / (g.std(1, keepdim=True) + eps)
    return adv.reshape(-1)


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor,
                mask: torch.Tensor, clip: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped surrogate -min(ratio A, clip(ratio) A), mean over real tokens; stats:
    share of tokens clipped, the approximate KL to the behaviour policy, the ratio."""
    log_ratio = logp - old_logp
    ratio = log_ratio.exp()
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((clipped > unclipped).float(), mask),
                 "approxkl": 0.5 * masked_mean(log_ratio**2, mask),
                 "ratio": masked_mean(ratio, mask)}
    return loss, stats


def value_loss(v: torch.Tensor, old_v: torch.Tensor, returns: torch.Tensor,
               mask: torch.Tensor, clip: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """0.5 * max((V - G)^2, (V_clipped - G)^2), V_clipped within `clip` of the rollout's V."""
    v_clipped = old_v + (v - old_v).clamp(-clip, clip)
    a, b = (v - returns) ** 2, (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(a, b), mask)
    return loss, {"clipfrac": masked_mean((b > a).float().detach(), mask)}


class KLController:
    """beta, fixed or adaptive. Adaptive (Ziegler et al. 2019, as their lm-human-preferences
    code does it): e = clip(KL / target - 1, -0.2, 0.2); beta *= 1 + e * n / horizon after a
    rollout of n answers whose mean KL was KL."""

    def __init__(self, cfg: PPOConfig, value: float | None = None):
        self.cfg = cfg
        self.value = cfg.kl_coef if value is None else value

    def update(self, kl: float, n: int) -> None:
        if self.cfg.adaptive_kl:
            e = min(max(kl / self.cfg.kl_target - 1, -0.2), 0.2)
            self.value *= 1 + e * n / self.cfg.kl_horizon


# --- rollouts -----------------------------------------------------------------------------------
@dataclass
class Rollout:
    """K answers to each of a batch of prompts, as right-padded tensors. Answer token j of row
    i sits at ids[i, start[i] + j]; (N, R) tensors are in answer order, R = the longest."""

    ids: torch.Tensor  # (N, L) prompt + answer + padding
    start: torch.Tensor  # (N,) where each answer begins (= the prompt's length)
    mask: torch.Tensor  # (N, R) 1.0 on answer tokens, through the end-of-answer token
    logprobs: torch.Tensor  # (N, R) the behaviour policy's logprob of each answer token
    ended: torch.Tensor  # (N,) bool: the answer closed with the end-of-answer token
    prompt_index: list[int]  # (N,) which prompt each answer answers (groups of k)
    completions: list[Completion]


def pad_rows(rows: Sequence[Sequence[float]], width: int, value: float = 0.0,
             dtype=torch.float32) -> torch.Tensor:
    out = torch.full((len(rows), width), value, dtype=dtype)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(list(r), dtype=dtype)
    return out


def rollout(engine: Engine, prompts: Sequence[Sequence[int]], picks: list[int],
            cfg: PPOConfig, end_id: int, pad_id: int, seed: int) -> Rollout:
    """cfg.k sampled answers per picked prompt, each with its own seed (a function of `seed`,
    so a resumed run samples the same), stopping at the end-of-answer token."""
    order = [i for i in picks for _ in range(cfg.k)]
    params = [SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                             seed=seed * 1_000_003 + n, stop_token_ids=[end_id],
                             logprobs=True, truncate=True)
              for n in range(len(order))]
    done = engine.generate([list(prompts[i]) for i in order], params)
    answers = [c.token_ids for c in done]
    seqs = [c.prompt_ids + a for c, a in zip(done, answers)]
    L, R = max(map(len, seqs)), max(map(len, answers))
    return Rollout(ids=pad_rows(seqs, L, pad_id, torch.long),
                   start=torch.tensor([len(c.prompt_ids) for c in done]),
                   mask=pad_rows([[1.0] * len(a) for a in answers], R),
                   logprobs=pad_rows([c.logprobs for c in done], R),
                   ended=torch.tensor([bool(a) and a[-1] == end_id for a in answers]),
                   prompt_index=order, completions=done)


def answer_positions(start: torch.Tensor, R: int, L: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, R) positions of the logits that predict each answer token, and of the tokens."""
    j = torch.arange(R, device=start.device)
    tokens = (start[:, None] + j).clamp(max=L - 1)  # (N, R); padding reads a valid position
    return (tokens - 1).clamp(min=0), tokens


def answer_tokens(start: torch.Tensor, mask: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The real answer tokens of a (N, R) mask as flat indices (n,): the row, the answer
    position j, and the token's position start + j in the row's ids."""
    rows, j = mask.nonzero(as_tuple=True)
    return rows, j, start[rows] + j


def shared_prompts(ids: torch.Tensor, start: torch.Tensor, mask: torch.Tensor) -> Packed:
    """The Packed layout (models/layers.py) of a rollout's rows (N, L): the K answers to one
    prompt share it, so the trunk computes each prompt once and no padding after an answer."""
    lengths = (start + mask.sum(1).long()).tolist()
    seqs = [row[:n] for row, n in zip(ids.tolist(), lengths)]
    groups: dict[tuple[int, ...], list[int]] = {}
    for n, s in enumerate(start.tolist()):
        groups.setdefault(tuple(seqs[n][:s]), []).append(n)
    return Packed.pack(seqs, list(groups.values()), ids.shape[1], pad_id=0).to(ids.device)


def answer_logprobs(model: nn.Module | FastGPT, ids: torch.Tensor, start: torch.Tensor,
                    mask: torch.Tensor, temperature: float, entropy: bool = False,
                    packed: Packed | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logprob of each answer token, entropy of the distribution it was drawn from, when
    asked, no gradient), both (N, R) and 0 off the answers, under `model`'s distribution at
    `temperature`. The head and the log-softmax run on the real answer tokens only: not on
    the prompt or the padding (a third of a GRPO rollout's positions), and no (N, L, V)
    tensor is made. The trunk runs each prompt once: a FastGPT twin continues one cached copy
    per prompt (`FastGPT.answer_states`), a GPT reads `packed` (`shared_prompts`)."""
    rows, j, tok = answer_tokens(start, mask)
    if isinstance(model, FastGPT):
        h = model.answer_states(ids, start, mask.sum(1).long())[rows, j]  # (n, C)
        logits = model.logits(h)
    else:
        logits = logits_at(model, ids, rows, tok - 1, packed)
    if temperature != 1.0:
        logits = logits.float() / temperature  # (n, V)
    logp, h = token_logprobs(logits, ids[rows, tok], entropy)  # (n,), (n,) or None
    out = logp.new_zeros(mask.shape).index_put((rows, j), logp)  # (N, R)
    ent = None if h is None else h.new_zeros(mask.shape).index_put((rows, j), h)
    return out, ent


def inference_twin(model: nn.Module, dtype: torch.dtype | None = None) -> FastGPT | nn.Module:
    """The model's FastGPT twin (infer/fast.py: fused q/k/v, packed weights in `dtype`, None:
    the model's own), which reads a no-grad batch faster than the training modules and is the
    code the engine's logprobs come from, so both sides of the KL are read alike; the model
    itself where FastGPT does not implement its config. The twin copies the weights: a frozen
    model's lasts the run."""
    try:
        return FastGPT(model, dtype)
    except UserError:
        return model


def answer_values(value_model: nn.Module, ids: torch.Tensor, start: torch.Tensor,
                  R: int, packed: Packed | None = None) -> torch.Tensor:
    """(N, R) the value of the state before each answer token: the value model's per-token
    output at the position that predicts it (its trunk on `packed` when given: PerToken)."""
    v = value_model(ids) if packed is None else value_model(ids, packed)  # (N, L) or (N, L, 1)
    if v.dim() == 3:
        v = v[..., 0]
    pred, _ = answer_positions(start, R, ids.shape[1])
    return v.float().gather(1, pred)


class PerToken(nn.Module):
    """A reward model (models/heads.py) as PPO's value model: its head at every position is
    `forward`, the call that setup()'s DDP or compile wrapper makes."""

    def __init__(self, reward_model: nn.Module):
        super().__init__()
        self.rm = reward_model
        self.family, self.config = reward_model.family, reward_model.config

    def forward(self, idx: torch.Tensor, packed: Packed | None = None) -> torch.Tensor:
        return self.rm.values(idx, packed)  # (B, T)

    def optim_groups(self) -> dict[str, list[nn.Parameter]]:
        return self.rm.optim_groups()


# --- the outer loop -----------------------------------------------------------------------------
@dataclass
class Batch:
    """Everything the updates need from one rollout, on the training device."""

    ids: torch.Tensor  # (N, L)
    start: torch.Tensor  # (N,)
    mask: torch.Tensor  # (N, R)
    old_logp: torch.Tensor  # (N, R)
    adv: torch.Tensor  # (N, R)
    old_values: torch.Tensor  # (N, R) zeros under grpo
    returns: torch.Tensor  # (N, R)

    def rows(self, idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The micro-batch of rows `idx`, cut to its own longest sequence and answer."""
        mask = self.mask[idx]
        R = max(int(mask.sum(1).max()), 1)
        L = int((self.start[idx] + mask.sum(1).long()).max())
        return (self.ids[idx, :L], self.start[idx], mask[:, :R], self.old_logp[idx, :R],
                self.adv[idx, :R], self.old_values[idx, :R], self.returns[idx, :R])


@dataclass
class Models:
    """The four parts of PPO. `value` is None under grpo."""

    policy: nn.Module
    ref: nn.Module
    reward: RewardFn
    value: nn.Module | None = None


class PPOTrainer:
    """Holds the models, their `Setup`s and beta; `train()` runs the iterations."""

    def __init__(self, models: Models, prompts: Sequence[Sequence[int]], cfg: PPOConfig,
                 train_cfg: TrainConfig, run_dir: Path, end_id: int, pad_id: int,
                 tokenizer=None, ptx_batch: Callable[[int, int], tuple] | None = None,
                 gold: GoldFn | None = None, resume: bool = False):
        if not prompts:
            raise UserError("ppo needs prompts; the prompt set is empty")
        if cfg.advantage == "gae" and models.value is None:
            raise UserError("ppo.advantage='gae' needs a value model; give a reward run or use "
                            "ppo.advantage='grpo'")
        if cfg.ptx_coef > 0 and ptx_batch is None:
            raise UserError("ppo.ptx_coef > 0 needs pre-training text: set data.ptx_corpus")
        self.cfg, self.tcfg, self.run_dir = cfg, train_cfg, Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.prompts, self.end_id, self.pad_id = prompts, end_id, pad_id
        self.ptx_batch, self.gold = ptx_batch, gold
        self.n_answers = cfg.prompts_per_step * cfg.k
        self.mb = train_cfg.batch_size * train_cfg.grad_accum
        if self.n_answers % self.mb:
            raise UserError(f"a rollout of {cfg.prompts_per_step} prompts x {cfg.k} answers = "
                            f"{self.n_answers} does not split into minibatches of "
                            f"train.batch_size x train.grad_accum = {self.mb}; make it divide")
        for m in (models.policy, models.ref, models.value):
            if m is not None:
                _no_dropout(m)
        models.ref.eval().requires_grad_(False)
        self.models = models
        self.pol = setup(models.policy, train_cfg, self.run_dir, resume)
        self.val: Setup | None = None
        if models.value is not None:
            vcfg = dataclasses.replace(train_cfg, lr=cfg.value_lr, muon_lr=cfg.value_muon_lr)
            self.val = setup(models.value, vcfg, self.run_dir / "value", resume)
            self.vcfg = vcfg
        models.ref.to(self.pol.device)
        self.ref_net = inference_twin(models.ref, self.pol.dtype)  # frozen: one for the run
        self.tokenizer = tokenizer
        self.kl = KLController(cfg, self.pol.resumed.get("kl_coef"))
        self.step = int(self.pol.resumed.get("step", 0))
        self.episodes = int(self.pol.resumed.get("episodes", 0))

    @property
    def engine(self) -> Engine:
        """A fresh engine over the current weights. Not one kept engine: it notices new
        weights by tensor version counters, which fused AdamW's in-place step leaves
        unchanged (PyTorch 2.13), so a kept one went on sampling from stale weights."""
        return Engine(self.pol.raw, self.tokenizer, max_batch=max(self.n_answers, 1),
                      dtype=self.pol.dtype)

    # -- one iteration --
    def pick_prompts(self, it: int) -> list[int]:
        """Prompts of iteration `it`: a seeded draw, a pure function of (seed, it)."""
        gen = torch.Generator().manual_seed(self.tcfg.seed * 1_000_003 + it * 1_009)
        n = len(self.prompts)
        picks = torch.randperm(n, generator=gen)[: self.cfg.prompts_per_step].tolist()
        while len(picks) < self.cfg.prompts_per_step:  # fewer prompts than a rollout needs
            picks += torch.randint(n, (1,), generator=gen).tolist()
        return picks

    @torch.no_grad()
    def measure(self, ro: Rollout) -> dict[str, torch.Tensor]:
        """The rollout on the device, with the policy's and the reference's logprobs, the
        per-token KL and the reward model's scores (raw, and less the missing-end penalty)."""
        d, c = self.pol.device, self.cfg
        ids, start, mask = ro.ids.to(d), ro.start.to(d), ro.mask.to(d)
        with torch.inference_mode():
            if c.temperature == 1.0:
                logp = ro.logprobs.to(d)
            else:  # the current weights' twin, as the engine sampled from
                logp = answer_logprobs(inference_twin(self.pol.raw, self.pol.dtype), ids,
                                       start, mask, c.temperature)[0]
            ref_logp = answer_logprobs(self.ref_net, ids, start, mask, c.temperature)[0]
        logp, ref_logp = logp.clone() * mask, ref_logp.clone() * mask  # out of inference mode
        kl = kl_estimate(logp, ref_logp, c.kl_estimator) * mask  # (N, R)
        raw = self.models.reward([cm.prompt_ids for cm in ro.completions],
                                 [cm.token_ids for cm in ro.completions]).float().to(d)
        scores = end_scores(raw, ro.ended.to(d), c.missing_eos_penalty)
        return dict(ids=ids, start=start, mask=mask, logp=logp, kl=kl, scores=scores,
                    raw_scores=raw)

    @torch.no_grad()
    def score(self, ro: Rollout) -> dict[str, torch.Tensor]:
        """`measure`, then values, per-token rewards, advantages and returns."""
        c, sc = self.cfg, self.measure(ro)
        ids, start, mask = sc["ids"], sc["start"], sc["mask"]
        values = torch.zeros_like(sc["logp"])
        if self.val is not None:
            with self.val.autocast:
                values = answer_values(self.val.model, ids, start, mask.shape[1],
                                       shared_prompts(ids, start, mask)) * mask
        rewards = token_rewards(sc["scores"], sc["kl"], mask, self.kl.value)
        if c.advantage == "gae":
            adv, returns = gae(rewards, values, mask, c.gamma, c.lam)
        else:
            adv = group_advantages(rewards.sum(1), c.k, scale=c.scale_rewards)[:, None] * mask
            returns = torch.zeros_like(adv)
        if c.whiten_advantages and c.advantage == "gae":  # grpo's are normalised already
            adv = masked_whiten(adv, mask)
        return sc | dict(rewards=rewards, adv=adv, returns=returns, values=values)

    def policy_objective(self, stats: dict[str, list[float]]):
        c = self.cfg

        def objective(model: nn.Module, batch: tuple[torch.Tensor, ...]):
            ids, start, mask, old_logp, adv = batch[:5]
            logp, entropy = answer_logprobs(model, ids, start, mask, c.temperature,
                                            entropy=True, packed=shared_prompts(ids, start, mask))
            loss, st = policy_loss(logp, old_logp, adv, mask, c.cliprange)
            _add(stats, "policy/clipfrac_avg", st["clipfrac"])
            _add(stats, "policy/approxkl_avg", st["approxkl"])
            _add(stats, "val/ratio", st["ratio"])
            _add(stats, "policy/entropy_avg", masked_mean(entropy, mask))
            _add(stats, "loss/policy_avg", loss.detach())
            if c.ptx_coef > 0:
                x, y = batch[7:9]
                ptx = model(x, y)
                _add(stats, "loss/ptx_avg", ptx.detach())
                loss = loss + c.ptx_coef * ptx
            return loss, int(mask.sum())

        return objective

    def value_objective(self, stats: dict[str, list[float]]):
        c = self.cfg

        def objective(model: nn.Module, batch: tuple[torch.Tensor, ...]):
            ids, start, mask, _, _, old_v, returns = batch[:7]
            v = answer_values(model, ids, start, mask.shape[1], shared_prompts(ids, start, mask))
            loss, st = value_loss(v, old_v, returns, mask, c.cliprange_value)
            _add(stats, "loss/value_avg", loss.detach())
            _add(stats, "val/clipfrac_avg", st["clipfrac"])
            return loss, int(mask.sum())

        return objective

    def update(self, it: int, sc: dict[str, torch.Tensor]) -> dict[str, list[float]]:
        """cfg.epochs passes over the rollout in shuffled minibatches; one optimizer step of
        the policy and one of the value model per minibatch."""
        b = Batch(sc["ids"], sc["start"], sc["mask"], sc["logp"], sc["adv"], sc["values"],
                  sc["returns"])
        stats: dict[str, list[float]] = {}
        pol_obj, val_obj = self.policy_objective(stats), self.value_objective(stats)
        gen = torch.Generator().manual_seed(self.tcfg.seed * 7_919 + it)
        B, n_micro = self.tcfg.batch_size, self.tcfg.grad_accum
        for epoch in range(self.cfg.epochs):
            order = torch.randperm(self.n_answers, generator=gen).to(b.ids.device)
            for m0 in range(0, self.n_answers, self.mb):
                micro = [b.rows(order[m0 + k * B : m0 + (k + 1) * B]) for k in range(n_micro)]
                if self.cfg.ptx_coef > 0:
                    micro = [m + tuple(self.ptx_batch(it, epoch * 1000 + m0 + k))
                             for k, m in enumerate(micro)]
                optimizer_step(self.pol, self.tcfg, pol_obj, micro)
                if self.val is not None:
                    optimizer_step(self.val, self.vcfg, val_obj, micro)
        return stats

    def iteration(self, it: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        factor = lr_factor(it, self.tcfg.steps, self.tcfg.warmup_steps, self.tcfg.schedule,
                           self.tcfg.cooldown, self.tcfg.min_lr_factor)
        lrs = set_lr(self.pol.optimizers, factor)
        if self.val is not None:
            set_lr(self.val.optimizers, factor)
        ro = rollout(self.engine, self.prompts, self.pick_prompts(it), self.cfg, self.end_id,
                     self.pad_id, self.tcfg.seed * 10_007 + it)
        t_gen = time.perf_counter() - t0
        sc = self.score(ro)
        stats = self.update(it, sc)
        row = rollout_metrics(sc, ro, self.kl.value)
        if self.gold is not None:
            gold = self.gold(ro.prompt_index, [cm.text for cm in ro.completions]).float()
            if bool((~gold.isnan()).any()):  # NaN: an answer the labeler cannot judge
                row["objective/gold"] = float(gold.nanmean())
        row |= {k: sum(v) / len(v) for k, v in stats.items()}
        self.kl.update(row["objective/kl"], self.n_answers)
        self.episodes += self.n_answers
        row |= dict(lr=factor * self.tcfg.lr, **lrs, episode=self.episodes,
                    gen_time=t_gen, iter_time=time.perf_counter() - t0)
        return row

    # -- the whole run --
    def save(self) -> None:
        if not self.pol.dinfo.main:
            return
        loop = {"kl_coef": self.kl.value, "episodes": self.episodes}
        save_model(self.run_dir, self.pol.raw)
        checkpoint.save_state(self.run_dir, self.step, self.pol.raw, self.pol.optimizers, loop,
                              self.tcfg.keep_states)
        if self.val is not None:  # a reward-family run dir: `tinylm.load` reads it
            raw = self.val.raw
            save_model(self.run_dir / "value", raw.rm if isinstance(raw, PerToken) else raw)
            checkpoint.save_state(self.run_dir / "value", self.step, self.val.raw,
                                  self.val.optimizers, loop, self.tcfg.keep_states)

    def train(self, eval_fn: Callable[[PPOTrainer], dict[str, float]] | None = None
              ) -> dict[str, Any]:
        """train.steps iterations (rollout + updates); eval_fn(self) every train.eval_every
        iterations and at the end; the policy (and value model) saved with resume state."""
        log = MetricsLog(self.run_dir / "metrics.jsonl" if self.pol.dinfo.main else None,
                         self.step)
        bar = tqdm(total=self.tcfg.steps, initial=self.step, leave=False, dynamic_ncols=True,
                   disable=not (self.tcfg.progress and self.pol.dinfo.main))
        last: dict[str, Any] = {}
        if eval_fn is not None and self.step == 0:  # the starting point, for comparison
            metrics = eval_fn(self)
            if metrics:
                log.write(step=0, **metrics)
            last |= metrics
        while self.step < self.tcfg.steps:
            row = self.iteration(self.step)
            self.step += 1
            if not all(math.isfinite(v) for v in row.values() if isinstance(v, float)):
                raise UserError(f"PPO diverged at iteration {self.step} (a metric is not "
                                "finite); lower train.lr or raise ppo.kl_coef")
            if self.step % self.tcfg.log_every == 0 or self.step == self.tcfg.steps:
                log.write(step=self.step, **row)
            last |= row
            bar.set_postfix(score=f"{row['objective/scores']:.3f}",
                            kl=f"{row['objective/kl']:.3f}")
            bar.update(1)
            end = self.step == self.tcfg.steps or self.step == self.tcfg.stop_after
            if eval_fn is not None and (end or (self.tcfg.eval_every
                                                and self.step % self.tcfg.eval_every == 0)):
                metrics = eval_fn(self)
                if metrics:
                    log.write(step=self.step, **metrics)
                last |= metrics
            if end or (self.tcfg.save_every and self.step % self.tcfg.save_every == 0):
                self.save()
            if end:
                break
        bar.close()
        return last | {"step": self.step, "episode": self.episodes}


def rollout_metrics(sc: dict[str, torch.Tensor], ro: Rollout, beta: float) -> dict[str, float]:
    """The rollout's numbers under TRL's names, plus what reward hacking shows in: answer
    length, its correlation with the score, the share of answers that ended properly."""
    mask = sc["mask"]
    kl = sc["kl"].sum(1)  # (N,) per answer
    non_score = -beta * kl
    length = mask.sum(1)
    return {
        "objective/kl": float(kl.mean()),
        "objective/entropy": float((-sc["logp"] * mask).sum(1).mean()),
        "objective/non_score_reward": float(non_score.mean()),
        "objective/rlhf_reward": float((sc["scores"] + non_score).mean()),
        "objective/scores": float(sc["scores"].mean()),
        "objective/raw_scores": float(sc["raw_scores"].mean()),
        "objective/kl_coef": beta,
        "val/num_eos_tokens": float(ro.ended.sum()),
        "answer/ended_share": float(ro.ended.float().mean()),
        "answer/length": float(length.mean()),
        "answer/length_score_corr": correlation(length, sc["raw_scores"].to(length.device)),
    }


EVAL_SEED = 20_221_130  # the same answers' seeds at every evaluation


@torch.no_grad()
def evaluate(t: PPOTrainer, prompts: Sequence[Sequence[int]], gold: GoldFn | None = None
             ) -> dict[str, float]:
    """One sampled answer to each prompt (the same seeds every time, so evaluations differ
    only by the policy): the proxy score (the reward model, before the missing-end penalty)
    beside the gold score, KL to the reference, length and its correlation with the proxy,
    and the share of answers that end properly."""
    cfg = dataclasses.replace(t.cfg, k=1, advantage="gae")  # one answer: no group
    ro = rollout(t.engine, prompts, list(range(len(prompts))), cfg, t.end_id, t.pad_id,
                 EVAL_SEED)
    sc = t.measure(ro)
    length = sc["mask"].sum(1)
    out = {"eval/scores": float(sc["raw_scores"].mean()),
           "eval/kl": float(sc["kl"].sum(1).mean()),
           "eval/length": float(length.mean()),
           "eval/length_score_corr": correlation(length, sc["raw_scores"]),
           "eval/ended_share": float(ro.ended.float().mean())}
    if gold is not None:
        g = gold(ro.prompt_index, [c.text for c in ro.completions]).float()
        if bool((~g.isnan()).any()):
            out["eval/gold"] = float(g.nanmean())
    return out


class HackingWatch:
    """Warns when the proxy score rose since the last evaluation while the gold score fell:
    the policy is learning the reward model's mistakes rather than the guidelines."""

    def __init__(self) -> None:
        self.prev: dict[str, float] | None = None

    def check(self, m: dict[str, float]) -> dict[str, float]:
        p, self.prev = self.prev, m
        flag = (p is not None and "eval/gold" in m and "eval/gold" in p
                and m["eval/scores"] > p["eval/scores"] and m["eval/gold"] < p["eval/gold"])
        if flag:
            print(f"warning: possible reward hacking: the proxy score rose "
                  f"({p['eval/scores']:.3f} -> {m['eval/scores']:.3f}) while the gold score "
                  f"fell ({p['eval/gold']:.3f} -> {m['eval/gold']:.3f})")
        return m | {"eval/hacking_warning": float(flag)}


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation; 0 when either side does not vary."""
    a, b = a.float() - a.float().mean(), b.float() - b.float().mean()
    den = float(a.norm() * b.norm())
    return float((a * b).sum()) / den if den > 0 else 0.0


def _add(stats: dict[str, list[float]], key: str, value: torch.Tensor) -> None:
    stats.setdefault(key, []).append(float(value))


def _no_dropout(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
