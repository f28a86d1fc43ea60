"""lm-evaluation-harness against the live server: `--model local-completions` scores equal
`--model hf` on the run's export-hf folder, for a log-likelihood task (multiple choice) and a
generation task, both built from local files. lm-eval[api] is a dev dependency (`make test`
installs it); elsewhere the module is skipped, but never under CI=true."""

from __future__ import annotations

import json
import os

import pytest

if os.environ.get("CI") == "true":
    import lm_eval
else:
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval[api] is not installed")

from tinylm.hf import export_hf  # noqa: E402

DOCS = [
    {"q": "Where is the cat?", "choices": ["The cat is in the park.", "Ball the of cat."],
     "gold": 0},
    {"q": "Where is the dog?", "choices": ["dog dog dog the", "The dog is in the park."],
     "gold": 1},
    {"q": "Where is the owl?", "choices": ["The owl is in the tree.", "tree owl The"],
     "gold": 0},
    {"q": "Where is the fox?", "choices": ["The fox is in the mat.", "mat fox in"], "gold": 0},
]

CHOICE_TASK = """task: tinylm_where
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "<|user|>{{{{q}}}}<|end|><|assistant|>"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
metric_list:
  - metric: acc
"""

GEN_TASK = """task: tinylm_where_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "<|user|>{{{{q}}}}<|end|><|assistant|>"
doc_to_target: "{{{{choices[gold][:-1]}}}}"
generation_kwargs:
  until: ["<|end|>", "."]
  max_gen_toks: 24
  do_sample: false
metric_list:
  - metric: exact_match
"""


def scores(model: str, model_args: str, tasks) -> dict:
    from lm_eval import simple_evaluate

    out = simple_evaluate(model=model, model_args=model_args,
                          tasks=["tinylm_where", "tinylm_where_gen"], task_manager=tasks,
                          batch_size=1, log_samples=False)
    return {task: {k: v for k, v in res.items() if k.split(",")[0] in ("acc", "exact_match")}
            for task, res in out["results"].items()}


# Not slow any more: with only these two tasks indexed (not lm-eval's thousands), both
# evaluations take ~10 s beside the other server tests, ~25 s alone, on a loaded machine.
def test_local_completions_scores_equal_hf(server, serve_run, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "where.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "where.yaml").write_text(CHOICE_TASK.format(data=data))
    (tasks / "where_gen.yaml").write_text(GEN_TASK.format(data=data))
    hf_dir = export_hf(serve_run, tmp_path / "hf")
    from lm_eval.tasks import TaskManager

    # Only these two tasks: indexing lm-eval's thousands of built-in task files takes longer
    # than both evaluations.
    tasks = TaskManager(include_path=str(tasks), include_defaults=False)
    served = scores("local-completions",
                    f"model={serve_run.name},base_url={server.url}/v1/completions,"
                    f"tokenizer={hf_dir},tokenizer_backend=huggingface,tokenized_requests=True,"
                    f"num_concurrent=1,max_retries=1", tasks)
    reference = scores("hf", f"pretrained={hf_dir},dtype=float32,device=cpu", tasks)
    assert served.keys() == reference.keys() == {"tinylm_where", "tinylm_where_gen"}
    for task in served:
        for metric, value in reference[task].items():
            assert served[task][metric] == pytest.approx(value, abs=1e-6), (task, metric)
    assert reference["tinylm_where"]["acc,none"] > 0.5  # the tasks can tell models apart
