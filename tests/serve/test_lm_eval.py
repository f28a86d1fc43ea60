"""lm-evaluation-harness against the live server: `--model local-completions` scores equal
`--model hf` on the run's export-hf folder, for a log-likelihood task (multiple choice) and a
generation task, both built from local files. Skipped where lm-eval[api] is not installed (it
is a heavy dev dependency: datasets, pandas, scikit-learn, ...)."""

from __future__ import annotations

import json

import pytest

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


def scores(model: str, model_args: str, tasks_dir) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(model=model, model_args=model_args,
                          tasks=["tinylm_where", "tinylm_where_gen"],
                          task_manager=TaskManager(include_path=str(tasks_dir)),
                          batch_size=1, log_samples=False)
    return {task: {k: v for k, v in res.items() if k.split(",")[0] in ("acc", "exact_match")}
            for task, res in out["results"].items()}


@pytest.mark.slow  # lm-eval's imports and two evaluations: ~50 s of CPU, minutes under load
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
