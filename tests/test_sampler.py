"""Batch plans: shuffle-in sees everything once per epoch, BI puts exactly k replay rows in every
global batch, replay rows stay on their owning rank, and a plan is a pure function of
(seed, task, epoch, step), so a resumed run trains the rows the uninterrupted one does."""
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


MODES = [dict(per_batch=0), dict(per_batch=3)]  # shuffle-in, batch interpolation


def _run(sampler, start=(0, 0), epochs=3):
    """Every step's micro-batches from ``start`` on, in the trainer's loop order."""
    e0, s0 = start
    return [((e, s), sampler.step_micro_batches(e, s)) for e in range(e0, epochs)
            for s in range(s0 if e == e0 else 0, sampler.steps_per_epoch())]


@pytest.mark.parametrize("mode", MODES)
def test_plan_is_pure_in_seed_task_epoch_step(mode):
    """No hidden state: a fresh sampler asked in any order answers the same; the task index and
    the epoch change the plan."""
    ordered = dict(_run(_samplers(2, **mode)[1]))
    fresh = _samplers(2, **mode)[1]
    for key in reversed(list(ordered)):
        assert fresh.step_micro_batches(*key) == ordered[key], key
    first = _samplers(2, **mode)[0]
    other_task = _samplers(2, task_index=1, **mode)[0]
    assert first.global_step_rows(0, 0) != other_task.global_step_rows(0, 0)
    epochs = [[first.global_step_rows(e, s) for s in range(first.steps_per_epoch())]
              for e in range(2)]
    assert epochs[0] != epochs[1]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("world", [2, 3])
def test_rank_shards_are_disjoint_and_complete(world, mode):
    """Each rank's own sampler gives its part of the global batch: together exactly the global
    batch, replay rows only from the rank's shard, the shards a partition of the replay set."""
    ss = _samplers(world, **mode)
    shards = [set(s.shards[s.rank]) for s in ss]
    assert set().union(*shards) == set(range(7)) and sum(map(len, shards)) == 7
    for (epoch, step), _ in _run(ss[0], epochs=2):
        parts = [sum(s.step_micro_batches(epoch, step), []) for s in ss]
        assert sorted(sum(parts, [])) == sorted(sum(ss[0].global_step_rows(epoch, step), []))
        assert all(len(p) == ss[0].rows_per_rank for p in parts)
        for r, part in enumerate(parts):
            assert {i for is_replay, i in part if is_replay} <= shards[r], (r, epoch, step)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cut", [1, 5, 9])
def test_resume_at_step_k_gives_the_uninterrupted_rows(mode, cut):
    """A new process resuming at the k-th step (the trainer's Progress: epoch, step) trains
    exactly the rows the uninterrupted run trains from there on, on every rank."""
    for rank in range(2):
        full = _run(_samplers(2, **mode)[rank])
        assert cut < len(full)  # the cut lands inside the run (past an epoch end for cut=9)
        resumed = _run(_samplers(2, **mode)[rank], start=full[cut][0])
        assert resumed == full[cut:]


def test_per_batch_must_be_below_global_batch():
    with pytest.raises(ValueError, match="per_batch"):
        _samplers(1, micro_batch_size=1, grad_accum=2, per_batch=2)
