"""CurriculumSampler: admitted difficulty, no wasted repeats, passes, rank sharding, pure function of n, resume."""

import pickle

import numpy as np
import pytest
import torch

from lightning_dataeff.curriculum import CurriculumSampler, analyze
from lightning_dataeff.curriculum.sampler import (
    CurriculumDataLoader,
    _build_admission,
    _permute,
    _round_keys,
    _webster,
    parse_metric_rules,
)

N = 240


def linear(lo, hi, steps, step=1, **extra):
    return {"min_difficulty": lo, "max_difficulty": hi, "schedule_type": "fixed_linear",
            "schedule_config": {"total_curriculum_step": steps, "difficulty_step": step}, **extra}


@pytest.fixture(scope="module")
def analysis(tmp_path_factory):
    rng = np.random.default_rng(0)
    data = [rng.integers(1, 50, rng.integers(1, 33)).tolist() for _ in range(N)]
    out = tmp_path_factory.mktemp("an")
    return analyze(data, ["seqlen", "vocab_rarity"], out, num_workers=0, chunk_size=64, progress=False)


def stream(sampler, epochs):
    """(micro-batch n, global batch ids) through the public iterator of every rank, epoch by epoch."""
    replicas = sampler.world[0]
    ranks = [pickle.loads(pickle.dumps(sampler)) for _ in range(replicas)]
    for r, s in enumerate(ranks):
        s.rank = r
    out = []
    for epoch in range(epochs):
        for s in ranks:
            s.set_epoch(epoch)
        for i, parts in enumerate(zip(*(list(s) for s in ranks))):
            out.append((epoch * len(sampler) + i, np.concatenate(parts)))
    return out


GROWING = {
    "value": dict(metrics={"seqlen": linear(4, 32, 40)}),
    "percentile_and_value": dict(metrics={"vocab_rarity": linear(10, 100, 30, 10, difficulty_type="percentile"),
                                          "seqlen": linear(16, 32, 20, 8)}),
    "stops_below_max": dict(metrics={"seqlen": linear(4, 20, 10)}),
    "no_metrics": dict(metrics=None),
}


@pytest.mark.parametrize("config", list(GROWING), ids=list(GROWING))
def test_no_wasted_repeats_and_k_plus_1_only_after_k(analysis, config):
    s = CurriculumSampler(N, 4, seed=3, analysis=analysis, num_replicas=2, rank=0, accumulate=2, **GROWING[config])
    counts = np.zeros(N, np.int64)
    order = s.admission_order()
    for n, ids in stream(s, 4):
        pool = order[: s.pool_size(s.step_of(n))]  # earliest admitted first
        for i in ids:
            # a repeat only once every admitted sample has been drawn
            assert counts[i] == 0 or counts[pool].min() >= 1, (n, i)
            counts[i] += 1
        # a (k+1)-th draw only after every sample admitted no later has been drawn k times
        c = counts[pool]
        assert (c - np.minimum.accumulate(c)).max() <= 1, n
        assert len(set(ids.tolist())) == len(ids)  # the pool is >= the global batch: distinct ids


def test_never_above_current_difficulty(analysis):
    seqlen = np.asarray(analysis["seqlen"].sample_to_metric)
    s = CurriculumSampler(N, 4, seed=3, analysis=analysis, accumulate=2,
                          metrics={"seqlen": linear(4, 32, 20, difficulty_type="value")})
    sched = s.rules[0].schedule
    for n in range(120):
        ids = s.batch(n)
        assert s.step_of(n) == n // 2
        assert seqlen[ids].max() <= sched(n // 2)
    assert s.pool(40) is None  # difficulty 32 admits everything


@pytest.mark.parametrize("chunk", [7, 1 << 22])
def test_intersection_pool_is_brute_force_intersection(analysis, chunk):
    rarity = np.asarray(analysis["vocab_rarity"].sample_to_metric)
    seqlen = np.asarray(analysis["seqlen"].sample_to_metric)
    rules = parse_metric_rules({"vocab_rarity": linear(10, 100, 30, 10, difficulty_type="percentile"),
                                "seqlen": linear(16, 32, 20, 8)})
    admission = _build_admission(rules, analysis, N, chunk=chunk)
    rank = np.empty(N, np.int64)
    rank[np.argsort(rarity, kind="stable")] = np.arange(N)
    for step in range(35):
        p, d = rules[0].schedule(step), rules[1].schedule(step)
        expected = np.flatnonzero((rank < np.ceil(p * N / 100 - 1e-9)) & (seqlen <= d))
        assert sorted(admission.prefix(admission.count(step)).tolist()) == expected.tolist(), step


def test_newly_admitted_samples_mix_with_the_unseen_rest(analysis):
    # 10% admitted at step 0, everything from step 1 on: the draws after the event take the unseen rest of
    # the first block and the new block in proportion to what each has left (within one sample)
    s = CurriculumSampler(N, 4, seed=3, analysis=analysis,
                          metrics={"vocab_rarity": linear(10, 100, 1, 90, difficulty_type="percentile")})
    first = set(s.pool(0).tolist())
    drawn = set(s.global_batch(0).tolist())
    old_left, new_left = len(first) - len(drawn), N - len(first)
    seen_old = 0
    for x, n in enumerate(range(1, 20), start=1):
        seen_old += sum(i in first for i in s.global_batch(n).tolist())
        expected = 4 * x * old_left / (old_left + new_left)
        assert abs(seen_old - expected) <= 1, (n, seen_old, expected)


def test_plain_passes_cover_every_sample_once(analysis):
    s = CurriculumSampler(50, 4, seed=1)  # 12 batches per epoch, 48 draws: passes run across epochs
    draws = np.concatenate([ids for _, ids in stream(s, 25)])  # 1200 draws = 24 passes
    for p in range(24):
        counts = np.bincount(draws[: (p + 1) * 50], minlength=50)
        assert counts.max() - counts.min() <= 1
    assert np.array_equal(np.bincount(draws, minlength=50), np.full(50, 24))
    assert CurriculumSampler(50, 4, seed=2).batch(0) != s.batch(0)


def test_plain_loop_without_set_epoch_moves_on():
    s = CurriculumSampler(50, 4, seed=1)
    first, second = sum(list(s), []), sum(list(s), [])
    assert len(set(first + second)) == 50 and first != second


def test_pass_orders_are_uniform():
    # which sample opens a pass, over 3000 passes of 10 samples: chi-square far inside its tail
    s = CurriculumSampler(10, 1, seed=4)
    firsts = np.asarray([s.global_batch(n)[0] for n in range(0, 30000, 10)])
    counts = np.bincount(firsts, minlength=10)
    chi2 = ((counts - 300) ** 2 / 300).sum()
    assert chi2 < 9 + 5 * np.sqrt(18)


@pytest.mark.parametrize("metrics", [None, {"seqlen": linear(8, 32, 30)}])
def test_ranks_disjoint_and_union_is_global_batch(analysis, metrics):
    replicas = [
        CurriculumSampler(N, 5, seed=7, analysis=analysis, metrics=metrics, num_replicas=3, rank=r) for r in range(3)
    ]
    assert len(replicas[0]) == N // 15
    for n in range(0, 60, 3):
        parts = [r.batch(n) for r in replicas]
        union = sum(parts, [])
        assert len(set(union)) == 15
        assert union == replicas[1].global_batch(n).tolist()


@pytest.mark.parametrize("metrics", [None, {"seqlen": linear(4, 32, 25)}])
def test_interrupted_then_resumed_stream_identical(analysis, metrics):
    def make():
        return CurriculumSampler(N, 8, seed=5, analysis=analysis, metrics=metrics, accumulate=3)

    full = make()
    batches = []
    for epoch in range(3):
        full.set_epoch(epoch)
        batches += list(full)
    first = make()
    it = iter(first)
    head = [next(it) for _ in range(11)]
    resumed = make()
    resumed.load_state_dict({"position": 11, "seed": 5})
    tail = list(resumed)  # to the end of epoch 0
    resumed.set_epoch(1)
    tail += list(resumed)
    resumed.set_epoch(2)
    tail += list(resumed)
    assert head + tail == batches


@pytest.mark.parametrize("metrics", [None, {"seqlen": linear(4, 32, 25)}])
def test_batches_are_a_pure_function_of_n(analysis, metrics):
    forward = CurriculumSampler(N, 8, seed=5, analysis=analysis, metrics=metrics)
    expected = [forward.batch(n) for n in range(90)]
    backward = CurriculumSampler(N, 8, seed=5, analysis=analysis, metrics=metrics)
    assert [backward.batch(n) for n in reversed(range(90))] == expected[::-1]
    clone = pickle.loads(pickle.dumps(forward))
    assert [clone.batch(n) for n in range(90)] == expected


def test_step_of_matches_lightning_accumulation():
    s = CurriculumSampler(44, 4, accumulate=3)  # 11 micro-batches per epoch: 4 steps (last one short)
    assert [s.step_of(n) for n in range(13)] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 4, 4]
    assert [s.first_batch_of(k) for k in range(6)] == [0, 3, 6, 9, 11, 14]
    s.epoch_length = 5  # e.g. limit_train_batches
    assert [s.step_of(n) for n in range(7)] == [0, 0, 0, 1, 1, 2, 2]


def test_small_pool_repeats_within_a_batch(analysis):
    seqlen = np.asarray(analysis["seqlen"].sample_to_metric)
    lo = int(seqlen.min())
    s = CurriculumSampler(N, 32, analysis=analysis, metrics={"seqlen": linear(lo, 32, 1000)})
    pool = s.pool(0)
    assert len(pool) < 32
    with pytest.warns(UserWarning, match="fewer than the global batch"):
        ids = s.batch(0)
    counts = np.bincount(ids, minlength=N)[pool]
    assert len(ids) == 32 and seqlen[ids].max() <= lo and counts.max() - counts.min() <= 1


def test_pool_never_shrinks_when_a_difficulty_falls(analysis):
    seqlen = np.asarray(analysis["seqlen"].sample_to_metric)
    fall = {"schedule_type": "fixed_discrete", "schedule_config": {"difficulty": [8, 32, 4], "max_step": [2, 4]}}
    s = CurriculumSampler(N, 4, analysis=analysis, metrics={"seqlen": fall})
    assert s.pool(3) is None and s.pool(9) is None  # as DeepSpeed, whose clusters stay
    assert len(s.pool(0)) == (seqlen <= 8).sum()


@pytest.mark.parametrize("size", [1, 2, 3, 7, 97, 1000, 4096, 10007])
def test_permutation_is_a_bijection(size):
    x = np.arange(size)
    y = _permute(x, size, _round_keys(5, 2, np.full(size, 3)))
    assert np.array_equal(np.sort(y), x)


def test_webster_apportionment_is_house_monotone():
    rng = np.random.default_rng(0)
    remaining = rng.integers(1, 500, 30)
    scale = int(remaining.max()) << 10
    prev = np.zeros_like(remaining)
    for x in range(0, int(remaining.sum()) + 1, 37):
        n = _webster(remaining, scale, x)
        assert n.sum() == x and (n >= prev).all() and (n <= remaining).all()
        assert np.abs(n - x * remaining / remaining.sum()).max() <= 1.5
        prev = n


def test_loader_state_counts_batches_handed_out_not_prefetched():
    s = CurriculumSampler(64, 2, seed=1)
    loader = CurriculumDataLoader(torch.arange(64), batch_sampler=s, num_workers=2, prefetch_factor=4)
    it = iter(loader)
    taken = [next(it).tolist() for _ in range(5)]
    assert loader.state_dict() == {"position": 5, "seed": 1}
    assert taken == [s.batch(n) for n in range(5)]
    del it


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_samples=0), "num_samples"),
        (dict(batch_size=0), "batch_size"),
        (dict(seed=-1), "seed"),
        (dict(num_replicas=2, rank=2), "rank"),
        (dict(num_samples=10, batch_size=4, num_replicas=3), "num_samples"),
        (dict(metrics={"seqlen": linear(4, 32, 10)}, analysis=None), "needs its analysis"),
        (dict(metrics={"seqlen": {**linear(4, 32, 10), "difficulty_type": "rank"}}), "seqlen.difficulty_type"),
        (dict(metrics={"seqlen": {**linear(4, 32, 10), "clustering_type": "x"}}), "seqlen.clustering_type"),
        (dict(metrics={"seqlen": {**linear(4, 32, 10), "warmup": 1}}), "unknown keys"),
        (dict(metrics={"seqlen": linear(4, 32, 0)}), "seqlen: schedule_config.total_curriculum_step"),
        (dict(metrics={"vocab_rarity": linear(1, 200, 10, difficulty_type="percentile")}), "<= 100"),
        (dict(metrics={"seqlen": linear(4, 32, 10)}, num_samples=100), "covers 240 samples"),
        (dict(metrics={"vocab_rarity": linear(1, 100, 10, difficulty_type="value")}), "admits no sample"),
        (dict(metrics={"seqlen": {"min_difficulty": 4, "max_difficulty": 32, "schedule_type": "custom",
                                  "schedule_config": {"custom_fn": lambda s: 4}}}), "total_curriculum_step >= 1"),
        (dict(metrics=[1]), "mapping"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_arguments(analysis, kwargs, match):
    kwargs = {"num_samples": N, "batch_size": 4, "analysis": analysis, **kwargs}
    with pytest.raises(ValueError, match=match):
        CurriculumSampler(kwargs.pop("num_samples"), kwargs.pop("batch_size"), **kwargs)


def test_analysis_dir_and_ignored_deepspeed_paths(analysis):
    path = analysis["seqlen"].path.rsplit("/", 1)[0]
    with pytest.warns(UserWarning, match="index_to_sample_path"):
        s = CurriculumSampler(
            N, 4, analysis=path, metrics={"seqlen": {**linear(4, 32, 10), "index_to_sample_path": "x"}}
        )
    assert list(s.analysis) == ["seqlen"]


@pytest.mark.parametrize(
    "state,missing,expected",
    [({}, r"\['seed', 'position'\]", (4, 5)), ({"position": 2}, r"\['seed'\]", (4, 2)),
     ({"seed": 6}, r"\['position'\]", (6, 5))],
)
def test_load_state_dict_keeps_missing_entries(state, missing, expected):
    sampler = CurriculumSampler(16, 2, seed=4)
    sampler.set_position(5)
    with pytest.warns(UserWarning, match=missing):
        sampler.load_state_dict(state)
    assert (sampler.seed, sampler.position) == expected


@pytest.mark.parametrize("state,match", [({"seed": "x", "position": 0}, "'seed' must be a non-negative integer"),
                                         ({"seed": 1, "position": -1}, "'position' must be a non-negative"),
                                         ([1], "must be a mapping")])
def test_load_state_dict_rejects_bad_entries(state, match):
    with pytest.raises(ValueError, match=match):
        CurriculumSampler(16, 2).load_state_dict(state)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_torchdata_stateful_dataloader_resumes_mid_epoch(num_workers):
    stateful = pytest.importorskip("torchdata.stateful_dataloader")  # optional: not a dependency

    def loader():
        return stateful.StatefulDataLoader(torch.arange(64), batch_sampler=CurriculumSampler(64, 2, seed=1),
                                           num_workers=num_workers)

    full = loader()
    it = iter(full)
    [next(it) for _ in range(5)]
    state = full.state_dict()
    expected = [next(it).tolist() for _ in range(5)]
    resumed = loader()
    resumed.load_state_dict(state)
    it = iter(resumed)
    assert [next(it).tolist() for _ in range(5)] == expected


@pytest.mark.slow
def test_scale_benchmark_smoke(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "sampler.py"
    proc = subprocess.run([sys.executable, str(script), "--smoke", "--out", str(tmp_path), "--scratch",
                           str(tmp_path / "scratch")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = (tmp_path / "sampler-smoke.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 6 and (tmp_path / "sampler-smoke.png").exists()
    assert "Wasted draws (issue's 3,000-sample seqlen curriculum, one epoch): 0 of 2992" in proc.stdout
