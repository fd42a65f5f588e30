"""Bad input found before any work: the replay file against replay.num_samples (read no further
than needed) and labels that the tokenizer makes indistinguishable."""
from __future__ import annotations

import json

import pytest

from gere_ds.config.sections import RunConfig, TaskConfig
from gere_ds.data.replay import check_replay_inputs, load_replay_texts
from gere_ds.errors import InputError


def _cfg(replay: str, num_samples: int, labels=("yes", "no"), max_target_len: int = 50
         ) -> RunConfig:
    cfg = RunConfig(model="m", output_dir="out",
                    tasks=[TaskConfig(name="a", train="a.jsonl", labels=list(labels))])
    cfg.replay.data, cfg.replay.num_samples, cfg.replay.strategy = replay, num_samples, "replay"
    cfg.train.max_target_len = max_target_len
    return cfg


def test_a_replay_file_with_fewer_documents_than_num_samples_is_refused(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(5)))
    assert len(check_replay_inputs(_cfg(str(p), 5), 2)) == 5
    with pytest.raises(InputError) as err:
        check_replay_inputs(_cfg(str(p), 6), 2)
    assert str(err.value).startswith(f"{p}: replay.num_samples: 6 documents asked for, the file "
                                     f"has only 5")


def test_the_replay_file_is_read_only_as_far_as_num_samples(tmp_path):
    p = tmp_path / "r.jsonl"
    good = [{"text": f"doc {i}"} for i in range(4)]
    p.write_text("\n".join(json.dumps(r) for r in good[:2]) + "\n\n"
                 + "\n".join(json.dumps(r) for r in good[2:]) + "\n{not json at all\n")
    assert load_replay_texts(str(p), 4) == [r["text"] for r in good]  # blank line skipped
    with pytest.raises(InputError, match=rf"{p}:6: invalid JSON"):
        load_replay_texts(str(p), 5)


def test_labels_whose_targets_collide_within_max_target_len_are_refused(gpt2_tokenizer_dir):
    from transformers import GPT2TokenizerFast

    from gere_ds.training.inputs import check_label_tokens

    tok = GPT2TokenizerFast.from_pretrained(str(gpt2_tokenizer_dir))
    labels = ("sports news", "sports team")
    check_label_tokens(_cfg("r", 1, labels, max_target_len=4), tok)
    with pytest.raises(InputError) as err:
        check_label_tokens(_cfg("r", 1, labels, max_target_len=2), tok)
    assert str(err.value) == ("tasks.0.labels: labels 'sports news' and 'sports team' are the "
                              "same 2 tokens once cut to train.max_target_len=2 (label tokens + "
                              "eos); raise max_target_len or rename them")
