"""CurriculumSampler: admitted difficulty, rank sharding, pure function of n, exact resume."""

import numpy as np
import pytest

from lightning_dataeff.curriculum import CurriculumSampler, analyze

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


def test_never_above_current_difficulty(analysis):
    seqlen = np.asarray(analysis["seqlen"].sample_to_metric)
    s = CurriculumSampler(N, 4, seed=3, analysis=analysis, accumulate=2,
                          metrics={"seqlen": linear(4, 32, 20, difficulty_type="value")})
    sched = s.rules[0].schedule
    for n in range(60):
        ids = s.batch(n)
        step = s.step_of(n)
        assert step == n // 2
        assert len(set(ids)) == 4 and seqlen[ids].max() <= sched(step)
    assert s.pool(40) is None  # difficulty 32 admits everything: plain shuffle from then on


def test_uniform_over_admitted_pool(analysis):
    seqlen = np.asarray(analysis["seqlen"].sample_to_metric)
    s = CurriculumSampler(N, 4, analysis=analysis, metrics={"seqlen": linear(4, 32, 10**6)})
    pool = np.flatnonzero(seqlen <= 4)
    draws = np.concatenate([s.batch(n) for n in range(30 * len(pool) // 4)])  # 30 draws per admitted sample
    counts = np.bincount(draws, minlength=N)
    assert set(np.flatnonzero(counts)) == set(pool)
    chi2 = ((counts[pool] - 30) ** 2 / 30).sum()
    assert chi2 < len(pool) + 5 * np.sqrt(2 * len(pool))  # far inside the chi-square tail


def test_percentile_and_intersection(analysis):
    rarity = np.asarray(analysis["vocab_rarity"].sample_to_metric)
    seqlen = np.asarray(analysis["seqlen"].sample_to_metric)
    metrics = {"vocab_rarity": linear(10, 100, 10, 10, difficulty_type="percentile"),
               "seqlen": linear(16, 32, 10, 8, difficulty_type="value")}
    s = CurriculumSampler(N, 6, analysis=analysis, metrics=metrics)
    for n in range(12):
        d = s.difficulties(s.step_of(n))
        easiest = set(np.argsort(rarity, kind="stable")[: int(np.ceil(d["vocab_rarity"] * N / 100))].tolist())
        ids = s.batch(n)
        assert set(ids) <= easiest and seqlen[ids].max() <= d["seqlen"]
    single = CurriculumSampler(
        N, 6, analysis=analysis, metrics={"seqlen": linear(1, 32, 10, clustering_type="single_cluster")}
    )
    assert single.pool(0) is None and single.difficulties(0) == {"seqlen": 1}


@pytest.mark.parametrize("metrics", [None, {"seqlen": linear(8, 32, 30)}])
def test_ranks_disjoint_and_union_is_global_batch(analysis, metrics):
    replicas = [
        CurriculumSampler(N, 5, seed=7, analysis=analysis, metrics=metrics, num_replicas=3, rank=r) for r in range(3)
    ]
    assert len(replicas[0]) == N // 15
    for n in range(0, 40, 3):
        parts = [r.batch(n) for r in replicas]
        union = sum(parts, [])
        assert len(set(union)) == 15
        assert union == replicas[1].global_batch(n).tolist()


def test_plain_shuffle_is_a_permutation_per_epoch():
    s = CurriculumSampler(50, 4, seed=1)
    epochs = []
    for epoch in range(3):
        s.set_epoch(epoch)
        batches = list(s)
        assert len(batches) == len(s) == 12
        ids = sum(batches, [])
        assert len(set(ids)) == 48
        epochs.append(ids)
    assert epochs[0] != epochs[1] != epochs[2]
    assert sum(list(s), []) != epochs[2]  # a plain loop without set_epoch moves on by itself
    assert CurriculumSampler(50, 4, seed=2).batch(0) != s.batch(0)


@pytest.mark.parametrize("metrics", [None, {"seqlen": linear(4, 32, 25)}])
def test_interrupted_then_resumed_stream_identical(analysis, metrics):
    def make():
        return CurriculumSampler(N, 8, seed=5, analysis=analysis, metrics=metrics, accumulate=3)

    full = make()
    stream = []
    for epoch in range(3):
        full.set_epoch(epoch)
        stream += list(full)
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
    assert head + tail == stream
    # a pure function of n: any evaluation order (prefetching) gives the same batches
    assert [make().batch(n) for n in reversed(range(len(stream)))] == stream[::-1]


def test_step_of_matches_lightning_accumulation():
    s = CurriculumSampler(44, 4, accumulate=3)  # 11 micro-batches per epoch: 4 steps (last one short)
    assert [s.step_of(n) for n in range(13)] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 4, 4]
    s.epoch_length = 5  # e.g. limit_train_batches
    assert [s.step_of(n) for n in range(7)] == [0, 0, 0, 1, 1, 2, 2]


def test_small_pool_draws_with_replacement(analysis):
    seqlen = np.asarray(analysis["seqlen"].sample_to_metric)
    lo = int(seqlen.min())
    s = CurriculumSampler(N, 32, analysis=analysis, metrics={"seqlen": linear(lo, 32, 1000)})
    assert len(s.pool(0)) < 32
    with pytest.warns(UserWarning, match="with replacement"):
        ids = s.batch(0)
    assert len(ids) == 32 and seqlen[ids].max() <= lo


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
        (dict(metrics=[1]), "mapping"),
    ],
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
