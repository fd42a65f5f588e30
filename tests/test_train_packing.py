"""Packed training rows (train.packing): the layout, the forward's per-row values against the
padded rows on a real model, and the settings that are refused. The whole training step on
packed rows (every strategy, values and gradients, 2 ranks against 1 process) is checked in
tests/test_train_dist.py."""
from __future__ import annotations

import pytest
import torch

from gere_ds.data.collate import collate, pack_rows
from gere_ds.data.encode import IGNORE, Encoded
from gere_ds.errors import InputError


def test_rows_are_packed_whole_first_fit_with_restarting_positions():
    rows = [[5, 6, 7, 8], [9, 10, 11], [12, 13]]
    one = pack_rows(rows, width=4, pad_id=0, capacity=9)
    assert one.input_ids.tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 13]]
    assert one.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 0, 1]]
    # source: padded flat position -> packed flat position (row b, token t at b * 4 + t)
    assert one.source.tolist() == [0, 1, 2, 3, 4, 5, 6, 0, 7, 8, 0, 0]
    two = pack_rows(rows, width=4, pad_id=0, capacity=6)  # first fit: 4 + 2 | 3 (+ 3 padding)
    assert two.input_ids.tolist() == [[5, 6, 7, 8, 12, 13], [9, 10, 11, 0, 0, 0]]
    assert two.position_ids.tolist() == [[0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 1, 2]]
    assert two.source.tolist() == [0, 1, 2, 3, 6, 7, 8, 0, 4, 5, 0, 0]
    with pytest.raises(ValueError, match="longer than the packing capacity of 3"):
        pack_rows(rows, width=4, pad_id=0, capacity=3)


def test_unpack_returns_the_padded_layout_with_zero_padding():
    rows = [Encoded([5, 6, 7, 8], [IGNORE, IGNORE, 7, 8]), Encoded([9, 10], [9, 10])]
    mb = collate(rows, [-1, 3], pad_id=0, pack_capacity=16)
    values = torch.arange(6, dtype=torch.float32).reshape(1, 6, 1) + 1  # token k -> k + 1
    out = mb.packed.unpack(values, mb.attention_mask)
    assert out[..., 0].tolist() == [[1, 2, 3, 4], [5, 6, 0, 0]]
    moved = mb.to(torch.device("cpu"))
    assert torch.equal(moved.packed.source, mb.packed.source)


def test_a_packed_forward_gives_each_rows_padded_values(tiny_paths):
    """Hidden states and logits of every real token, packed against padded (fp32, sdpa): equal up
    to the rounding of other matrix shapes."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_paths["model"], dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    g = torch.Generator().manual_seed(0)
    lengths = [11, 4, 17, 9]
    rows = [Encoded(ids, ids) for ids in
            (torch.randint(3, model.config.vocab_size, (n,), generator=g).tolist()
             for n in lengths)]
    mb = collate(rows, [0, -1, 1, -1], pad_id=0, pack_capacity=32)  # two packed sequences
    assert mb.packed.input_ids.shape[0] == 2
    with torch.no_grad():
        padded = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask,
                       output_hidden_states=True, use_cache=False)
        packed = model(input_ids=mb.packed.input_ids, position_ids=mb.packed.position_ids,
                       output_hidden_states=True, use_cache=False)
    real = mb.attention_mask.bool()
    for a, b in ((packed.logits, padded.logits), (packed.hidden_states[-1],
                                                   padded.hidden_states[-1])):
        got = mb.packed.unpack(a, mb.attention_mask)[real]
        want = b[real]
        assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max())
    # what a row sees is its own: the same rows packed in another order give the same values
    swapped = collate(rows[::-1], [-1, 1, -1, 0], pad_id=0, pack_capacity=64)
    with torch.no_grad():
        again = model(input_ids=swapped.packed.input_ids,
                      position_ids=swapped.packed.position_ids, use_cache=False).logits
    back = swapped.packed.unpack(again, swapped.attention_mask)
    for b, n in enumerate(lengths):
        ref = padded.logits[b, :n]
        assert float((back[3 - b, :n] - ref).abs().max()) <= 1e-4 * float(ref.abs().max())


@pytest.mark.parametrize("train, match", [
    ({"packing": True, "pack_length": 100}, "shorter than a row may be"),
    ({"packing": True, "pack_length": -1}, "must be >= 0"),
])
def test_a_pack_length_that_cannot_hold_a_row_is_one_line(tiny_config, train, match):
    from gere_ds.config.loading import load_config

    path = tiny_config("tm", train={"max_source_len": 96, "max_target_len": 8, **train})
    with pytest.raises(InputError, match=match) as err:
        load_config(path)
    text = str(err.value)
    assert "\n" not in text and "train.pack_length" in text and str(path) in text


def test_a_pack_length_over_the_models_context_is_one_line(tiny_config, tiny_paths):
    from gere_ds.config.loading import load_config
    from gere_ds.training.step import pack_capacity

    class Engine:  # what pack_capacity asks of the engine: the model's context length
        def context_length(self) -> int:
            return 512

    cfg = load_config(tiny_config("tm", train={"packing": True, "pack_length": 1024}))
    with pytest.raises(InputError, match="longer than the model's context"):
        pack_capacity(cfg, Engine())
    cfg.train.pack_length = 0
    assert pack_capacity(cfg, Engine()) == 512  # the model's context by default
    cfg.train.packing = False
    assert pack_capacity(cfg, Engine()) is None
