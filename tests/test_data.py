"""Task and replay data: prompt format, label masking, no BOS on replay, bad rows named."""
from __future__ import annotations

import pytest

from gere_ds.config.sections import TaskConfig
from gere_ds.data.encode import IGNORE, encode_example, encode_replay
from gere_ds.data.prompts import build_prompt
from gere_ds.data.replay import load_replay_texts
from gere_ds.data.tasks import load_examples
from gere_ds.errors import InputError


@pytest.fixture(scope="module")
def tok(gpt2_tokenizer_dir):
    from transformers import GPT2TokenizerFast

    return GPT2TokenizerFast.from_pretrained(str(gpt2_tokenizer_dir))


def _task(path, **kw):
    return TaskConfig(name="t", train=str(path), test=str(path), instruction="Pick.",
                      labels=["yes", "no"], **kw)


def test_prompt_format_matches_method():
    assert build_prompt("Inst", ["A", "B"], "text") == "Inst\nOption: A, B\ntext\nAnswer:"


def test_loss_only_on_target_tokens_and_eos(tok):
    enc = encode_example(tok, "Pick.", ["yes", "no"], "some text", "yes", 64, 8)
    target = [t for t in enc.labels if t != IGNORE]
    assert target == tok("yes", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert enc.input_ids[-len(target):] == target
    assert len(enc.input_ids) == len(enc.labels)


def test_truncation_keeps_answer_cue(tok):
    enc = encode_example(tok, "Pick.", ["yes", "no"], "word " * 500, "no", 32, 8)
    n_src = sum(1 for t in enc.labels if t == IGNORE)
    assert n_src == 32
    assert tok.decode(enc.input_ids[:n_src]).endswith("Answer:")
    long_label = encode_example(tok, "", ["a"], "x", "a " * 40, 32, 4)
    assert sum(1 for t in long_label.labels if t != IGNORE) == 4


def test_replay_has_no_bos_and_is_cut(tok):
    ids = encode_replay(tok, "The river opened a new bridge. " * 50, 20)
    assert len(ids) == 20 and ids == tok("The river opened a new bridge. " * 50,
                                         add_special_tokens=False)["input_ids"][:20]


def test_csv_and_parquet_rows(tmp_path):
    import pandas as pd

    df = pd.DataFrame({"sentence": ["a", "b"], "label": ["yes", "no"]})
    df.to_csv(tmp_path / "t.csv", index=False)
    df.to_parquet(tmp_path / "t.parquet")
    for name in ("t.csv", "t.parquet"):
        rows = load_examples(_task(tmp_path / name))
        assert [(r.text, r.label) for r in rows] == [("a", "yes"), ("b", "no")]


@pytest.mark.parametrize("content,needle,line", [
    ('{"sentence": "a", "label": "yes"}\n{"sentence": "b", "label": \n', "invalid JSON", 2),
    ('{"sentence": "a", "label": "yes"}\n{"sentence": "b"}\n', "label: missing field", 2),
    ('{"sentence": "a", "label": "yes"}\n\n{"sentence": "c", "label": "maybe"}\n',
     "label: label 'maybe' is not one of", 3),
])
def test_bad_rows_name_file_line_and_field(tmp_path, content, needle, line):
    p = tmp_path / "train.jsonl"
    p.write_text(content)
    with pytest.raises(InputError) as err:
        load_examples(_task(p))
    assert str(err.value).startswith(f"{p}:{line}: ") and needle in str(err.value)


def test_csv_line_numbers_count_the_header(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("sentence,label\na,yes\nb,nope\n")
    with pytest.raises(InputError, match=rf"{p}:3: label"):
        load_examples(_task(p))


def test_empty_files(tmp_path):
    p = tmp_path / "e.jsonl"
    p.write_text("\n")
    with pytest.raises(InputError, match="empty"):
        load_examples(_task(p))
    with pytest.raises(InputError, match="empty replay"):
        load_replay_texts(str(p), 10)


def test_replay_takes_first_n_and_checks_text(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text('{"text": "one"}\n{"text": "two"}\n{"text": "three"}\n')
    assert load_replay_texts(str(p), 2) == ["one", "two"]
    p.write_text('{"text": "one"}\n{"txt": "two"}\n')
    with pytest.raises(InputError, match=rf"{p}:2: text: missing"):
        load_replay_texts(str(p), 5)


def test_training_reads_the_same_formats_as_evaluation(tmp_path):
    """One reader: O-LoRA Instances files, JSON arrays and JSON lines under .json all train."""
    import json

    rows = [{"sentence": "a", "label": "yes"}, {"sentence": "b", "label": "no"}]
    (tmp_path / "inst.json").write_text(json.dumps({"Definition": ["x"], "Instances": rows}))
    (tmp_path / "arr.json").write_text(json.dumps(rows, indent=1))
    (tmp_path / "lines.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name in ("inst.json", "arr.json", "lines.json"):
        got = load_examples(_task(tmp_path / name))
        assert [(e.text, e.label) for e in got] == [("a", "yes"), ("b", "no")], name
    bad = [rows[0], {"sentence": "c", "label": "maybe"}]
    (tmp_path / "inst.json").write_text(json.dumps({"Instances": bad}))
    with pytest.raises(InputError, match=r"inst.json: Instances\[2\]\.label: label 'maybe'"):
        load_examples(_task(tmp_path / "inst.json"))
    (tmp_path / "arr.json").write_text('[\n {"sentence": "a", "label": "yes"},\n 7\n]\n')
    with pytest.raises(InputError, match=r"arr.json:3: expected a JSON object, got int"):
        load_examples(_task(tmp_path / "arr.json"))


def test_csv_rows_spanning_lines_are_located_at_their_start(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text('sentence,label\n"two\nlines",yes\nb,nope\n')
    with pytest.raises(InputError, match=rf"{p}:4: label: label 'nope'"):
        load_examples(_task(p))
    p.write_text('sentence,label\n"two\nlines",yes\n')
    assert [(e.text, e.line) for e in load_examples(_task(p))] == [("two\nlines", 2)]


def test_parquet_rows_are_named_by_index(tmp_path):
    import pandas as pd

    pd.DataFrame({"sentence": ["a", "b"], "label": ["yes", "maybe"]}).to_parquet(
        tmp_path / "t.parquet")
    with pytest.raises(InputError, match=r"t.parquet: \[2\]\.label: label 'maybe'"):
        load_examples(_task(tmp_path / "t.parquet"))
