"""PPO: a chat model learns to maximise a reward model's score while staying near where it
started (train/ppo.py holds the algorithm and says where it departs from the textbook).

    tinylm ppo --init runs/sft-tinystories --set reward='"runs/reward"'

The policy starts from an SFT run (`init`); a frozen copy of it is the reference; the reward
model (`reward`, a run of `tinylm reward`) scores answers, and a copy of it, trained per
token, is the value model (several runs, comma-separated: an ensemble, the mean of their
normalised scores; the value model starts from the first). Prompts are conversations (JSONL)
cut before their first assistant turn and rendered through the policy's chat template with
the generation prompt; an answer ends at the token that closes an assistant turn.
`reward = "labeler:request"` puts the guideline labeler itself in the reward model's place:
not RLHF, but the ceiling a perfect reward model would allow.

Every evaluation (train.eval_every and the ends) samples one answer to each of the first
data.eval_prompts held-out prompts, with the same seeds each time, and logs what reward
hacking shows in: the proxy score (the reward model) beside the gold score (a guideline
labeler, never trained on), KL to the reference, answer length and its correlation with the
proxy score, the share of answers that end properly; it warns when the proxy rises while the
gold score falls.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tinylm import config as configlib
from tinylm import rundir, viz
from tinylm.data import chat
from tinylm.data.text import load_text
from tinylm.data.tokens import TokenData, encode_cached
from tinylm.errors import UserError
from tinylm.feedback import labelers
from tinylm.feedback.collect import read_prompts
from tinylm.feedback.preferences import hidden_states
from tinylm.infer.chat import turn_end_ids
from tinylm.models.heads import RewardModel
from tinylm.perf import pick_device
from tinylm.stages.common import batch_generator, load_reference, prepare_run_dir
from tinylm.tokenizer import Tokenizer
from tinylm.train import ppo
from tinylm.train.loop import TrainConfig, train_dtype


@dataclass
class PromptDataConfig:
    prompts: str = "runs/chat/chat-train.jsonl"  # JSONL: {"messages"} cut before the first
    # assistant turn, or {"prompt": "text"} (feedback.collect.read_prompts)
    val_fraction: float = 0.1  # held-out prompts, for the evaluations
    split_seed: int = 0
    eval_prompts: int = 32  # held-out prompts answered at each evaluation; 0 = none
    gold: str = "request"  # the guideline labeler watched beside the proxy | none
    ptx_corpus: str = ""  # pre-training text for PPO-ptx (with ppo.ptx_coef > 0)


@dataclass
class PPOStageConfig:
    out: str = "runs/ppo"
    init: str = ""  # the policy to start from: an SFT run (required)
    ref: str = ""  # the frozen reference of the KL penalty; "" = init (tinylm rlhf: the SFT run)
    reward: str = ""  # the reward model: a run of `tinylm reward` (required); several runs
    # "RM1,RM2,...": an ensemble, the mean of their normalised scores (ensemble_reward); or
    # "dpo:RUN" for a DPO run's implicit reward (implicit_reward); or
    # "labeler:NAME" for the guideline labeler itself (the ceiling: not RLHF, see labeler_reward)
    data: PromptDataConfig = field(default_factory=PromptDataConfig)
    ppo: ppo.PPOConfig = field(default_factory=ppo.PPOConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


LABELER = "labeler:"
IMPLICIT = "dpo:"


def reward_fn(model: RewardModel, pad_id: int, device: torch.device,
              dtype: torch.dtype | None = None) -> ppo.RewardFn:
    """The reward model as a callable over (prompt ids, answer ids): right-padded prompt +
    answer, read at the answer's last token (its end-of-answer token when it has one, where
    the model was trained to read), normalised by the mean and spread the reward stage
    recorded, so ppo.missing_eos_penalty and ppo.kl_coef are in units of its spread. The
    trunk runs in `dtype` (None: the model's own; PPO passes its training arithmetic)."""
    model.eval().requires_grad_(False).to(device)
    trunk = ppo.inference_twin(model.backbone, dtype)  # frozen: one twin for the whole run

    @torch.inference_mode()
    def score(prompts, answers) -> torch.Tensor:
        seqs = [list(p) + list(a) for p, a in zip(prompts, answers)]
        ids = ppo.pad_rows(seqs, max(map(len, seqs)), pad_id, torch.long).to(device)
        last = torch.tensor([len(s) - 1 for s in seqs], device=device)
        h = hidden_states(trunk, ids).float()  # (N, L, C)
        return model.normalized(model.read(h, last)).float().cpu()  # (N,)

    return score


def ensemble_reward(scores: list[ppo.RewardFn]) -> ppo.RewardFn:
    """`reward = "RM1,RM2,..."`: the mean of several reward models' normalised scores. Their
    errors differ where they were trained on different rankings or seeds, so a policy gains
    less by exploiting any one of them (Coste et al. 2023, reward-model ensembles against
    over-optimisation). Each score is already in its own model's spread (reward_fn)."""
    if len(scores) == 1:
        return scores[0]

    def score(prompts, answers) -> torch.Tensor:
        return torch.stack([s(prompts, answers) for s in scores]).mean(0)

    return score


def implicit_reward(run: str, tok: Tokenizer, device: torch.device,
                    dtype: torch.dtype | None = None) -> ppo.RewardFn:
    """`reward = "dpo:RUN"`: the implicit reward of a DPO run (Rafailov et al. 2023), trained
    on the rankings as a reward model is: log pi_dpo(y|x) - log pi_ref(y|x), the answer's
    summed log-probability (its end token included) under the DPO policy less under the
    reference it was trained against (its `ref`, else `init`), in nats. Under the exact
    KL-regularised objective (coefficient 1, that reference) its optimum is the DPO policy,
    and a coefficient c < 1 goes further the way DPO moved, pi_ref * (pi_dpo / pi_ref) **
    (1 / c); GRPO's per-group scaling and the k3 estimator shift where a run ends (docs/
    rlhf.md). A generative judge: it reads the prompt as the language model does."""
    path = Path(run)
    cfg = configlib.read_toml(path / "config.toml") if (path / "config.toml").exists() else {}
    if "beta" not in cfg:
        raise UserError(f"reward = 'dpo:{run}' needs a run of tinylm dpo; {run} is not one")
    check_tokenizer(run, tok, "the DPO run")
    # read as the trainer reads its reference: frozen FastGPT twins, answer_logprobs
    twins = [ppo.inference_twin(rundir.load_model(Path(r), family="gpt").eval()
                                .requires_grad_(False).to(device), dtype)
             for r in (run, cfg.get("ref") or cfg["init"])]

    @torch.inference_mode()
    def score(prompts, answers) -> torch.Tensor:
        seqs = [list(p) + list(a) for p, a in zip(prompts, answers)]
        ids = ppo.pad_rows(seqs, max(map(len, seqs)), tok.pad_id, torch.long).to(device)
        start = torch.tensor([len(p) for p in prompts], device=device)
        mask = ppo.pad_rows([[1.0] * len(a) for a in answers],
                            max(1, max(map(len, answers)))).to(device)
        dpo, ref = (ppo.answer_logprobs(t, ids, start, mask, 1.0)[0].sum(1).float().cpu()
                    for t in twins)
        return dpo - ref

    return score


def labeler_reward(name: str, tok: Tokenizer, prompts: list[list[int]], rows: list[dict]
                   ) -> ppo.RewardFn:
    """`reward = "labeler:NAME"`: the guideline labeler itself as the reward, on the answer's
    text as the engine gives it. Not RLHF (the policy sees the gold score it is judged by):
    the ceiling a perfect reward model would allow, and the run to compare a reward model's
    against (Gao et al. 2022 study over-optimisation with such a gold reward)."""
    labeler = labelers.get(name)
    by_prompt = {tuple(p): r for p, r in zip(prompts, rows)}
    unjudged = [r for r in rows if not labeler.can_judge(r)]
    if unjudged:
        raise UserError(f"the {name} labeler cannot judge {len(unjudged)} of the prompts "
                        f"(e.g. {unjudged[0]['messages'][-1]['content'][:60]!r}); give it "
                        "prompts it can score")

    def score(prompt_ids, answer_ids) -> torch.Tensor:
        return torch.tensor([labeler.score(tok.decode(list(a), skip_special=True),
                                           by_prompt[tuple(p)])
                             for p, a in zip(prompt_ids, answer_ids)], dtype=torch.float)

    return score


def check_tokenizer(run: str, tok: Tokenizer, what: str) -> None:
    """A run that scores the policy's token ids must share the policy's tokenizer."""
    if Tokenizer.load(Path(run) / rundir.TOKENIZER).fingerprint() != tok.fingerprint():
        raise UserError(f"{what} {run} has another tokenizer than the policy; train it from "
                        "the same SFT run (e.g. tinylm reward --init SFT_RUN)")


def load_reward(run: str, tok: Tokenizer) -> RewardModel:
    """The reward run's model, checked to share the policy's tokenizer."""
    model = rundir.load_model(Path(run), family="reward")
    check_tokenizer(run, tok, "the reward model")
    return model


def gold_fn(name: str, rows: list[dict]) -> ppo.GoldFn | None:
    """The guideline labeler's mean score over the answers it can judge (NaN when none)."""
    if name == "none":
        return None
    labeler = labelers.get(name)

    def gold(index, texts) -> torch.Tensor:
        return torch.tensor([labeler.score(t, rows[i]) if labeler.can_judge(rows[i])
                             else float("nan") for i, t in zip(index, texts)])

    return gold


def ptx_batches(cfg: PPOStageConfig, tok: Tokenizer, block: int):
    if cfg.ppo.ptx_coef <= 0:
        return None
    if not cfg.data.ptx_corpus:
        raise UserError("ppo.ptx_coef > 0 needs pre-training text: set data.ptx_corpus")
    data = TokenData(encode_cached(load_text(cfg.data.ptx_corpus), tok), 0.0)
    if len(data.train) <= block + 1:
        raise UserError(f"{cfg.data.ptx_corpus} is too short for {block}-token windows")

    def batch(step: int, k: int):
        return data.batch(cfg.train.batch_size, block,
                          batch_generator(cfg.train.seed + 17, step, k))

    return batch


def run(cfg: PPOStageConfig, resume: bool = False) -> dict[str, Any]:
    """PPO from cfg.init against cfg.reward; returns the last metrics (the rollout's and the
    last evaluation's)."""
    if not cfg.init:
        raise UserError("ppo needs a policy: pass --init SFT_RUN (e.g. runs/sft-tinystories)")
    if not cfg.reward.strip(" ,"):
        raise UserError("ppo needs a reward model: --set reward='\"RUN\"' (a run of tinylm "
                        "reward)")
    run_dir = prepare_run_dir(cfg.out, resume)
    init = Path(cfg.init)
    tok = Tokenizer.load(init / rundir.TOKENIZER)
    template = rundir.chat_template(init, required=True)
    end_id = turn_end_ids(tok, template)[0]
    policy = rundir.load_model(init, family="gpt")
    ref = load_reference(cfg.ref or cfg.init, policy)
    oracle = cfg.reward.removeprefix(LABELER) if cfg.reward.startswith(LABELER) else ""
    implicit = cfg.reward.removeprefix(IMPLICIT) if cfg.reward.startswith(IMPLICIT) else ""
    if (oracle or implicit) and cfg.ppo.advantage == "gae":
        raise UserError(f"reward = {cfg.reward!r} has no reward model to start a value model "
                        "from; use ppo.advantage = 'grpo'")
    runs = [] if oracle or implicit else [r.strip() for r in cfg.reward.split(",") if r.strip()]
    rms = [load_reward(r, tok) for r in runs]
    value = ppo.PerToken(load_reward(runs[0], tok)) if cfg.ppo.advantage == "gae" else None

    rows = [r.row for r in read_prompts(cfg.data.prompts)]  # the one prompt reader
    train_rows, held_rows = chat.split(rows, cfg.data.val_fraction, cfg.data.split_seed)
    held_rows = held_rows[: cfg.data.eval_prompts]

    def encode(rs):
        return [chat.render(tok, r["messages"], template, add_generation_prompt=True).ids
                for r in rs]

    prompts, held = encode(train_rows), encode(held_rows)
    print(f"ppo: {len(prompts)} training and {len(held)} held-out prompts; "
          f"end-of-answer token {tok.id_to_token(end_id)!r}")
    if not resume:
        configlib.save(cfg, run_dir / "config.toml")
        rundir.save_tokenizers(run_dir, tok)
        rundir.save_chat_template(run_dir, template)
        if value is not None:  # the value model's run dir is a complete reward run
            (run_dir / "value").mkdir(exist_ok=True)
            rundir.save_tokenizers(run_dir / "value", tok)
            rundir.save_chat_template(run_dir / "value", template)

    device = pick_device(cfg.train.device)
    if oracle:
        score = labeler_reward(oracle, tok, prompts + held, train_rows + held_rows)
    elif implicit:
        score = implicit_reward(implicit, tok, device, train_dtype(cfg.train, device))
    else:
        score = ensemble_reward([reward_fn(rm, tok.pad_id, device, train_dtype(cfg.train, device))
                                 for rm in rms])
    models = ppo.Models(policy, ref, score, value)
    trainer = ppo.PPOTrainer(models, prompts, cfg.ppo, cfg.train, run_dir, end_id, tok.pad_id,
                             tokenizer=tok, gold=gold_fn(cfg.data.gold, train_rows),
                             ptx_batch=ptx_batches(cfg, tok, policy.config.block_size),
                             resume=resume)
    held_gold = gold_fn(cfg.data.gold, held_rows)
    watch = ppo.HackingWatch()

    def eval_fn(t: ppo.PPOTrainer) -> dict[str, float]:
        return watch.check(ppo.evaluate(t, held, held_gold)) if held else {}

    result = trainer.train(eval_fn)
    plot(run_dir)
    return result


PANELS = [  # (title, metric names): the curves a PPO run is judged by
    ("score", ["objective/scores", "eval/scores"]),
    ("gold score (guideline labeler)", ["objective/gold", "eval/gold"]),
    ("KL to the reference (nats per answer)", ["objective/kl", "eval/kl"]),
    ("rlhf reward = score - beta KL", ["objective/rlhf_reward"]),
    ("answer length (tokens)", ["answer/length", "eval/length"]),
    ("answers ended properly", ["answer/ended_share", "eval/ended_share"]),
    ("policy", ["policy/clipfrac_avg", "policy/approxkl_avg"]),
    ("value loss", ["loss/value_avg"]),
]


def plot(run_dir: Path) -> Path | None:
    """ppo.png: one panel per question (is the score rising, is the gold score, how far from
    the reference, is it getting longer, ...), rollout and held-out curves together."""
    import matplotlib.pyplot as plt  # after tinylm.viz chose the Agg backend

    rows = viz.read_metrics(run_dir)
    panels = [(t, ks) for t, ks in PANELS if any(k in r for r in rows for k in ks)]
    if not panels:
        return None
    cols = 2
    n_rows = (len(panels) + 1) // cols
    fig, axes = plt.subplots(n_rows, cols, figsize=(10, 2.6 * n_rows + 0.5), squeeze=False)
    for ax, (title, keys) in zip(axes.flat, panels):
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if pts:
                ax.plot(*zip(*pts), "o-" if key.startswith("eval/") else "-", ms=3, lw=1,
                        label=key)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"{Path(run_dir).name}: PPO iterations", fontsize=10)
    fig.tight_layout()
    out = Path(run_dir) / "ppo.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
