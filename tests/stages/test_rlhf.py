"""`tinylm rlhf`: rounds of sample, rank, reward model, PPO, evaluate, on a tiny chat model:
each round's runs and numbers recorded, later rounds learning from earlier rankings, exact
resume, people on /label (here: another thread) unblocking a round, one-line errors."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

import tinylm
from tinylm import config as configlib
from tinylm.errors import UserError
from tinylm.feedback.store import Store
from tinylm.stages import rlhf

from ..feedback.tiny import story_rows, tiny_chat_run, write_rows

TINY = [
    "data.task='story'", "data.prompts_per_round=6", "data.eval_prompts=3",
    "collect.k=3", "collect.max_new_tokens=16", "eval.max_new_tokens=12", "eval.kl_samples=1",
    "reward.data.val_fraction=0.0", "reward.train.steps=2", "reward.train.batch_size=4",
    "reward.train.warmup_steps=1", "reward.train.progress=false",
    "reward.train.dtype='float32'",
    "ppo.ppo.prompts_per_step=2", "ppo.ppo.k=2", "ppo.ppo.max_new_tokens=12",
    "ppo.ppo.epochs=1", "ppo.train.steps=1", "ppo.train.batch_size=2",
    "ppo.train.warmup_steps=1", "ppo.train.progress=false", "ppo.train.dtype='float32'",
]


def tiny_requests() -> list[dict]:
    """Story requests for a barely trained model: the requested name and object are letters
    it often says as words, so the request labeler's rankings differ within a comparison (with
    real names every answer of noise ties, and no reward model can be trained)."""
    return [{"messages": [{"role": "user", "content":
                           f"Tell me a story about a girl named {n} and a {o}."}],
             "task": "story", "name": n, "object": o}
            for n in ("a", "e", "i", "o") for o in ("a", "e", "i", "t", "h", "s")]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rlhf")
    rows = tiny_requests()
    return {"root": root, "sft": tiny_chat_run(root / "sft"),
            "train": write_rows(root / "train.jsonl", rows[:18]),
            "held": write_rows(root / "held.jsonl", rows[18:] + story_rows()[:2])}


def make_cfg(base, out: Path, *extra: str) -> rlhf.RLHFConfig:
    return configlib.load(rlhf.RLHFConfig, "rlhf-request", [
        f"out='{out}'", f"init='{base['sft']}'", f"data.prompts='{base['train']}'",
        f"data.heldout='{base['held']}'", "rounds=1", *TINY, *extra])


@pytest.fixture(scope="module")
def two_rounds(base):
    """Round 1 alone, then --resume to 2 rounds; what round 1 left before the resume."""
    out = base["root"] / "rounds"
    first = "data.prompts_first_round=20"  # more than the 18 training prompts: 2 come back
    rlhf.run(make_cfg(base, out, "rounds=1", first))
    before = {"rounds": json.loads((out / "rounds.json").read_text())["rounds"],
              "mtime": (out / "round-1" / "policy" / "model.safetensors").stat().st_mtime_ns,
              "answers": len(rlhf.round_comparisons(Store(out / "feedback.db"), 1))}
    rlhf.run(make_cfg(base, out, "rounds=2", first), resume=True)
    return out, before


def test_two_rounds_are_recorded_with_their_runs_and_numbers(two_rounds):
    out, _ = two_rounds
    rounds = json.loads((out / "rounds.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        k = r["round"]
        assert r["policy"] == str(out / f"round-{k}" / "policy")
        assert r["reward"] == str(out / f"round-{k}" / "reward")
        s = r["eval"]["summary"]
        for key in ("win_rate_vs_sft", "win_rate_vs_previous", "gold", "proxy", "kl",
                    "length"):
            assert isinstance(s[key], float), key
        assert set(r["seconds"]) == {"collect", "rank", "reward", "policy", "eval", "total"}
    assert rounds[0]["policy_start"].endswith("sft")  # round 1 starts from the SFT run
    assert rounds[1]["policy_start"] == rounds[0]["policy"]  # round 2 from round 1's policy
    assert all(r["reference"].endswith("sft") for r in rounds)  # the leash stays on SFT
    assert "vs_previous" in rounds[1]["eval"] and rounds[1]["eval"]["vs_sft"]["ref"].endswith(
        "sft")
    table = (out / "rounds.md").read_text().splitlines()
    assert table[0].startswith("| round |") and len(table) == 4
    assert (out / "rounds.png").stat().st_size > 0


def test_round_two_learns_from_round_one_rankings(two_rounds):
    out, _ = two_rounds
    rounds = json.loads((out / "rounds.json").read_text())["rounds"]
    assert set(rounds[0]["reward_rankings_by_round"]) == {"1"}
    assert set(rounds[1]["reward_rankings_by_round"]) == {"1", "2"}
    lines = [json.loads(x) for x in (out / "round-2" / "rankings.jsonl").read_text().splitlines()]
    assert {x["round"] for x in lines} == {1, 2}
    store = Store(out / "feedback.db")
    second = rlhf.round_comparisons(store, 2)
    assert second  # round 2 sampled from round 1's policy, tagged with round 1's reward model
    with store.session() as s:
        from sqlalchemy import select

        from tinylm.feedback.store import Answer, Ranking
        a = s.scalars(select(Answer).where(Answer.round == 2)).first()
        r = s.scalars(select(Ranking).where(Ranking.round == 2)).first()
    assert a.policy == rounds[0]["policy"] and a.reward_model == rounds[0]["reward"]
    assert r.labeler == "request" and r.policy == a.policy


def test_round_one_can_rank_more_than_the_later_rounds(two_rounds):
    out, _ = two_rounds
    one, two = json.loads((out / "rounds.json").read_text())["rounds"]
    assert one["collect"]["prompts"] == 20 and two["collect"]["prompts"] == 6
    stored = rlhf.round_comparisons(Store(out / "feedback.db"), 1)
    assert len(stored) == one["collect"]["comparisons"] == 20 - one["collect"]["skipped"]


def test_round_slices_wrap_around_after_a_bigger_first_round():
    rows = list(range(5))
    assert rlhf.round_prompts(rows, 1, 2) == [0, 1] and rlhf.round_prompts(rows, 3, 2) == [4, 0]
    assert rlhf.round_prompts(rows, 1, 2, first=7) == [0, 1, 2, 3, 4, 0, 1]
    assert rlhf.round_prompts(rows, 2, 2, first=7) == [2, 3]
    assert rlhf.round_prompts(rows, 3, 2, first=7) == [4, 0]


def test_resume_continues_after_the_finished_round(two_rounds):
    out, before = two_rounds
    rounds = json.loads((out / "rounds.json").read_text())["rounds"]
    assert rounds[0] == before["rounds"][0]  # round 1's record as it was
    assert (out / "round-1" / "policy" / "model.safetensors").stat().st_mtime_ns == before[
        "mtime"]  # not trained again
    assert len(rlhf.round_comparisons(Store(out / "feedback.db"), 1)) == before["answers"]


def test_latest_points_at_the_last_policy_and_loads(two_rounds):
    out, _ = two_rounds
    assert (out / "latest").resolve() == (out / "round-2" / "policy").resolve()
    model, _ = tinylm.load(out / "latest")
    assert model.family == "gpt"


def test_asking_for_rounds_already_finished_runs_nothing(two_rounds, base, capsys):
    out, _ = two_rounds
    rlhf.run(make_cfg(base, out, "rounds=2"), resume=True)
    assert "2 rounds are finished already" in capsys.readouterr().out


def test_dpo_is_a_switch_of_the_config(base, tmp_path):
    out = tmp_path / "dpo"
    rlhf.run(make_cfg(base, out, "method='dpo'", "dpo.data.val_fraction=0.0",
                      "dpo.train.steps=2", "dpo.train.batch_size=2", "dpo.train.warmup_steps=1",
                      "dpo.train.progress=false", "dpo.train.dtype='float32'"))
    r = json.loads((out / "rounds.json").read_text())["rounds"][0]
    assert r["method"] == "dpo" and "beta" in configlib.read_toml(
        Path(r["policy"]) / "config.toml")
    assert r["policy_metrics"]["step"] == 2


def test_the_web_labeler_waits_for_people_then_goes_on(base, tmp_path, capsys):
    out = tmp_path / "web"
    cfg = make_cfg(base, out, "labeler='web'", "web.quota=2", "web.poll_s=0.05",
                   "web.timeout_s=600")  # never hang the suite if the thread fails
    seen: dict[str, object] = {}

    def person():  # ranks on /label (through the same store the page writes to)
        out.mkdir(parents=True, exist_ok=True)
        store = Store(out / "feedback.db")
        deadline = time.monotonic() + 600  # sampling can be slow on a loaded machine
        # the collector stores comparisons one by one: wait for the quota's worth
        while len(rlhf.round_comparisons(store, 1)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        seen["waiting"] = not (out / "round-1" / "reward").exists()
        for c in rlhf.round_comparisons(store, 1)[:2]:
            store.add_ranking(c["id"], [[a] for a in c["answer_ids"]], labeler="ann",
                              key=f"ann:{c['id']}")

    t = threading.Thread(target=person)
    t.start()
    rlhf.run(cfg)
    t.join()
    assert seen["waiting"] is True  # the round had not gone on before the rankings came
    printed = capsys.readouterr().out
    assert "0/2 rankings" in printed and "quota met" in printed
    r = json.loads((out / "rounds.json").read_text())["rounds"][0]
    assert r["collect"]["rankings"] == 2 and r["labeler"] == "web"
    assert r["gold"] == "request"


def test_the_web_labeler_gives_up_after_its_timeout(base, tmp_path):
    cfg = make_cfg(base, tmp_path / "w", "labeler='web'", "web.quota=1", "web.poll_s=0.05",
                   "web.timeout_s=0.2")
    with pytest.raises(UserError, match="0 of 1 rankings.*--resume"):
        rlhf.run(cfg)


def test_iterative_dpo_learns_each_round_from_its_own_answers_against_the_last_policy(
        base, tmp_path):
    """reference = "previous", dpo_rankings = "round": round 2's DPO starts from and is
    leashed to round 1's policy, on round 2's rankings alone; the evaluation samples."""
    out = tmp_path / "iter"
    rlhf.run(make_cfg(base, out, "rounds=2", "method='dpo'", "reference='previous'",
                      "dpo_rankings='round'", "dpo.sft_weight=1.0", "dpo.data.val_fraction=0.0",
                      "dpo.train.steps=2", "dpo.train.batch_size=2", "dpo.train.warmup_steps=1",
                      "dpo.train.progress=false", "dpo.train.dtype='float32'",
                      "eval.temperature=1.0", "eval.samples=2"))
    one, two = json.loads((out / "rounds.json").read_text())["rounds"]
    assert one["reference"] == str(base["sft"]) and two["reference"] == one["policy"]
    policy_cfg = configlib.read_toml(Path(two["policy"]) / "config.toml")
    assert policy_cfg["ref"] == one["policy"] and policy_cfg["sft_weight"] == 1.0
    lines = (out / "round-2" / "rankings-round.jsonl").read_text().splitlines()
    assert {json.loads(x)["round"] for x in lines} == {2}
    assert len(lines) == two["collect"]["rankings"]
    assert set(two["reward_rankings_by_round"]) == {"1", "2"}  # the reward model learns all
    held = two["eval"]["vs_sft"]
    assert held["samples"] == 2 and held["pairs"] == 2 * held["prompts"]


@pytest.mark.parametrize("extra, message", [
    (["--rounds", "0"], "run at least 1 round"),
    (["--set", "labeler='best'"], "unknown labeler 'best'"),
    (["--set", "method='sgd'"], "use ppo or dpo"),
    (["--set", "reference='init'"], "use sft or previous"),
    (["--set", "eval.samples=4"], "needs --temperature > 0"),
    (["--set", "data.prompts_first_round=-1"], "prompts_first_round must be 0"),
    (["--set", "nope=1"], "unknown config key 'nope'"),
])
def test_bad_settings_are_one_line_errors(base, tmp_path, capsys, error_of, extra, message):
    args = ["rlhf", "--config", "rlhf-request", "--init", str(base["sft"]), "--out",
            str(tmp_path / "x"), "--data", str(base["train"]), *extra]
    assert message in error_of(args, capsys)


def test_a_config_without_the_sft_run_is_a_one_line_error(tmp_path, capsys, error_of):
    cfg = tmp_path / "c.toml"
    cfg.write_text('out = "x"\nrounds = 1\n')
    assert "needs the SFT run" in error_of(["rlhf", "--config", str(cfg)], capsys)


def test_an_empty_prompt_file_is_a_one_line_error(base, tmp_path, capsys, error_of):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert "no prompts" in error_of(
        ["rlhf", "--config", "rlhf-request", "--init", str(base["sft"]), "--out",
         str(tmp_path / "x"), "--data", str(empty)], capsys)
