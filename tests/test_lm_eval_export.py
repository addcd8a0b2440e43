"""The Hugging Face Llama export of the text backbone runs in lm-evaluation-harness, offline.

The paper's text benchmarks (the Llama 2 suite) run as `lm_eval --model hf --model_args
pretrained=HF_OUT ...` on the folder `inference.convert --hf-llama HF_OUT` writes. Here a
multiple-choice task is built locally (a JSON file and a task YAML; no hub, no download) and run
through lm_eval's own Python entry point on the tiny export of tests/conftest.py. lm-eval is the
optional `lm-eval` extra (it pins its own `datasets`): without it the test is skipped.
"""

import json
import math

import pytest

from tests.helpers import one_thread  # noqa: F401 (one_thread: autouse fixture)

QUESTIONS = [
    ("a photo of the", ["cat", "dog", "red"], 0),
    ("two green", ["digit", "blue", "the"], 1),
    ("the red", ["one", "two", "photo"], 2),
    ("a blue", ["cat", "of", "three"], 0),
    ("digit one two", ["three", "a", "dog"], 0),
]


def test_hf_export_runs_a_local_multiple_choice_task(folder, tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is the optional lm-eval extra")
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "transfusion_local_mc.yaml").write_text(
        "task: transfusion_local_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n"
    )
    hf = folder.parent / "hf"  # inference.convert --hf-llama
    out = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={hf},tokenizer={hf},dtype=float32", tasks=["transfusion_local_mc"],
        task_manager=TaskManager(include_path=str(tasks)), device="cpu", batch_size=4, log_samples=True,
    )
    result = out["results"]["transfusion_local_mc"]
    samples = out["samples"]["transfusion_local_mc"]
    assert len(samples) == len(QUESTIONS) and 0 <= result["acc,none"] <= 1
    for s in samples:  # one log-likelihood per choice, each a real number < 0
        lls = [r[0][0] for r in s["resps"]]
        assert len(lls) == 3 and all(math.isfinite(x) and x < 0 for x in lls)
