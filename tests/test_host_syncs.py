"""The index tensors of a micro-step are built on the CPU in collate: the step makes no
supervised-position `nonzero` and no row-index tensor from Python lists on the device."""
from __future__ import annotations

import torch

from gere_ds.data.collate import collate
from gere_ds.data.encode import IGNORE, Encoded
from gere_ds.training.losses import supervised_positions


def test_collate_builds_positions_targets_and_replay_rows_on_the_cpu():
    rows = [Encoded([5, 6, 7, 8], [IGNORE, IGNORE, 7, 8]), Encoded([9, 10, 11], [9, 10, 11]),
            Encoded([12, 13], [IGNORE, 13])]
    mb = collate(rows, [-1, 4, -1], pad_id=0)
    pos, targets = supervised_positions(mb.labels)
    assert torch.equal(mb.positions, pos) and torch.equal(mb.targets, targets)
    assert mb.replay_rows.tolist() == [1]
    assert all(t.device.type == "cpu" for t in (mb.positions, mb.targets, mb.replay_rows))
    moved = mb.to(torch.device("cpu"))
    assert torch.equal(moved.positions, pos) and torch.equal(moved.replay_rows, mb.replay_rows)


def test_compute_loss_uses_the_collated_indices(tiny_config, monkeypatch):
    """The step's loss on a plain model (no DeepSpeed needed for a forward) never recomputes
    the positions from the labels on the device."""
    from gere_ds.training import step as step_module
    from gere_ds.training.batches import BatchMaker
    from gere_ds.config.loading import load_config
    from gere_ds.training.inputs import validate_inputs
    from gere_ds.model.capture import FinalNormCapture
    from gere_ds.model.engine import Engine, _load_model, load_tokenizer
    from gere_ds.strategies import make_term

    cfg = load_config(tiny_config("replay", replay={"per_batch": 2}))
    inputs = validate_inputs(cfg, 1)
    tok = load_tokenizer(cfg, lambda m: None)
    model, _ = _load_model(cfg, {})
    engine = Engine(engine=model, tokenizer=tok, ds_config={}, hf_ds_config=None)
    term = make_term(cfg)
    batches = BatchMaker(cfg, tok, torch.device("cpu"), inputs.train_sets, inputs.replay_texts,
                         term.uses_replay, 1, 0)
    ts = step_module.TrainStep(cfg, engine, FinalNormCapture(model), batches, term, 1)
    rows = [(False, 0), (True, batches.shard[0])]
    expected = ts.compute_loss(0, rows).local_loss

    def refused(labels):
        raise AssertionError("supervised positions recomputed in the step")

    monkeypatch.setattr(step_module, "supervised_positions", refused)
    got = ts.compute_loss(0, rows).local_loss
    assert torch.isfinite(got) and torch.equal(got, expected)


def test_row_counts_need_no_value_read_back(monkeypatch):
    """Per-row CE sums and target counts from index_add alone: bincount (which reads the largest
    index back to size its output) is never called."""
    from gere_ds.training import losses

    logits = torch.randn(7, 11)
    targets = torch.randint(0, 11, (7,))
    row_of = torch.tensor([0, 0, 2, 2, 2, 3, 3])
    want = torch.bincount(row_of, minlength=5).float()

    def refused(*args, **kwargs):
        raise AssertionError("bincount in the step")

    monkeypatch.setattr(losses.torch, "bincount", refused)
    sums, counts = losses.row_ce_sums(logits, targets, row_of, 5)
    assert torch.equal(counts, want)
    ce = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    assert torch.allclose(sums, torch.zeros(5).index_add(0, row_of, ce))
