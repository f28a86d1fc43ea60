"""`tinylm ppo`: the stage around train/ppo.py: run dirs in, run dir out, exact resume,
the reward-hacking metrics, and one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tinylm
from tinylm import config as configlib
from tinylm import rundir
from tinylm.cli import main
from tinylm.stages import ppo as ppo_stage
from tinylm.stages import reward
from tinylm.tokenizer import Tokenizer, train_char

from ..feedback.tiny import story_rows, tiny_chat_run, write_rows


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(SFT-like chat run, reward run from it, prompts file)."""
    root = tmp_path_factory.mktemp("ppo")
    chat_run = tiny_chat_run(root / "chat")
    rankings = write_rows(root / "rankings.jsonl", [
        {"messages": r["messages"][:1],
         "answers": [f"{r['name']} had a {r['object']}.", "No.", "A cat."], "ranks": [0, 2, 1]}
        for r in story_rows()])
    rm = root / "rm"
    reward.run(configlib.load(reward.RewardStageConfig, "reward-tinystories", [
        f"init='{chat_run}'", f"data.path='{rankings}'", f"out='{rm}'", "train.steps=4",
        "train.batch_size=4", "train.progress=false", "train.dtype='float32'",
        "data.val_fraction=0.2"]))
    # prompts the gold labeler cannot judge (no story request) are PPO prompts all the same
    other = [{"messages": [{"role": "user", "content": f"Translate to French: I am {w}."}],
              "task": "translate"} for w in ("cold", "here", "tall", "late")]
    return chat_run, rm, write_rows(root / "prompts.jsonl", story_rows() + other)


def ppo_cfg(runs, out, *extra):
    chat_run, rm, prompts = runs
    return configlib.load(ppo_stage.PPOStageConfig, "ppo-tinystories", [
        f"init='{chat_run}'", f"reward='{rm}'", f"data.prompts='{prompts}'", f"out='{out}'",
        "data.eval_prompts=4", "data.val_fraction=0.2", "ppo.prompts_per_step=2", "ppo.k=2",
        "ppo.max_new_tokens=12", "ppo.epochs=1", "train.batch_size=2", "train.steps=4",
        "train.eval_every=2", "train.progress=false", "train.dtype='float32'", *extra])


def rows_of(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def untimed(rows):
    return [{k: v for k, v in r.items() if not k.endswith("_time")} for r in rows]


def test_ppo_writes_a_policy_a_value_model_and_trl_named_metrics(runs, tmp_path, capsys):
    out = tmp_path / "ppo"
    result = ppo_stage.run(ppo_cfg(runs, out, "ppo.adaptive_kl=true", "ppo.kl_estimator='k3'"))
    assert result["step"] == 4 and result["episode"] == 4 * 4
    rows = rows_of(out)
    it = [r for r in rows if "objective/kl" in r]
    assert [r["step"] for r in it] == [1, 2, 3, 4]
    for key in ("objective/entropy", "objective/rlhf_reward", "objective/scores",
                "policy/clipfrac_avg", "policy/approxkl_avg", "loss/value_avg",
                "val/num_eos_tokens", "objective/gold", "answer/length_score_corr"):
        assert key in it[-1], key
    assert all(r["objective/kl"] >= 0 for r in it)  # k3 never goes below 0
    assert it[-1]["objective/kl_coef"] != it[0]["objective/kl_coef"]  # adaptive beta moved
    evals = [r for r in rows if "eval/scores" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]  # the start, every 2, the end
    assert {"eval/gold", "eval/kl", "eval/length", "eval/ended_share",
            "eval/hacking_warning"} <= set(evals[-1])
    assert evals[0]["eval/kl"] == pytest.approx(0, abs=1e-5)  # the start is the reference
    model, _ = tinylm.load(out)
    value, _ = tinylm.load(out / "value")
    assert model.family == "gpt" and value.family == "reward"
    assert (out / "ppo.png").stat().st_size > 0


def test_ppo_resumes_exactly(runs, tmp_path):
    full, half = tmp_path / "full", tmp_path / "half"
    common = ["ppo.adaptive_kl=true", "train.eval_every=0", "data.eval_prompts=0"]
    ppo_stage.run(ppo_cfg(runs, full, *common))
    ppo_stage.run(ppo_cfg(runs, half, *common, "train.stop_after=2"))
    ppo_stage.run(ppo_cfg(runs, half, *common), resume=True)
    assert untimed(rows_of(full)) == untimed(rows_of(half))
    for sub in ("", "value"):
        a = load_file(str(full / sub / "model.safetensors"))
        b = load_file(str(half / sub / "model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_grpo_needs_no_value_model_and_ptx_mixes_in_the_lm_loss(runs, tmp_path):
    out = tmp_path / "grpo"
    corpus = runs[0].parent / "tiny-corpus.txt"  # the chat run's pre-training text
    result = ppo_stage.run(ppo_cfg(runs, out, "ppo.advantage='grpo'", "train.eval_every=0",
                                   "ppo.ptx_coef=0.5", f"data.ptx_corpus='{corpus}'"))
    assert "loss/value_avg" not in result and not (out / "value").exists()
    assert 0 < result["loss/ptx_avg"] < 10


def test_the_cli_runs_ppo_and_bad_input_is_one_line(runs, tmp_path, capsys, error_of):
    chat_run, rm, prompts = runs
    base = ["ppo", "--init", str(chat_run), "--out", str(tmp_path / "cli"), "--data",
            str(prompts), "--set", f"reward='{rm}'", "--set", "train.steps=1", "--set",
            "ppo.prompts_per_step=2", "--set", "ppo.k=2", "--set", "train.batch_size=2",
            "--set", "ppo.max_new_tokens=8", "--set", "train.progress=false",
            "--set", "data.eval_prompts=0"]
    assert main(base) == 0
    assert "PPO into" in capsys.readouterr().out
    other = tmp_path / "other-rm"
    shutil.copytree(rm, other)
    train_char("completely different text: xyz").save(other / "tokenizer.json")
    bad = [a if a != str(tmp_path / "cli") else str(tmp_path / "x") for a in base]
    assert "another tokenizer" in error_of(bad + ["--set", f"reward='{other}'"], capsys)
    empty = write_rows(tmp_path / "empty.jsonl", [])
    assert "empty.jsonl" in error_of(bad + ["--data", str(empty)], capsys)
    assert "ppo.k=1" in error_of(bad + ["--set", "ppo.k=1", "--set", "ppo.advantage=grpo"],
                                 capsys)
    assert "does not split into minibatches" in error_of(bad + ["--set",
                                                               "train.batch_size=3"], capsys)
    assert "needs a reward model" in error_of(bad + ["--set", "reward=''"], capsys)
    assert "needs a reward model" in error_of(bad + ["--set", "reward=' , '"], capsys)


def test_the_reward_callable_reads_rollouts_as_the_reward_model_does(runs):
    """PPO scores rollouts through the reward backbone's inference twin (infer/fast.py): the
    rewards equal the reward model's own forward, padding after an answer changing none."""
    chat_run, rm, _ = runs
    model, tok = tinylm.load(rm, family="reward")
    score = ppo_stage.reward_fn(model, tok.pad_id, torch.device("cpu"))
    prompts = [tok.encode("Tell me a story about Tom."), tok.encode("Hi")]
    answers = [tok.encode("Tom had a ball."), tok.encode("No.")]
    got = score(prompts, answers)  # (2,)
    want = torch.stack([model.normalized(model(torch.tensor([p + a]), torch.tensor([len(p + a)
                                                                                   - 1])))[0]
                        for p, a in zip(prompts, answers)])
    assert got.shape == (2,) and torch.allclose(got, want, atol=1e-4)


def test_an_ensemble_reward_is_the_mean_of_its_models_scores(runs, tmp_path):
    const = [lambda p, a, v=v: torch.full((len(a),), v) for v in (1.0, 2.0, 6.0)]
    assert ppo_stage.ensemble_reward(const)([[1]], [[2]]).tolist() == [3.0]
    assert ppo_stage.ensemble_reward(const[:1]) is const[0]
    # a model twice in the ensemble scores the rollouts exactly as it does alone
    _, rm, _ = runs
    scores = []
    for name, spec in (("one", rm), ("two", f"{rm}, {rm}")):
        ppo_stage.run(ppo_cfg(runs, tmp_path / name, f"reward='{spec}'", "ppo.advantage='grpo'",
                              "train.steps=1"))
        scores += [r["objective/scores"] for r in rows_of(tmp_path / name)
                   if "objective/scores" in r][:1]
    assert len(scores) == 2 and scores[0] == pytest.approx(scores[1], abs=1e-5)


def fake_dpo_run(path: Path, init: Path, shift: float) -> Path:
    """A run laid out as tinylm dpo writes one: init's weights moved by `shift` noise."""
    model, tok = tinylm.load(init, family="gpt")
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for p in model.parameters():
            p.add_(shift * torch.randn(p.shape, generator=gen))
    path.mkdir()
    rundir.save_model(path, model)
    rundir.save_tokenizers(path, tok)
    (path / "config.toml").write_text(f"init = '{init}'\nbeta = 0.1\n")
    return path


def test_the_implicit_reward_is_the_dpo_runs_log_ratio_to_its_reference(runs, tmp_path,
                                                                         capsys, error_of):
    chat_run, rm, _ = runs
    tok = Tokenizer.load(chat_run / rundir.TOKENIZER)
    prompts = [tok.encode("Tell me a story about Tom."), tok.encode("Hi")]
    answers = [tok.encode("Tom had a ball."), tok.encode("No.")]
    cpu = torch.device("cpu")
    same = ppo_stage.implicit_reward(str(fake_dpo_run(tmp_path / "same", chat_run, 0.0)), tok, cpu)
    assert same(prompts, answers).tolist() == [0.0, 0.0]  # the policy is its reference
    moved = fake_dpo_run(tmp_path / "moved", chat_run, 0.05)

    def logp(run, p, a):  # the answer's summed log-probability, one full forward
        model = tinylm.load(run, family="gpt")[0].eval()
        with torch.no_grad():
            lp = model(torch.tensor([p + a])).float().log_softmax(-1)[0]
        return sum(float(lp[len(p) - 1 + i, t]) for i, t in enumerate(a))

    want = [logp(moved, p, a) - logp(chat_run, p, a) for p, a in zip(prompts, answers)]
    got = ppo_stage.implicit_reward(str(moved), tok, cpu)(prompts, answers)
    assert got.tolist() == pytest.approx(want, abs=1e-3) and any(abs(w) > 1e-2 for w in want)
    base = ["ppo", "--init", str(chat_run), "--out", str(tmp_path / "bad"), "--data",
            str(runs[2]), "--set", "train.steps=1"]
    assert "not one" in error_of(base + ["--set", f"reward='dpo:{rm}'", "--set",
                                         "ppo.advantage='grpo'"], capsys)
    assert "no reward model to start a value model" in error_of(
        base + ["--set", f"reward='dpo:{moved}'", "--set", "ppo.advantage='gae'"], capsys)


def test_the_labeler_as_the_reward_scores_rollouts_as_the_gold_watch_does(runs, tmp_path,
                                                                          capsys, error_of):
    """reward = "labeler:request" (the ceiling run): the policy's reward is the labeler's
    score of each answer's text, so the rollouts' proxy equals their gold score."""
    stories = write_rows(tmp_path / "stories.jsonl", story_rows())
    out = tmp_path / "oracle"
    ppo_stage.run(ppo_cfg(runs, out, "reward='labeler:request'", "ppo.advantage='grpo'",
                          f"data.prompts='{stories}'", "ppo.missing_eos_penalty=0.0"))
    it = [r for r in rows_of(out) if "objective/scores" in r]
    assert len(it) == 4
    assert all(r["objective/scores"] == pytest.approx(r["objective/gold"]) for r in it)
    assert not (out / "value").exists()
    chat_run, _, prompts = runs
    base = ["ppo", "--init", str(chat_run), "--out", str(tmp_path / "bad"), "--set",
            "reward='labeler:request'", "--set", "train.steps=1", "--set",
            "train.progress=false"]
    assert "cannot judge 4 of the prompts" in error_of(
        base + ["--data", str(prompts), "--set", "ppo.advantage='grpo'"], capsys)
    assert "use ppo.advantage = 'grpo'" in error_of(
        base + ["--data", str(stories), "--set", "ppo.advantage='gae'"], capsys)
    assert "unknown labeler" in error_of(
        base + ["--data", str(stories), "--set", "reward='labeler:nope'", "--set",
                "ppo.advantage='grpo'"], capsys)
