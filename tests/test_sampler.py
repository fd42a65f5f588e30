"""Batch plans: shuffle-in sees everything once per epoch, BI puts exactly k replay rows in every
global batch, replay rows stay on their owning rank, plans are deterministic and resumable."""
from __future__ import annotations

from collections import Counter

import pytest

from gere_ds.data.sampler import ContinualSampler, replay_shard


def _samplers(world, **kw):
    base = dict(n_task=23, n_replay=7, micro_batch_size=2, grad_accum=2, per_batch=0, seed=42,
                task_index=0)
    base.update(kw)
    return [ContinualSampler(world_size=world, rank=r, **base) for r in range(world)]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_replay_shards_partition_the_replay_set(world):
    shards = [set(replay_shard(11, world, r, seed=5)) for r in range(world)]
    assert set().union(*shards) == set(range(11))
    assert sum(len(s) for s in shards) == 11


@pytest.mark.parametrize("world,accum", [(1, 1), (2, 1), (2, 3), (3, 2)])
def test_shuffle_in_every_example_and_replay_doc_once_per_epoch(world, accum):
    ss = _samplers(world, grad_accum=accum)
    for epoch in range(2):
        replay, task = Counter(), Counter()
        for step in range(ss[0].steps_per_epoch()):
            plan = ss[0].global_step_rows(epoch, step)
            for r in range(world):
                assert sum(ss[r].step_micro_batches(epoch, step), []) == plan[r]
                for is_replay, i in plan[r]:
                    (replay if is_replay else task)[i] += 1
                    if is_replay:
                        assert i in ss[r].shards[r]  # replay rows only on their owner
        assert sorted(replay) == list(range(7)) and set(replay.values()) == {1}
        assert sorted(task) == list(range(23))  # all seen (the last batch wraps around)


@pytest.mark.parametrize("world,micro,accum,k", [(1, 2, 2, 1), (2, 2, 2, 3), (2, 1, 3, 5),
                                                 (3, 2, 1, 2), (4, 1, 2, 7)])
def test_batch_interpolation_exactly_k_per_global_batch(world, micro, accum, k):
    ss = _samplers(world, micro_batch_size=micro, grad_accum=accum, per_batch=k)
    drawn = Counter()
    for epoch in range(3):
        for step in range(ss[0].steps_per_epoch()):
            plan = ss[0].global_step_rows(epoch, step)
            assert sum(is_r for rows in plan for is_r, _ in rows) == k
            assert all(len(rows) == micro * accum for rows in plan)
            for r, rows in enumerate(plan):
                for is_r, i in rows:
                    if is_r:
                        drawn[(r, i)] += 1
    # without replacement: on each rank, every sample of its shard is drawn floor or ceil times
    for r in range(world):
        per_sample = [drawn[(r, i)] for i in ss[r].shards[r]]
        assert max(per_sample) - min(per_sample) <= 1, (r, per_sample)


def test_same_seed_same_stream_other_seed_other_stream():
    a = _samplers(2, per_batch=3)[0]
    b = _samplers(2, per_batch=3)[0]
    c = _samplers(2, per_batch=3, seed=43)[0]
    plan = lambda s: [s.global_step_rows(e, st) for e in range(2)  # noqa: E731
                      for st in range(s.steps_per_epoch())]
    assert plan(a) == plan(b)
    assert plan(a) != plan(c)


def test_resumed_stream_equals_uninterrupted():
    full = _samplers(2, per_batch=3)[1]
    steps = [(e, s) for e in range(3) for s in range(full.steps_per_epoch())]
    reference = [full.step_micro_batches(e, s) for e, s in steps]
    resumed = _samplers(2, per_batch=3)[1]
    cut = 5
    state = {"epoch": steps[cut][0], "step": steps[cut][1], "task": 0, "world_size": 2,
             "seed": 42}
    resumed.load_state_dict(state)
    e0, s0 = resumed.state.epoch, resumed.state.step
    rest = [resumed.step_micro_batches(e, s) for e, s in steps if (e, s) >= (e0, s0)]
    assert rest == reference[cut:]
    with pytest.raises(ValueError):
        _samplers(3, per_batch=3)[0].load_state_dict(state)


def test_per_batch_must_be_below_global_batch():
    with pytest.raises(ValueError, match="per_batch"):
        _samplers(1, micro_batch_size=1, grad_accum=2, per_batch=2)
