"""The feedback store: validation, idempotency, merging, agreement, and many concurrent
submissions (threads and processes) each stored exactly once in a sound SQLite file."""

from __future__ import annotations

import multiprocessing as mp
import sqlite3
from concurrent.futures import ThreadPoolExecutor

import pytest

from tinylm.errors import UserError
from tinylm.feedback.store import (
    Ranking,
    Store,
    merge_rankings,
    normalize_order,
    strict_pairs,
)


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(tmp_path / "fb.db")


def comparison(store: Store, k: int = 4, prompt: str = "Tell me a story about a cat."):
    pid = store.add_prompt(prompt, meta={"task": "story"})
    return store.add_answers(pid, [f"answer {i}." for i in range(k)], policy="runs/sft",
                             sampling={"temperature": 1.0}, round=2, reward_model="runs/rm")


def test_sqlite_file_is_in_wal_mode_with_a_busy_timeout(store, tmp_path):
    comparison(store)
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
    assert sqlite3.connect(tmp_path / "fb.db").execute("PRAGMA journal_mode").fetchone()[0] \
        == "wal"


def test_a_ranking_records_round_policy_and_reward_model_of_its_answers(store):
    cid, ids = comparison(store)
    rid = store.add_ranking(cid, [ids[2], [ids[0], ids[3]], ids[1]], labeler="ann")
    (r,) = store.rankings(cid)
    assert r.id == rid and r.order == [[ids[2]], [ids[0], ids[3]], [ids[1]]]
    assert (r.round, r.policy, r.reward_model, r.labeler) == (2, "runs/sft", "runs/rm", "ann")
    (rc,) = store.ranked_comparisons()
    assert rc.ranks == [1, 2, 0, 1] and rc.messages[0]["content"].startswith("Tell")
    assert rc.meta == {"task": "story"} and rc.policy == "runs/sft" and rc.round == 2


def test_the_same_prompt_is_stored_once(store):
    assert store.add_prompt("hi there") == store.add_prompt([{"role": "user",
                                                              "content": "hi there"}])


def test_double_submit_stores_one_ranking(store):
    cid, ids = comparison(store)
    a = store.add_ranking(cid, ids, labeler="ann", key="form-1")
    b = store.add_ranking(cid, ids, labeler="ann", key="form-1")
    c = store.add_ranking(cid, ids, labeler="ann")  # no key: derived from the content
    d = store.add_ranking(cid, ids, labeler="ann")
    assert a == b and c == d and store.count(Ranking) == 2


@pytest.mark.parametrize("texts, message", [
    (["only one"], "at least 2 answers"),
    (["same", "other", "same"], "answers 1 and 3 are the same text"),
])
def test_bad_answer_sets_are_refused(store, texts, message):
    pid = store.add_prompt("a prompt")
    with pytest.raises(UserError, match=message) as e:
        store.add_answers(pid, texts)
    assert "\n" not in str(e.value)


def test_bad_rankings_are_refused_and_nothing_is_stored(store):
    cid, ids = comparison(store)
    for order, message in [
        (ids[:3], f"misses answer {ids[3]}"),
        ([ids[0], ids[1], ids[2], [ids[3], ids[0]]], f"names answer {ids[0]} more than once"),
        ([*ids, 999], "not one of this comparison's answers"),
        ([ids[0], [], ids[1]], "non-empty list"),
        ("1,2,3", "must be a list"),
    ]:
        with pytest.raises(UserError, match=message):
            store.add_ranking(cid, order, labeler="ann")
    with pytest.raises(UserError, match="no comparison 77"):
        store.add_ranking(77, ids, labeler="ann")
    assert store.count(Ranking) == 0


def test_all_bad_flag_needs_no_order(store):
    cid, _ = comparison(store)
    store.add_ranking(cid, [], labeler="ann", all_bad=True)
    (r,) = store.rankings()
    assert r.all_bad and r.order == []
    assert store.ranked_comparisons() == []  # a flag alone gives no pairs


def test_empty_prompt_is_refused(store):
    with pytest.raises(UserError, match="prompt is empty"):
        store.add_prompt("   ")


def test_demonstration_is_stored_once(store):
    pid = store.add_prompt("a prompt")
    a = store.add_demonstration(pid, "A better answer.", labeler="ann", key="k")
    assert store.add_demonstration(pid, "A better answer.", labeler="ann", key="k") == a


def test_merge_of_one_ranking_is_that_ranking():
    tiers = [[3], [1, 2], [4]]
    assert merge_rankings([tiers], [1, 2, 3, 4]) == tiers


def test_merge_follows_the_majority_and_breaks_a_cycle_at_its_weakest_pair():
    # 3 labelers: a>b>c, b>c>a, a>b>c: majority a>b (2:1... 3:0), b>c (3:0), a>c (2:1)
    orders = [normalize_order(o) for o in ([1, 2, 3], [2, 3, 1], [1, 2, 3])]
    assert merge_rankings(orders, [1, 2, 3]) == [[1], [2], [3]]
    # a Condorcet cycle a>b (2), b>c (2), c>a (2) with a stronger a>b: the last locked pair
    # that would close the cycle is dropped
    cyc = [normalize_order(o) for o in ([1, 2, 3], [1, 2, 3], [2, 3, 1], [3, 1, 2])]
    merged = merge_rankings(cyc, [1, 2, 3])
    assert merged[0] == [1] and sorted(a for t in merged for a in t) == [1, 2, 3]


def test_strict_pairs_skip_ties():
    assert strict_pairs([[1], [2, 3]]) == {(1, 2), (1, 3)}


def test_agreement_between_labelers(store):
    cid, ids = comparison(store, k=3)
    store.add_ranking(cid, ids, labeler="ann")  # 0 > 1 > 2
    store.add_ranking(cid, [ids[0], ids[2], ids[1]], labeler="bob")  # 0 > 2 > 1
    store.add_ranking(cid, [[ids[0], ids[1]], ids[2]], labeler="cy")  # (0 = 1) > 2
    a = store.agreement()
    # ann-bob: 3 shared strict pairs, 2 agree; ann-cy: 2 shared, 2 agree; bob-cy: 2, 1
    assert a["comparisons"] == 1 and a["pairs"] == 7
    assert a["agreement"] == pytest.approx(5 / 7)


# -- concurrency ------------------------------------------------------------------------------
N_THREADS, N_PROCS, PER_WORKER = 8, 4, 12


def _submit(db: str, worker: int, cid: int, ids: list[int]) -> list[int]:
    """Each submission twice (a double submit) under its own key; returns the ranking ids."""
    store = Store(db)
    out = []
    for j in range(PER_WORKER):
        order = ids[j % len(ids):] + ids[: j % len(ids)]
        key = f"w{worker}-{j}"
        first = store.add_ranking(cid, order, labeler=f"labeler{worker}", key=key)
        assert store.add_ranking(cid, order, labeler=f"labeler{worker}", key=key) == first
        out.append(first)
    store.engine.dispose()
    return out


def _proc_main(db: str, worker: int, cid: int, ids: list[int], q) -> None:
    q.put(_submit(db, worker, cid, ids))


def test_concurrent_submissions_from_threads_and_processes_are_each_stored_once(tmp_path):
    db = str(tmp_path / "fb.db")
    cid, ids = comparison(Store(db))
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_proc_main, args=(db, 100 + w, cid, ids, q))
             for w in range(N_PROCS)]
    for p in procs:
        p.start()
    with ThreadPoolExecutor(N_THREADS) as pool:  # one Store shared by the threads
        shared = Store(db)
        thread_ids = list(pool.map(
            lambda w: _submit_shared(shared, w, cid, ids), range(N_THREADS)))
    proc_ids = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    acknowledged = [i for ids_ in thread_ids + proc_ids for i in ids_]
    assert len(acknowledged) == len(set(acknowledged)) == (N_THREADS + N_PROCS) * PER_WORKER
    rows = Store(db).rankings()
    assert sorted(r.id for r in rows) == sorted(acknowledged)
    keys = [r.idempotency_key for r in rows]
    assert len(keys) == len(set(keys))
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert con.execute("SELECT count(*) FROM rankings").fetchone()[0] == len(acknowledged)


def _submit_shared(store: Store, worker: int, cid: int, ids: list[int]) -> list[int]:
    out = []
    for j in range(PER_WORKER):
        key = f"t{worker}-{j}"
        first = store.add_ranking(cid, ids[::-1] if j % 2 else ids, labeler=f"t{worker}",
                                  key=key)
        assert store.add_ranking(cid, ids, labeler=f"t{worker}", key=key) == first
        out.append(first)
    return out


def test_a_database_url_works(tmp_path):
    s = Store(f"sqlite:///{tmp_path / 'url.db'}")
    cid, ids = comparison(s)
    s.add_ranking(cid, ids, labeler="ann")
    assert s.integrity_check() == "ok"


def test_a_missing_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        Store(tmp_path / "nope" / "fb.db")


def test_a_store_that_starts_a_database_makes_its_folder(tmp_path):
    s = Store(tmp_path / "new" / "fb.db", create_folder=True)
    comparison(s)
    assert (tmp_path / "new" / "fb.db").is_file()
