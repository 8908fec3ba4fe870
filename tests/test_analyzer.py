"""Data analyzer: brute-force equality, formats, resume after a crash, shard jobs + merge."""

import json
import os

import numpy as np
import pytest
import torch

from lightning_dataeff.curriculum import analyze, load_analysis, merge_analysis

N, VOCAB, MAXLEN = 700, 60, 24


class TokenDataset(torch.utils.data.Dataset):
    """Padded dict items (id 0 = padding) with Zipf-like token ids."""

    def __init__(self, n=N, seed=0):
        rng = np.random.default_rng(seed)
        self.lengths = rng.integers(0, MAXLEN + 1, n)
        self.ids = np.minimum(rng.zipf(1.3, (n, MAXLEN)), VOCAB - 1)

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, i):
        mask = (np.arange(MAXLEN) < self.lengths[i]).astype(np.int64)
        return {"input_ids": torch.from_numpy(self.ids[i] * mask), "attention_mask": torch.from_numpy(mask)}


def last_token(item):
    ids = item["input_ids"][item["attention_mask"].bool()]
    return int(ids[-1]) if len(ids) else -1


def mean_token(item):
    return float(item["input_ids"].float().mean())


METRICS = {"seqlen": "seqlen", "vocab_rarity": "vocab_rarity", "seqlen_vocab_rarity": "seqlen_vocab_rarity",
           "last_token": last_token, "mean_token": mean_token}


def brute_force(ds):
    toks = [ds.ids[i][: ds.lengths[i]] for i in range(len(ds))]
    counts = np.bincount(np.concatenate(toks))
    p = counts / counts.sum()
    rarity = np.array([sum(-np.log(p[t]) for t in tok) for tok in toks])
    seqlen = np.array([len(t) for t in toks])
    return {
        "seqlen": seqlen,
        "vocab_rarity": rarity,
        "seqlen_vocab_rarity": seqlen + rarity / (1 + rarity.max()),
        "last_token": np.array([last_token(ds[i]) for i in range(len(ds))]),
        "mean_token": np.array([mean_token(ds[i]) for i in range(len(ds))]),
    }


def files(path):
    out = {}
    for root, _, names in os.walk(path):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                out[os.path.relpath(os.path.join(root, name), path)] = f.read()
    return out


@pytest.fixture(scope="module")
def ds():
    return TokenDataset()


@pytest.fixture(scope="module")
def single(ds, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    analyze(ds, METRICS, out, num_workers=0, chunk_size=128, progress=False)
    return out


def test_equals_brute_force(ds, single):
    ref = brute_force(ds)
    result = load_analysis(single, ds)
    assert sorted(result) == sorted(METRICS)
    for name, a in result.items():
        values = np.asarray(a.sample_to_metric)
        if name in ("seqlen", "last_token"):
            assert values.dtype == np.int64 and np.array_equal(values, ref[name]), name
        else:
            assert values.dtype == np.float64 and np.allclose(values, ref[name], rtol=1e-12, atol=1e-12), name
        order = np.asarray(a.sorted_samples)
        assert np.array_equal(order, np.argsort(values, kind="stable"))
        assert np.array_equal(a.distinct_values, np.unique(values))
        for i, v in enumerate(a.distinct_values):  # offsets delimit each value's samples
            assert (values[order[a.distinct_offsets[i]:a.distinct_offsets[i + 1]]] == v).all()
        assert a.percentiles[100] == values.max() and a.percentiles[0] == values.min()
        assert a.percentiles[50] == np.sort(values)[int(np.ceil(N / 2)) - 1]
        assert a.num_admitted(50, "percentile") == 350 and a.num_admitted(100, "percentile") == N
        header = json.loads(open(os.path.join(single, name, "header.json")).read())
        assert header["num_samples"] == N and header["metric"] == name and header["format_version"] == 1
    seqlen = result["seqlen"]
    assert seqlen.num_admitted(10, "value") == (ref["seqlen"] <= 10).sum()
    assert set(seqlen.admitted(10).tolist()) == set(np.flatnonzero(ref["seqlen"] <= 10).tolist())
    assert isinstance(seqlen.sample_to_metric, np.memmap)


def test_file_count_independent_of_distinct_values(ds, single):
    result = load_analysis(single)
    assert len(result["vocab_rarity"].distinct_values) > 300  # hundreds of distinct values...
    assert sorted(os.listdir(single)) == sorted(METRICS)  # ...and no _work left over
    for name in METRICS:  # ...still 6 files per metric
        assert len(os.listdir(os.path.join(single, name))) == 6


def test_pool_and_shard_jobs_merge_identical(ds, single, tmp_path):
    pooled = tmp_path / "pooled"
    analyze(ds, METRICS, pooled, num_workers=2, chunk_size=128, progress=False)
    assert files(pooled) == files(single)
    sharded = tmp_path / "sharded"
    for shard in (2, 0, 1):
        assert analyze(ds, METRICS, sharded, num_workers=0, chunk_size=128, shard_id=shard, num_shards=3,
                       progress=False) is None
    with pytest.raises(ValueError, match="other dataset|not the one"):
        merge_analysis(sharded, TokenDataset(seed=1), num_workers=0, progress=False)
    merge_analysis(sharded, ds, num_workers=0, progress=False)
    assert files(sharded) == files(single)


def test_missing_shard_refused(ds, tmp_path):
    analyze(ds, ["seqlen"], tmp_path, num_workers=0, chunk_size=128, shard_id=0, num_shards=2, progress=False)
    with pytest.raises(ValueError, match="chunks are missing.*shard"):
        merge_analysis(tmp_path, ds, progress=False)


CRASH = {"at": None, "calls": 0}


def crashing_metric(item):
    CRASH["calls"] += 1
    if CRASH["at"] is not None and CRASH["calls"] > CRASH["at"]:
        raise KeyboardInterrupt("killed")
    return int(item["input_ids"].sum())


def test_killed_analysis_resumes_identically(ds, tmp_path):
    metrics = {"seqlen": "seqlen", "vocab_rarity": "vocab_rarity", "crashing_metric": crashing_metric}
    fresh = tmp_path / "fresh"
    CRASH.update(at=None, calls=0)
    analyze(ds, metrics, fresh, num_workers=0, chunk_size=128, progress=False)
    resumed = tmp_path / "resumed"
    CRASH.update(at=300, calls=0)  # dies inside the third chunk
    with pytest.raises(KeyboardInterrupt):
        analyze(ds, metrics, resumed, num_workers=0, chunk_size=128, progress=False)
    maps = sorted(f for f in os.listdir(resumed / "_work") if f.startswith("map"))
    assert maps == ["map-0000000.npz", "map-0000001.npz"]
    CRASH.update(at=None, calls=0)
    analyze(ds, metrics, resumed, num_workers=0, chunk_size=128, progress=False)
    assert CRASH["calls"] == N - 256  # finished chunks were not redone
    assert files(resumed) == files(fresh)
    CRASH.update(calls=0)
    analyze(ds, metrics, resumed, num_workers=0, chunk_size=128, progress=False)  # complete: just loads
    assert CRASH["calls"] == 0


def test_header_mismatch_refused(ds, single):
    with pytest.raises(ValueError, match="another dataset.*rerun analyze"):
        load_analysis(single, TokenDataset(seed=3))
    with pytest.raises(ValueError, match="another dataset"):
        load_analysis(single, TokenDataset(n=N - 1))
    with pytest.raises(ValueError, match="no finished analysis"):
        load_analysis(single, metrics=["nope"])
    header = os.path.join(single, "seqlen", "header.json")
    h = json.load(open(header))
    try:
        json.dump({**h, "format_version": 99}, open(header, "w"))
        with pytest.raises(ValueError, match="format_version"):
            load_analysis(single, metrics=["seqlen"])
    finally:
        json.dump(h, open(header, "w"))


def test_item_forms_and_padding(tmp_path):
    lists = [[5, 6, 7, 0, 0], [1, 0, 0, 0, 0], [9, 9, 9, 9, 9]]
    res = analyze(lists, ["seqlen", "vocab_rarity"], tmp_path / "a", num_workers=0, pad_token_id=0, progress=False)
    assert res["seqlen"].sample_to_metric.tolist() == [3, 1, 5]
    res = analyze([torch.tensor(x) for x in lists], ["seqlen"], tmp_path / "b", num_workers=0, progress=False)
    assert res["seqlen"].sample_to_metric.tolist() == [5, 5, 5]
    res = analyze(
        lists,
        ["vocab_rarity"],
        tmp_path / "c",
        num_workers=0,
        vocab_counts=[90, 1, 0, 0, 0, 2, 2, 2, 0, 3],
        progress=False,
    )
    nl = np.log(100) - np.log(np.maximum([90, 1, 0, 0, 0, 2, 2, 2, 0, 3], 1))
    assert np.allclose(
        res["vocab_rarity"].sample_to_metric, [nl[[5, 6, 7, 0, 0]].sum(), nl[[1, 0, 0, 0, 0]].sum(), 5 * nl[9]]
    )
    res = analyze([[70000, 1, 1], [1]], ["vocab_rarity"], tmp_path / "d", num_workers=0, progress=False)  # > uint16
    assert np.allclose(res["vocab_rarity"].sample_to_metric, [np.log(4) + 2 * np.log(4 / 3), np.log(4 / 3)])


class BatchedDataset(TokenDataset):
    """Same items, also fetched in batches through ``__getitems__`` (as torch / Hugging Face datasets)."""

    def __init__(self, result=None):
        super().__init__()
        self.calls, self.result = 0, result

    def __getitems__(self, indices):
        self.calls += 1
        return [self[i] for i in indices] if self.result is None else self.result


def test_getitems_batched_access(single, tmp_path):
    ds = BatchedDataset()
    analyze(ds, METRICS, tmp_path / "b", num_workers=0, chunk_size=128, progress=False)
    assert ds.calls > 0
    got, want = files(tmp_path / "b"), files(single)  # headers compared as JSON (another test rewrites them)
    assert got.keys() == want.keys()
    for k in got:
        assert json.loads(got[k]) == json.loads(want[k]) if k.endswith(".json") else got[k] == want[k], k
    for bad, match in [({"input_ids": torch.zeros(3, 4)}, "dict"), ([[1]], "of length 1")]:
        with pytest.raises(TypeError, match=match):
            analyze(BatchedDataset(bad), ["seqlen"], tmp_path / "x", num_workers=0, overwrite=True, progress=False)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(metrics=["perplexity"]), "unknown metric"),
        (dict(metrics={"_x": "seqlen"}), "not allowed"),
        (dict(metrics=[3]), "callables"),
        (dict(metrics={"bad": lambda item: "hard"}), "expected an int or a float"),
        (dict(metrics={"nan": lambda item: float("nan")}), "finite"),
        (dict(num_workers=-1), "num_workers"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(shard_id=3, num_shards=2), "shard_id"),
        (dict(vocab_counts=[[1]]), "vocab_counts"),
        (dict(metrics=["vocab_rarity"], vocab_counts=[1, 1]), "outside vocab_counts"),
    ],
)
def test_bad_arguments(kwargs, match, tmp_path):
    kwargs = {"metrics": ["seqlen"], "num_workers": 0, "progress": False, **kwargs}
    with pytest.raises(ValueError, match=match):
        analyze([[1, 2], [3]], output_dir=tmp_path, **kwargs)


def test_bad_datasets(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        analyze([], output_dir=tmp_path, num_workers=0)
    with pytest.raises(ValueError, match="1-D"):
        analyze([torch.ones(2, 3, dtype=torch.long)], output_dir=tmp_path, num_workers=0)
    with pytest.raises(ValueError, match="input_ids"):
        analyze([{"ids": [1]}], output_dir=tmp_path, num_workers=0)
    with pytest.raises(ValueError, match=r"negative token id in samples 0\.\.1"):
        analyze([[1, 2], [3, -4]], ["vocab_rarity"], tmp_path / "neg", num_workers=0, progress=False)
    with pytest.raises(TypeError, match="map-style"):
        analyze(iter([[1]]), output_dir=tmp_path, num_workers=0)
    analyze([[1, 2]], ["seqlen"], tmp_path / "x", num_workers=0, progress=False, chunk_size=1)
    os.makedirs(tmp_path / "y" / "_work")
    json.dump({"num_samples": 5}, open(tmp_path / "y" / "_work" / "meta.json", "w"))
    with pytest.raises(ValueError, match="unfinished analysis with other settings"):
        analyze([[1, 2]], ["seqlen"], tmp_path / "y", num_workers=0, progress=False)
    analyze([[1, 2]], ["seqlen"], tmp_path / "y", num_workers=0, progress=False, overwrite=True)
