"""tinylm's RLHF stages side by side with TRL's trainers, on the same model, data and batch.

    python benchmarks/trl_compare.py [--quick] [--only reward,dpo,grpo] [--repeats 2]

Inputs (read only): an SFT run (`--sft`, default runs/sft-timed2), its `tinylm export-hf`
folder (made under `--out` when missing: TRL loads that, so both sides start from the same
weights), and K-wise rankings from the feedback store (`--rankings`, default
runs/rlhf/rankings.jsonl, from `tinylm feedback collect` + `tinylm feedback export`).
Nothing is downloaded: TRL reads local files only.

The rankings are split by prompt exactly as the tinylm stages split them
(`feedback.preferences.split_rows`, `data.val_fraction`, `data.split_seed`); TRL gets every
ordered pair of the same training rankings (`feedback.io.pair_lines`, what `feedback export
--format pairs` writes) and is scored on the pairs of the same held-out rankings.

Three comparisons, each contender a fresh process (load time excluded), in turns (tinylm,
TRL, tinylm, TRL, ...) so background load falls on both alike; `--threads` threads, CPU, fp32
weights, and `--dtype` for the arithmetic: fp32, or bf16 autocast on both sides (tinylm's
`train.dtype = "bfloat16"`, TRL's `bf16=True`), or `auto` (the default): bf16 where bf16
matmuls measured faster (`perf.cpu_bf16_is_fast`, as on CPUs with AMX), else fp32, what
tinylm's `train.dtype = "auto"` picks:

- **reward**: `tinylm reward` (K answers of a prompt in one batch element, one forward per
  answer, all C(K, 2) pairs of it in the loss) against TRL's `RewardTrainer`
  (`AutoModelForSequenceClassification`, num_labels=1, one forward per side of every pair).
  The same pairs per optimizer step: TRL's batch is tinylm's prompts per step times the mean
  number of ordered pairs per training ranking. Held-out pairwise accuracy on both, an equal
  score counting half (tinylm's definition).
- **dpo**: `tinylm dpo` against TRL's `DPOTrainer`, the same pairs per step, beta, lr, both
  drawing the pairs independently. tinylm computes the reference log-probs once before
  training, forwards each distinct answer of a batch once, and runs its LM head only on the
  answer positions; TRL by default (`--trl-precompute-ref` to change it) runs its reference
  model every step. `--dpo-by-ranking` draws tinylm's pairs ranking by ranking instead (all
  the pairs of random training rankings, a random part of the last one's: about 18 rows for
  16 pairs, where independent pairs take about 30), still `--dpo-batch` pairs a step; the
  table's batch column says which. Held-out accuracy: the share of held-out pairs whose
  implicit reward margin (policy minus reference log-ratio, chosen minus rejected) is
  positive.
- **grpo**: `tinylm ppo` with `ppo.advantage = "grpo"` against TRL's `GRPOTrainer`: the same
  prompts (the training prompts of the rankings), prompts per iteration, completions per
  prompt, max new tokens, temperature 1, KL coefficient, one optimizer step per iteration over
  the whole rollout, and the same reward: the tinylm reward model trained in the reward
  comparison (or `--reward-run`), called for TRL as a Python reward function through the very
  callable `tinylm ppo` uses (`stages.ppo.reward_fn`).

Seconds per optimizer step (per iteration for grpo) are the median after `--warmup` steps,
over all repeats. tinylm's come from its metrics.jsonl (the training loop's cumulative
`train_time`, PPO's `iter_time`, logged every step); TRL's from a TrainerCallback (the time
between consecutive `on_step_end`s, the first measured from `on_train_begin`).

Prints a Markdown table: task, tinylm s/step, TRL s/step, ratio (TRL / tinylm), both
held-out accuracies, target met (ratio >= 3 and tinylm's accuracy no worse).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET = 3.0  # issue 12: at least 3x faster per optimizer step / iteration
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}  # --dtype: tinylm's train.dtype


class InputError(SystemExit):
    """A missing input: one line naming the command that makes it."""

    def __init__(self, message: str):
        super().__init__(f"trl_compare: {message}")


# --- inputs -------------------------------------------------------------------------------------
def check_inputs(args: argparse.Namespace) -> None:
    sft = Path(args.sft)
    if not (sft / "model.safetensors").is_file() or not (sft / "chat_template.jinja").is_file():
        raise InputError(f"{sft} is not a chat (SFT) run; make one with `tinylm sft --init "
                         f"runs/demo-tinystories --out {sft}`")
    if not Path(args.rankings).is_file():
        raise InputError(f"{args.rankings} is missing; make it with `tinylm feedback collect "
                         f"--run {sft} --prompts runs/chat/chat-train.jsonl --k 4 --labeler "
                         f"request --db runs/rlhf/feedback.db` then `tinylm feedback export "
                         f"--db runs/rlhf/feedback.db --out {args.rankings}`")
    if args.reward_run and not (Path(args.reward_run) / "model.json").is_file():
        raise InputError(f"{args.reward_run} is not a reward run; make one with `tinylm reward "
                         f"--init {sft} --data {args.rankings} --out {args.reward_run}`")


def export_hf(sft: Path, out: Path) -> Path:
    """The SFT run as a transformers folder (what TRL loads), made once under `out`."""
    hf = out / "hf"
    if not (hf / "config.json").is_file() or (
            (hf / "config.json").stat().st_mtime < (sft / "model.safetensors").stat().st_mtime):
        run_quiet([sys.executable, "-m", "tinylm", "export-hf", str(sft), str(hf)], out / "hf.log")
    return hf


def prepare_data(args: argparse.Namespace, out: Path) -> dict:
    """Rankings with at least one strict pair (tinylm's file), the TRL pairs of the same
    training and held-out rankings, and the training prompts for the online comparison."""
    from tinylm.feedback.io import pair_lines, read_rankings
    from tinylm.feedback.preferences import chat_key, split_rows

    rows = [r for r in read_rankings(args.rankings) if r.pairs()]
    if args.limit:
        rows = rows[: args.limit]  # the first N: a smaller benchmark, the same on both sides
    train, held = split_rows(rows, args.val_fraction, args.split_seed)
    rankings = out / "rankings.jsonl"
    write_jsonl(rankings, [{"messages": r.messages, "answers": r.answers, "ranks": r.ranks,
                            **r.meta} for r in rows])
    train_pairs = [p for r in train for p in pair_lines(r)]
    held_pairs = [p for r in held for p in pair_lines(r)]
    write_jsonl(out / "pairs-train.jsonl", train_pairs)
    write_jsonl(out / "pairs-held.jsonl", held_pairs)
    seen, prompts = set(), []
    for r in train:
        if chat_key(r.messages) not in seen:
            seen.add(chat_key(r.messages))
            prompts.append({"messages": r.messages})
    write_jsonl(out / "prompts.jsonl", prompts)
    info = {"rankings": str(rankings), "train_pairs": str(out / "pairs-train.jsonl"),
            "held_pairs": str(out / "pairs-held.jsonl"), "prompts": str(out / "prompts.jsonl"),
            "n_train": len(train), "n_held": len(held), "n_train_pairs": len(train_pairs),
            "n_held_pairs": len(held_pairs), "n_prompts": len(prompts),
            "pairs_per_ranking": len(train_pairs) / len(train)}
    print(f"data: {len(rows)} rankings with a strict pair; train {len(train)} rankings "
          f"({len(train_pairs)} pairs, {info['pairs_per_ranking']:.2f} per ranking), held out "
          f"{len(held)} ({len(held_pairs)} pairs); {len(prompts)} distinct training prompts",
          flush=True)
    return info


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()
            if line.strip()]


def env(threads: int) -> dict[str, str]:
    return os.environ | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                         "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
                         "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                         "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"}


def run_quiet(cmd: list[str], log: Path, threads: int = 2) -> None:
    """Run `cmd` with its output in `log`; a failure prints the log's tail and stops."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                            env=env(threads)).returncode
    if rc:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-25:])
        raise SystemExit(f"{tail}\ntrl_compare: `{' '.join(cmd)}` failed (exit {rc}); "
                         f"log in {log}")


# --- tinylm side --------------------------------------------------------------------------------
def toml(v) -> str:
    """A value as `--set` reads it (TOML): strings quoted, booleans lower case."""
    if isinstance(v, str):
        return json.dumps(v)
    return str(v).lower() if isinstance(v, bool) else str(v)


def tinylm_run(stage: str, init: str, data: str, run_dir: Path, sets: dict, threads: int
               ) -> list[dict]:
    """One `tinylm STAGE` process; returns its metrics.jsonl rows."""
    if run_dir.exists():
        shutil.rmtree(run_dir)  # our own earlier turn (runs/trl-*), never an input
    cmd = [sys.executable, "-m", "tinylm", stage, "--init", init, "--out", str(run_dir)]
    if data:
        cmd += ["--data", data]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={toml(v)}"]
    run_quiet(cmd, run_dir.parent / f"{run_dir.name}.log", threads)
    return read_jsonl(run_dir / "metrics.jsonl")


def loop_step_times(rows: list[dict]) -> list[float]:
    """Per-step seconds from the training loop's cumulative train_time (log_every = 1)."""
    times, prev = [], 0.0
    for r in rows:
        if "loss" in r and "train_time" in r:
            times.append(r["train_time"] - prev)
            prev = r["train_time"]
    return times


def last_value(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if key in r]
    return vals[-1] if vals else None


def common_train(args: argparse.Namespace, steps: int, batch: int, lr: float) -> dict:
    return {"train.steps": steps, "train.batch_size": batch, "train.grad_accum": 1,
            "train.optimizer": args.tinylm_optimizer, "train.lr": lr,
            "train.muon_lr": args.muon_lr, "train.weight_decay": 0.0, "train.beta2": 0.95,
            "train.warmup_steps": args.lr_warmup, "train.schedule": "constant",
            "train.grad_clip": 1.0, "train.dtype": DTYPES[args.dtype],
            "train.threads": args.threads,
            "train.eval_every": 0, "train.save_every": 0, "train.log_every": 1,
            "train.seed": args.seed, "train.progress": False, "train.compile": False}


# --- TRL side (run as `--worker TASK --spec FILE` in a process of its own) ----------------------
def trl_worker(task: str, spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    fn = {"reward": trl_reward, "dpo": trl_dpo, "grpo": trl_grpo}[task]
    return fn(spec)


def step_timer():
    """A TrainerCallback that records the wall time of every optimizer step."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self.last = 0.0

        def on_train_begin(self, args, state, control, **kw):
            self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            self.times.append(now - self.last)
            self.last = now

    return StepTimer()


def trl_args(spec: dict, config_cls, **extra):
    return config_cls(
        output_dir=spec["out"], max_steps=spec["steps"],
        per_device_train_batch_size=spec["batch"], gradient_accumulation_steps=1,
        learning_rate=spec["lr"], lr_scheduler_type="constant_with_warmup",
        warmup_steps=spec["lr_warmup"], weight_decay=0.0, adam_beta2=0.95, max_grad_norm=1.0,
        use_cpu=True, bf16=spec["dtype"] == "bf16", fp16=False, report_to="none",
        save_strategy="no", eval_strategy="no", logging_steps=max(spec["steps"], 1),
        disable_tqdm=True, dataloader_num_workers=0, seed=spec["seed"],
        gradient_checkpointing=False,  # TRL's default is True; tinylm recomputes nothing
        **extra)


def trl_reward(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    tok = AutoTokenizer.from_pretrained(spec["hf"])
    model = AutoModelForSequenceClassification.from_pretrained(spec["hf"], num_labels=1,
                                                               dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id
    timer = step_timer()
    trainer = RewardTrainer(
        model=model, args=trl_args(spec, RewardConfig, max_length=spec["max_length"]),
        train_dataset=Dataset.from_list(read_jsonl(spec["train_pairs"])),
        eval_dataset=Dataset.from_list(read_jsonl(spec["held_pairs"])),
        processing_class=tok, callbacks=[timer])
    trainer.train()
    model.eval()
    wins, n = 0.0, 0
    ds = trainer.eval_dataset
    with torch.no_grad():
        for i in range(0, len(ds), 32):
            batch = trainer.data_collator([ds[j] for j in range(i, min(i + 32, len(ds)))])
            r = model(input_ids=batch["input_ids"],
                      attention_mask=batch["attention_mask"]).logits[:, 0]  # (2b,)
            chosen, rejected = r.chunk(2)
            wins += float((chosen > rejected).sum() + 0.5 * (chosen == rejected).sum())
            n += len(chosen)
    return {"step_times": timer.times, "accuracy": wins / max(n, 1), "held_pairs": n,
            "train_pairs": len(trainer.train_dataset)}


def completion_logps(model, batch):
    """(2b,) summed log-probabilities of each sequence's completion tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = logits[:, :-1].float().log_softmax(-1)  # (2b, L-1, V)
    tokens = batch["input_ids"][:, 1:]
    mask = batch["completion_mask"][:, 1:].float()
    return (logp.gather(-1, tokens[..., None])[..., 0] * mask).sum(1)


def trl_dpo(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(spec["hf"])
    model = AutoModelForCausalLM.from_pretrained(spec["hf"], dtype=torch.float32)
    timer = step_timer()
    trainer = DPOTrainer(
        model=model, args=trl_args(spec, DPOConfig, beta=spec["beta"],
                                   max_length=spec["max_length"],
                                   precompute_ref_log_probs=spec["precompute_ref"]),
        train_dataset=Dataset.from_list(read_jsonl(spec["train_pairs"])),
        eval_dataset=Dataset.from_list(read_jsonl(spec["held_pairs"])),
        processing_class=tok, callbacks=[timer])
    trainer.train()
    ref = AutoModelForCausalLM.from_pretrained(spec["hf"], dtype=torch.float32).eval()
    model.eval()
    pos, n = 0, 0
    ds = trainer.eval_dataset
    with torch.no_grad():
        for i in range(0, len(ds), 16):
            rows = [{k: ds[j][k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
                    for j in range(i, min(i + 16, len(ds)))]
            batch = trainer.data_collator(rows)
            ratio = completion_logps(model, batch) - completion_logps(ref, batch)  # (2b,)
            chosen, rejected = ratio.chunk(2)
            pos += int(((chosen - rejected) > 0).sum())
            n += len(chosen)
    return {"step_times": timer.times, "accuracy": pos / max(n, 1), "held_pairs": n,
            "train_pairs": len(trainer.train_dataset)}


def trl_grpo(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from tinylm import rundir
    from tinylm.data import chat
    from tinylm.infer.chat import turn_end_ids
    from tinylm.stages.ppo import load_reward, reward_fn
    from tinylm.tokenizer import Tokenizer

    sft = Path(spec["sft"])
    tl_tok = Tokenizer.load(sft / rundir.TOKENIZER)
    template = rundir.chat_template(sft, required=True)
    end_id = turn_end_ids(tl_tok, template)[0]
    score = reward_fn(load_reward(spec["reward_run"], tl_tok), tl_tok.pad_id,
                      torch.device("cpu"), torch.bfloat16 if spec["dtype"] == "bf16" else None)

    def reward(prompts, completions, completion_ids, **kw) -> list[float]:
        """The tinylm reward model, as `tinylm ppo` calls it (stages.ppo.reward_fn)."""
        p_ids = [chat.render(tl_tok, p, template, add_generation_prompt=True).ids
                 for p in prompts]
        return score(p_ids, completion_ids).tolist()

    tok = AutoTokenizer.from_pretrained(spec["hf"])
    model = AutoModelForCausalLM.from_pretrained(spec["hf"], dtype=torch.float32)
    model.generation_config.eos_token_id = [end_id, tok.eos_token_id]  # an answer ends here
    prompts = [{"prompt": r["messages"]} for r in read_jsonl(spec["prompts"])]
    timer = step_timer()
    args = trl_args(spec, GRPOConfig, num_generations=spec["k"],
                    max_completion_length=spec["max_new_tokens"], temperature=1.0,
                    beta=spec["kl_coef"], num_iterations=1, steps_per_generation=1)
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=args,
                          train_dataset=Dataset.from_list(prompts), processing_class=tok,
                          callbacks=[timer])
    trainer.train()
    return {"step_times": timer.times, "accuracy": None}


def trl_run(task: str, spec: dict, out: Path, threads: int) -> dict:
    spec_file = out / f"trl-{task}.spec.json"
    result_file = out / f"trl-{task}.result.json"
    spec_file.write_text(json.dumps(spec))
    result_file.unlink(missing_ok=True)
    run_quiet([sys.executable, str(Path(__file__).resolve()), "--worker", task, "--spec",
               str(spec_file), "--result", str(result_file)], out / f"trl-{task}.log", threads)
    return json.loads(result_file.read_text())


# --- the comparisons ----------------------------------------------------------------------------
def median_after(times: list[list[float]], warmup: int) -> float:
    kept = [t for run in times for t in run[warmup:]] or [t for run in times for t in run]
    return statistics.median(kept)


def compare(task: str, args, info: dict, hf: Path, out: Path) -> dict:
    """`args.repeats` turns of tinylm then TRL for `task`; their step times and accuracies."""
    steps = args.steps or (args.quick_steps if args.quick else
                           {"reward": 40, "dpo": 40, "grpo": 10}[task])
    ours, theirs, acc_ours, acc_theirs = [], [], [], []
    spec = {"hf": str(hf), "sft": args.sft, "steps": steps, "threads": args.threads,
            "dtype": args.dtype,
            "seed": args.seed, "lr_warmup": args.lr_warmup, "max_length": 128,
            "train_pairs": info["train_pairs"], "held_pairs": info["held_pairs"]}
    data_sets = {"data.val_fraction": args.val_fraction, "data.split_seed": args.split_seed,
                 "data.pack": not args.no_pack}
    if task == "reward":
        trl_batch = max(1, round(args.reward_prompts * info["pairs_per_ranking"]))
        sets = common_train(args, steps, args.reward_prompts, args.reward_lr) | data_sets
        spec |= {"batch": trl_batch, "lr": args.reward_lr}
        batch_note = (f"{args.reward_prompts} rankings (~{trl_batch} pairs) / {trl_batch} "
                      "pairs")
    elif task == "dpo":
        sets = common_train(args, steps, args.dpo_batch, args.dpo_lr) | data_sets | {
            "beta": args.beta, "by_ranking": args.dpo_by_ranking}
        spec |= {"batch": args.dpo_batch, "lr": args.dpo_lr, "beta": args.beta,
                 "precompute_ref": args.trl_precompute_ref}
        batch_note = (f"{args.dpo_batch} pairs{', by ranking' if args.dpo_by_ranking else ''}"
                      f" / {args.dpo_batch} pairs")
    else:
        n = args.grpo_prompts * args.k
        sets = common_train(args, steps, n, args.grpo_lr) | {
            "reward": args.reward_run, "data.prompts": info["prompts"],
            "data.val_fraction": 0.0, "data.eval_prompts": 0, "data.gold": "none",
            "ppo.prompts_per_step": args.grpo_prompts, "ppo.k": args.k,
            "ppo.max_new_tokens": args.max_new_tokens, "ppo.temperature": 1.0,
            "ppo.epochs": 1, "ppo.advantage": "grpo", "ppo.kl_coef": args.kl_coef,
            "ppo.adaptive_kl": False, "ppo.missing_eos_penalty": 0.0}
        sets["train.warmup_steps"] = 0
        spec |= {"batch": n, "lr": args.grpo_lr, "lr_warmup": 0, "k": args.k,
                 "max_new_tokens": args.max_new_tokens, "kl_coef": args.kl_coef,
                 "reward_run": args.reward_run, "prompts": info["prompts"]}
        batch_note = (f"{args.grpo_prompts} prompts x {args.k}, {args.max_new_tokens} new "
                      "tokens")
    stage = {"reward": "reward", "dpo": "dpo", "grpo": "ppo"}[task]
    for r in range(args.repeats):
        run_dir = out / f"tinylm-{task}-{r}"
        t0 = time.perf_counter()
        rows = tinylm_run(stage, args.sft, "" if task == "grpo" else info["rankings"],
                          run_dir, sets, args.threads)
        if task == "grpo":
            ours.append([row["iter_time"] for row in rows if "iter_time" in row])
        else:
            ours.append(loop_step_times(rows))
            acc_ours.append(last_value(rows, "val_accuracy"))
        t1 = time.perf_counter()
        res = trl_run(task, spec | {"out": str(out / f"trl-{task}-{r}")}, out, args.threads)
        theirs.append(res["step_times"])
        if res["accuracy"] is not None:
            acc_theirs.append(res["accuracy"])
        print(f"{task} turn {r + 1}/{args.repeats}: tinylm {statistics.median(ours[-1]):.3f} "
              f"s/step ({t1 - t0:.0f} s with load), TRL {statistics.median(theirs[-1]):.3f} "
              f"s/step ({time.perf_counter() - t1:.0f} s with load)"
              + (f"; held-out accuracy {acc_ours[-1]:.3f} / {acc_theirs[-1]:.3f}"
                 if acc_ours and acc_theirs else ""), flush=True)
        if task == "reward" and r == 0 and not args.reward_run_given:
            args.reward_run = str(run_dir)  # the grpo comparison's reward, if not given
    a, b = median_after(ours, args.warmup), median_after(theirs, args.warmup)
    return {"task": task, "steps": steps, "batch": batch_note, "tinylm": a, "trl": b,
            "ratio": b / a, "acc_tinylm": mean([x for x in acc_ours if x is not None]),
            "acc_trl": mean(acc_theirs)}


def mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def table(results: list[dict]) -> str:
    names = {"reward": "reward model (RewardTrainer)", "dpo": "DPO (DPOTrainer)",
             "grpo": "online RL, s/iteration (GRPOTrainer)"}
    lines = ["| task | steps | batch (tinylm / TRL) | tinylm s/step | TRL s/step | ratio | "
             "tinylm held-out acc | TRL held-out acc | target met? |",
             "|---|---:|---|---:|---:|---:|---:|---:|---|"]
    for r in results:
        acc_ok = (r["acc_tinylm"] is None or r["acc_trl"] is None  # 1e-6: a float32 share
                  or r["acc_tinylm"] >= r["acc_trl"] - 1e-6)  # of the same pairs is equal
        met = "yes" if r["ratio"] >= TARGET and acc_ok else "no"
        lines.append(f"| {names[r['task']]} | {r['steps']} | {r['batch']} | {r['tinylm']:.3f} | "
                     f"{r['trl']:.3f} | {r['ratio']:.2f}x | {fmt(r['acc_tinylm'])} | "
                     f"{fmt(r['acc_trl'])} | {met} |")
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sft", default="runs/sft-timed2")
    p.add_argument("--rankings", default="runs/rlhf/rankings.jsonl")
    p.add_argument("--limit", type=int, default=0, help="use only the first N rankings that "
                   "have a strict pair (0 = all)")
    p.add_argument("--out", default="runs/trl-compare")
    p.add_argument("--reward-run", default="", help="reward run for grpo (default: the one "
                   "trained in the reward comparison)")
    p.add_argument("--only", default="reward,dpo,grpo")
    p.add_argument("--quick", action="store_true", help="a few steps each (a smoke run)")
    p.add_argument("--quick-steps", type=int, default=4)
    p.add_argument("--steps", type=int, default=0, help="steps (iterations) of every task")
    p.add_argument("--repeats", type=int, default=0, help="turns per contender (default 2, "
                   "1 with --quick)")
    p.add_argument("--warmup", type=int, default=0, help="steps left out of the median "
                   "(default 3, 1 with --quick)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="auto", choices=["auto", *sorted(DTYPES)],
                   help="the training arithmetic on both sides: fp32, or bf16 autocast (fp32 "
                   "weights); auto: bf16 where bf16 matmuls measured faster here, what "
                   "tinylm's train.dtype = 'auto' picks")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--val-fraction", type=float, default=0.15)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--tinylm-optimizer", default="adamw", choices=["adamw", "muon"],
                   help="adamw: the optimizer TRL uses (the fair default)")
    p.add_argument("--muon-lr", type=float, default=0.005)
    p.add_argument("--no-pack", action="store_true", help="tinylm's reward and DPO batches "
                   "without packing (data.pack = false: each answer its own padded row, its "
                   "prompt with it), the layout before packing")
    p.add_argument("--lr-warmup", type=int, default=3)
    p.add_argument("--reward-prompts", type=int, default=8, help="rankings per reward step")
    p.add_argument("--reward-lr", type=float, default=3e-4)
    p.add_argument("--dpo-batch", type=int, default=16, help="pairs per DPO step")
    p.add_argument("--dpo-lr", type=float, default=5e-5)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--dpo-by-ranking", action="store_true", help="tinylm draws its DPO pairs "
                   "ranking by ranking (by_ranking = true; default: independent, as TRL)")
    p.add_argument("--trl-precompute-ref", action="store_true", help="TRL DPO with "
                   "precompute_ref_log_probs=True, as tinylm does (default: TRL's default)")
    p.add_argument("--grpo-prompts", type=int, default=8)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--grpo-lr", type=float, default=3e-5)
    p.add_argument("--kl-coef", type=float, default=0.05)
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    p.add_argument("--spec", default="", help=argparse.SUPPRESS)
    p.add_argument("--result", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.repeats = args.repeats or (1 if args.quick else 2)
    args.warmup = args.warmup or (1 if args.quick else 3)
    if args.dtype == "auto":
        from tinylm.perf import cpu_bf16_is_fast

        args.dtype = "bf16" if cpu_bf16_is_fast() else "fp32"
    args.reward_run_given = bool(args.reward_run)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.worker:
        spec = json.loads(Path(args.spec).read_text())
        Path(args.result).write_text(json.dumps(trl_worker(args.worker, spec)))
        return 0
    try:
        import trl
    except ImportError:
        raise InputError("TRL is not installed; `make bench` installs it (the `peers` extra), "
                         "or `.venv/bin/pip install -c constraints.txt --find-links /opt/wheels "
                         "trl`") from None
    os.chdir(ROOT)
    check_inputs(args)
    tasks = [t.strip() for t in args.only.split(",") if t.strip()]
    if bad := set(tasks) - {"reward", "dpo", "grpo"}:
        raise InputError(f"--only {','.join(sorted(bad))}: the tasks are reward, dpo, grpo")
    if "grpo" in tasks and "reward" not in tasks and not args.reward_run:
        raise InputError("--only grpo needs --reward-run RUN (a run of `tinylm reward --init "
                         f"{args.sft} --data {args.rankings}`), or include reward")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch
    import transformers

    print(f"tinylm vs TRL {trl.__version__} (transformers {transformers.__version__}, torch "
          f"{torch.__version__}), CPU, {args.dtype}, {args.threads} threads; SFT run "
          f"{args.sft}",
          flush=True)
    hf = export_hf(Path(args.sft), out)
    info = prepare_data(args, out)
    results = [compare(t, args, info, hf, out) for t in tasks]
    print(f"\n{table(results)}\n")
    print(f"median s/step after {args.warmup} warm-up steps, {args.repeats} turn(s) each, "
          "contenders in turns (tinylm, TRL, ...); ratio = TRL / tinylm; load time excluded. "
          f"Runs and logs in {out}/.")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
