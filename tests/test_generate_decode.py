"""Generate-mode decoding: the LM head on each row's last token, and the KV-cache loop, give the
continuations of the full-logits loop, and the loop stops once every row has ended."""
from __future__ import annotations

import torch

from gere_ds.evaluation.scoring import greedy_decode
from gere_ds.model.engine import ModelForward


class CountingForward(ModelForward):
    calls = 0

    def at_positions(self, input_ids, attention_mask, flat_positions):
        type(self).calls += 1
        return super().at_positions(input_ids, attention_mask, flat_positions)


def test_last_position_head_decodes_as_the_full_logits_loop(tiny_paths):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_paths["model"])
    model = AutoModelForCausalLM.from_pretrained(tiny_paths["model"]).eval()
    torch.manual_seed(0)
    sources = [torch.randint(5, 200, (n,)).tolist() for n in (3, 9, 5, 12, 7)]

    def full(ids, mask):  # the plain forward: [B, T, V] logits
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits

    old = greedy_decode(full, tok, sources, max_new_tokens=6, batch_size=2)
    new = greedy_decode(CountingForward(model), tok, sources, max_new_tokens=6, batch_size=2,
                        kv_cache=False)
    assert new == old and all(len(x) > 0 for x in old)
    assert CountingForward.calls > 0  # the last-position head did run


def test_the_kv_cache_loop_decodes_as_the_full_logits_loop(tiny_paths):
    """fp32: the same tokens; the prompts run once, then one token per row and step."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_paths["model"])
    model = AutoModelForCausalLM.from_pretrained(tiny_paths["model"]).eval()
    torch.manual_seed(1)
    sources = [torch.randint(5, 200, (n,)).tolist() for n in (3, 9, 5, 12, 7, 4)]

    def full(ids, mask):
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits

    widths = []
    hook = model.get_input_embeddings().register_forward_hook(
        lambda module, args, out: widths.append(args[0].shape[1]))
    try:
        cached = greedy_decode(ModelForward(model), tok, sources, max_new_tokens=8, batch_size=3)
    finally:
        hook.remove()
    assert cached == greedy_decode(full, tok, sources, max_new_tokens=8, batch_size=3)
    assert any(len(x) > 1 for x in cached)
    # per batch (longest first: 12 9 7 | 5 4 3): its longest prompt once, then single tokens
    assert [w for w in widths if w != 1] == [12, 5] and widths.count(1) > 2


def test_decoding_stops_when_every_row_has_ended(tiny_paths):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_paths["model"])
    calls = []

    def eos_after_two(ids, mask):
        """Logits that pick token 7 for two steps, then eos."""
        calls.append(ids.shape)
        logits = torch.zeros(ids.shape[0], ids.shape[1], tok.eos_token_id + 1)
        logits[..., tok.eos_token_id if len(calls) > 2 else 7] = 1.0
        return logits

    out = greedy_decode(eos_after_two, tok, [[1, 2, 3], [4, 5]], max_new_tokens=50, batch_size=8)
    assert out == [[7, 7], [7, 7]]
    assert len(calls) == 3  # not 50: one forward after the last row ended, none more
