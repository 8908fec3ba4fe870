"""Data analyzer: brute-force equality, fast readers byte-identical to the per-item path, resume after a
crash, shard jobs + merge, torchrun, integrity checks of the outputs, compression ratio."""

import json
import os
import shutil
import subprocess
import sys
import zlib

import datasets
import lightning.pytorch as L
import numpy as np
import pyarrow as pa
import pytest
import torch

from lightning_dataeff.curriculum import (
    AnalysisError,
    CurriculumSampler,
    FlatTokens,
    analyze,
    load_analysis,
    merge_analysis,
)
from lightning_dataeff.curriculum import analysis as analysis_format
from lightning_dataeff.curriculum.analysis import FORMAT_VERSION
from lightning_dataeff.curriculum.sources import token_source

N, VOCAB, MAXLEN = 700, 60, 24
BUILTINS = ["seqlen", "vocab_rarity", "seqlen_vocab_rarity", "compression_ratio"]


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


class Items:
    """A plain map-style dataset over a list: the per-item path, the reference for every fast reader."""

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def last_token(item):
    ids = item["input_ids"][item["attention_mask"].bool()]
    return int(ids[-1]) if len(ids) else -1


def mean_token(item):
    return float(item["input_ids"].float().mean())


METRICS = {**{m: m for m in BUILTINS}, "last_token": last_token, "mean_token": mean_token}


def compressed_fraction(data: bytes) -> float:
    return len(zlib.compress(data, 6, -15)) / len(data) if data else 0.0


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
        "compression_ratio": np.array([compressed_fraction(t.astype("<u4").tobytes()) for t in toks]),
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


def run(ds, out, metrics=BUILTINS, **kwargs):
    return analyze(ds, metrics, out, **{"num_workers": 0, "chunk_size": 128, "progress": False, **kwargs})


@pytest.fixture(scope="module")
def ds():
    return TokenDataset()


@pytest.fixture(scope="module")
def single(ds, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    run(ds, out, METRICS)
    return out


@pytest.mark.parametrize("name", sorted(METRICS))
def test_equals_brute_force(ds, single, name):
    expected = brute_force(ds)[name]
    a = load_analysis(single, ds)[name]
    values = np.asarray(a.sample_to_metric)
    if name in ("seqlen", "last_token"):
        assert values.dtype == np.int64 and np.array_equal(values, expected)
    else:
        assert values.dtype == np.float64 and np.allclose(values, expected, rtol=1e-12, atol=1e-12)
    assert isinstance(a.sample_to_metric, np.memmap)


def test_index_arrays(single):
    a = load_analysis(single)["vocab_rarity"]
    values, order = np.asarray(a.sample_to_metric), np.asarray(a.sorted_samples)
    assert np.array_equal(order, np.argsort(values, kind="stable"))
    assert np.array_equal(a.distinct_values, np.unique(values))
    for i, v in enumerate(a.distinct_values):  # offsets delimit each value's samples
        assert (values[order[a.distinct_offsets[i] : a.distinct_offsets[i + 1]]] == v).all()
    assert a.percentiles[100] == values.max() and a.percentiles[0] == values.min()
    assert a.percentiles[50] == np.sort(values)[int(np.ceil(N / 2)) - 1]
    assert a.num_admitted(50, "percentile") == 350 and a.num_admitted(100, "percentile") == N


def test_header(single):
    header = json.loads((single / "seqlen" / "header.json").read_text())
    assert (header["num_samples"], header["metric"], header["format_version"]) == (N, "seqlen", FORMAT_VERSION)
    spec = header["files"]["sorted_samples"]
    assert spec["bytes"] == os.path.getsize(single / "seqlen" / "sorted_samples.npy")
    assert (spec["dtype"], spec["shape"]) == ("<i8", [N])


def test_admission_by_value(ds, single):
    seqlen = load_analysis(single)["seqlen"]
    lengths = ds.lengths
    assert seqlen.num_admitted(10, "value") == (lengths <= 10).sum()
    assert set(seqlen.admitted(10).tolist()) == set(np.flatnonzero(lengths <= 10).tolist())


def test_file_count_independent_of_distinct_values(single):
    result = load_analysis(single)
    assert len(result["vocab_rarity"].distinct_values) > 300  # hundreds of distinct values...
    assert sorted(os.listdir(single)) == sorted(METRICS)  # ...and no _work left over
    for name in METRICS:  # ...still 6 files per metric
        assert len(os.listdir(single / name)) == 6


def test_pool_identical(ds, single, tmp_path):
    run(ds, tmp_path, METRICS, num_workers=2)
    assert files(tmp_path) == files(single)


def test_shard_jobs_merge_identical(ds, single, tmp_path):
    for shard in (2, 0, 1):
        assert run(ds, tmp_path, METRICS, shard_id=shard, num_shards=3) is None
    merge_analysis(tmp_path, ds, num_workers=0, progress=False)
    assert files(tmp_path) == files(single)


def test_merge_refuses_other_dataset(ds, tmp_path):
    run(ds, tmp_path, ["seqlen"], shard_id=0, num_shards=1)
    with pytest.raises(ValueError, match="not the one"):
        merge_analysis(tmp_path, TokenDataset(seed=1), num_workers=0, progress=False)


def test_missing_shard_refused(ds, tmp_path):
    run(ds, tmp_path, ["seqlen"], shard_id=0, num_shards=2)
    with pytest.raises(ValueError, match="chunks are missing.*shard"):
        merge_analysis(tmp_path, ds, progress=False)


CRASH = {"at": None, "calls": 0}


def crashing_metric(item):
    CRASH["calls"] += 1
    if CRASH["at"] is not None and CRASH["calls"] > CRASH["at"]:
        raise KeyboardInterrupt("killed")
    return int(item["input_ids"].sum())


@pytest.fixture(scope="module")
def crash_reference(ds, tmp_path_factory):
    out = tmp_path_factory.mktemp("fresh")
    CRASH.update(at=None, calls=0)
    run(ds, out, {"seqlen": "seqlen", "vocab_rarity": "vocab_rarity", "crashing_metric": crashing_metric})
    return out


@pytest.fixture
def killed(ds, tmp_path):
    """An analysis killed inside its third chunk."""
    CRASH.update(at=300, calls=0)
    with pytest.raises(KeyboardInterrupt):
        run(ds, tmp_path, {"seqlen": "seqlen", "vocab_rarity": "vocab_rarity", "crashing_metric": crashing_metric})
    CRASH.update(at=None, calls=0)
    return tmp_path


def test_killed_analysis_keeps_finished_chunks(killed):
    assert sorted(f for f in os.listdir(killed / "_work") if f.startswith("map")) == ["map-0000000.npz",
                                                                                     "map-0000001.npz"]


def test_killed_analysis_resumes_identically(ds, killed, crash_reference):
    run(ds, killed, {"seqlen": "seqlen", "vocab_rarity": "vocab_rarity", "crashing_metric": crashing_metric})
    assert CRASH["calls"] == N - 256  # finished chunks were not redone
    assert files(killed) == files(crash_reference)


def test_complete_analysis_just_loads(ds, crash_reference):
    CRASH.update(at=None, calls=0)
    run(ds, crash_reference, {"seqlen": "seqlen", "vocab_rarity": "vocab_rarity", "crashing_metric": crashing_metric})
    assert CRASH["calls"] == 0


def test_kill_during_final_write_leaves_no_temporary(ds, tmp_path, monkeypatch):
    fresh = tmp_path / "fresh"
    run(ds, fresh, ["seqlen", "vocab_rarity"])
    out = tmp_path / "killed"
    real, calls = analysis_format.save_atomic, []

    def dies_while_writing(path, arr):  # the third output array: temporary written, rename never happens
        calls.append(path)
        if len(calls) == 3:
            np.save(analysis_format.temporary_path(path, ".npy"), arr)
            raise KeyboardInterrupt("killed")
        real(path, arr)

    monkeypatch.setattr(analysis_format, "save_atomic", dies_while_writing)
    with pytest.raises(KeyboardInterrupt):
        run(ds, out, ["seqlen", "vocab_rarity"])
    assert any(".tmp" in name for name in files(out))
    monkeypatch.setattr(analysis_format, "save_atomic", real)
    run(ds, out, ["seqlen", "vocab_rarity"])
    assert files(out) == files(fresh)


@pytest.mark.parametrize(
    "dataset,kwargs,match",
    [
        (TokenDataset(seed=3), {}, "another dataset.*rerun analyze"),
        (TokenDataset(n=N - 1), {}, "another dataset"),
        (None, {"metrics": ["nope"]}, "no finished analysis"),
    ],
    ids=["other-tokens", "other-length", "unknown-metric"],
)
def test_load_refused(single, dataset, kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_analysis(single, dataset, **kwargs)


# ----------------------------------------------------------------------------------------------
# fast readers: byte-identical to the per-item path


def ragged(n=N, seed=0, pad=0):
    """Ragged token lists with some padding (mask 0) and a text per sample."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, MAXLEN + 1, n)
    ids = [np.minimum(rng.zipf(1.3, k), VOCAB - 1).tolist() for k in lengths]
    masks = [[1] * max(k - 2, 0) + [0] * min(k, 2) for k in lengths]  # the last two tokens are padding
    words = np.array(["the", "cat", "sat", "on", "a", "mat", "über", "naïve"])
    texts = [" ".join(words[rng.integers(0, len(words), k)]) for k in lengths]
    return {"input_ids": ids, "attention_mask": masks, "text": texts}


def arrow_table(columns, batch=100, ids_type=pa.list_(pa.int32())):
    types = {"input_ids": ids_type, "attention_mask": pa.list_(pa.int8()), "text": pa.string()}
    n = len(columns["input_ids"])
    batches = [pa.record_batch([pa.array(columns[k][a : a + batch], types[k]) for k in columns], names=list(columns))
               for a in range(0, n, batch)]
    return pa.Table.from_batches(batches)


def rows(columns):
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


def hf_from_file(tmp_path, columns):
    """A memory-mapped Hugging Face dataset in several record batches (as datasets.map writes them)."""
    path = str(tmp_path / "data.arrow")
    table = arrow_table(columns)
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        for b in table.to_batches():
            writer.write_batch(b)
    return datasets.Dataset.from_file(path)


def case_hf(tmp_path):
    cols = ragged()
    return datasets.Dataset.from_dict(cols), Items(rows(cols)), {}


def case_hf_torch(tmp_path):
    hf = datasets.Dataset.from_dict(ragged()).with_format("torch")
    return hf, Items([hf[i] for i in range(len(hf))]), {}


def case_hf_file(tmp_path):
    cols = ragged()
    return hf_from_file(tmp_path, cols), Items(rows(cols)), {}


def case_hf_shuffled(tmp_path):
    hf = datasets.Dataset.from_dict(ragged()).shuffle(seed=1).select(range(500))
    return hf, Items([hf[i] for i in range(len(hf))]), {}


def case_hf_ids_only(tmp_path):
    cols = ragged()
    hf = datasets.Dataset.from_dict(cols).with_format(None, columns=["input_ids"])
    return hf, Items([{"input_ids": x} for x in cols["input_ids"]]), {"pad_token_id": 1}


def case_table(tmp_path):
    cols = ragged()
    return arrow_table(cols), Items(rows(cols)), {}


def case_table_large_list(tmp_path):
    cols = ragged()
    del cols["attention_mask"], cols["text"]
    return arrow_table(cols, ids_type=pa.large_list(pa.int64())), Items(rows(cols)), {"pad_token_id": 3}


def case_table_fixed_size(tmp_path):
    padded = TokenDataset()
    ids = [(padded.ids[i] * (np.arange(MAXLEN) < padded.lengths[i])).tolist() for i in range(N)]
    table = arrow_table({"input_ids": ids}, ids_type=pa.list_(pa.int16(), MAXLEN))
    return table, Items([{"input_ids": x} for x in ids]), {"pad_token_id": 0}


def case_flat(tmp_path):
    cols = ragged()
    offsets = np.concatenate([[0], np.cumsum([len(x) for x in cols["input_ids"]])])
    mm = np.lib.format.open_memmap(str(tmp_path / "tokens.npy"), "w+", np.uint16, (int(offsets[-1]),))
    mm[:] = np.concatenate([np.asarray(x, np.uint16) for x in cols["input_ids"]])
    flat = FlatTokens(np.load(str(tmp_path / "tokens.npy"), mmap_mode="r"), offsets)
    return flat, Items([np.asarray(x, np.int64) for x in cols["input_ids"]]), {"pad_token_id": 2}


def case_array(tmp_path):
    padded = TokenDataset()
    arr = (padded.ids * (np.arange(MAXLEN) < padded.lengths[:, None])).astype(np.int32)
    return arr, Items(list(arr)), {"pad_token_id": 0}


def case_tensor(tmp_path):
    padded = TokenDataset()
    t = torch.from_numpy(padded.ids * (np.arange(MAXLEN) < padded.lengths[:, None]))
    return t, Items(list(t)), {"pad_token_id": 0}


FAST = {"hf": (case_hf, "arrow"), "hf-torch": (case_hf_torch, "arrow"), "hf-file": (case_hf_file, "arrow"),
        "hf-shuffled": (case_hf_shuffled, "arrow"), "hf-ids-only": (case_hf_ids_only, "arrow"),
        "table": (case_table, "arrow"), "table-large-list": (case_table_large_list, "arrow"),
        "table-fixed-size": (case_table_fixed_size, "arrow"), "flat-memmap": (case_flat, "flat"),
        "array": (case_array, "array"), "tensor": (case_tensor, "array")}


@pytest.mark.parametrize("case", sorted(FAST))
def test_fast_reader_chosen(case, tmp_path):
    fast, _, kwargs = FAST[case][0](tmp_path)
    assert token_source(fast, kwargs.get("pad_token_id")).kind == FAST[case][1]


@pytest.mark.parametrize("case", sorted(FAST))
def test_fast_reader_byte_identical(case, tmp_path):
    fast, items, kwargs = FAST[case][0](tmp_path)
    run(fast, tmp_path / "fast", chunk_size=64, **kwargs)
    run(items, tmp_path / "items", chunk_size=64, **kwargs)
    got, want = files(tmp_path / "fast"), files(tmp_path / "items")
    assert got == want and len(got) == 6 * len(BUILTINS)


def test_fast_reader_user_metric_sees_items(tmp_path):
    cols = ragged()
    res = run(datasets.Dataset.from_dict(cols), tmp_path, {"words": lambda item: len(item["text"].split())})
    assert res["words"].sample_to_metric.tolist() == [len(t.split()) for t in cols["text"]]


def test_hf_transform_read_item_by_item():
    hf = datasets.Dataset.from_dict(ragged(n=8))
    hf.set_transform(lambda batch: {"input_ids": [x[:1] for x in batch["input_ids"]]})
    assert token_source(hf).kind == "items"


def test_load_with_fast_dataset(tmp_path):
    """The fingerprint is the same whichever reader computes it: a fast dataset loads a per-item analysis."""
    cols = ragged()
    run(Items(rows(cols)), tmp_path, ["seqlen"])
    assert len(load_analysis(tmp_path, datasets.Dataset.from_dict(cols))["seqlen"].sample_to_metric) == N


@pytest.mark.parametrize(
    "table,match",
    [
        (pa.table({"input_ids": pa.array([[1, 2], None], pa.list_(pa.int32()))}), "1-D"),
        (pa.table({"input_ids": pa.array([[1, 2], [3]], pa.list_(pa.int32())),
                   "attention_mask": pa.array([[1, 1], [1, 1]], pa.list_(pa.int8()))}), "attention_mask shape"),
    ],
    ids=["null-row", "mask-length"],
)
def test_arrow_block_it_cannot_read_fails_like_items(table, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        run(table, tmp_path, ["seqlen"])


# ----------------------------------------------------------------------------------------------
# compression ratio


def test_compression_ratio_of_text(tmp_path):
    texts = ["a" * 200, "the quick brown fox jumps over the lazy dog", ""]
    res = run([{"input_ids": [1, 2], "text": t} for t in texts], tmp_path, ["compression_ratio"])
    assert res["compression_ratio"].sample_to_metric.tolist() == [compressed_fraction(t.encode()) for t in texts]


def test_compression_ratio_of_tokens(tmp_path):
    lists = [[5] * 100, list(range(100)), []]
    res = run(lists, tmp_path, ["compression_ratio"])
    expected = [compressed_fraction(np.asarray(x, "<u4").tobytes()) for x in lists]
    assert res["compression_ratio"].sample_to_metric.tolist() == expected


def test_compression_ratio_refuses_ids_beyond_uint32(tmp_path):
    flat = FlatTokens(np.array([1, 2**33], np.int64), [0, 1, 2])
    with pytest.raises(ValueError, match=r"compression_ratio: token ids of samples 0\.\.1 must be in \[0, 2\*\*32\)"):
        run(flat, tmp_path, ["compression_ratio"])


def test_compression_ratio_refuses_non_str_text(tmp_path):
    with pytest.raises(ValueError, match="sample 1 has a 'text' entry of type int"):
        run([{"input_ids": [1], "text": "ok"}, {"input_ids": [1], "text": 3}], tmp_path, ["compression_ratio"])


def test_compression_ratio_drives_the_sampler(tmp_path):
    cols = ragged()
    res = run(datasets.Dataset.from_dict(cols), tmp_path, ["compression_ratio"])
    ratio = np.asarray(res["compression_ratio"].sample_to_metric)
    rule = {"difficulty_type": "percentile", "min_difficulty": 10, "max_difficulty": 100,
            "schedule_type": "fixed_linear", "schedule_config": {"total_curriculum_step": 100, "difficulty_step": 1}}
    sampler = CurriculumSampler(N, 8, analysis=res, metrics={"compression_ratio": rule})
    easiest = set(np.argsort(ratio, kind="stable")[: int(np.ceil(0.1 * N))].tolist())
    assert set(sampler.batch(0)) <= easiest


# ----------------------------------------------------------------------------------------------
# integrity of the outputs


@pytest.fixture
def copy(single, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(single, out)
    return out


def zero_data(path):
    arr = np.load(path, mmap_mode="r+")
    arr[:] = 0
    arr.flush()


def swap_values(path):
    arr = np.load(path, mmap_mode="r+")
    i, j = int(np.argmin(arr)), int(np.argmax(arr))
    arr[i], arr[j] = arr[j], arr[i]
    arr.flush()


def truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def decreasing_offsets(path):
    arr = np.load(path, mmap_mode="r+")
    arr[1], arr[2] = arr[2], arr[1]
    arr.flush()


def old_format(path):
    h = json.loads(open(path).read())
    json.dump({**h, "format_version": 1}, open(path, "w"))


def flip_header_padding(path):
    """A byte of the .npy header's padding changed: the array still reads the same; only the checksum sees it."""
    data = bytearray(open(path, "rb").read())
    data[data.index(b"}") + 1] = ord("\t")
    open(path, "wb").write(bytes(data))


DAMAGE = {
    "zeroed-sorted": ("sorted_samples.npy", zero_data, True, "sha256"),
    "zeroed-sorted-no-checksums": ("sorted_samples.npy", zero_data, False, "lists a sample twice"),
    "swapped-values": ("sample_to_metric.npy", swap_values, False, "disagrees with sorted_samples"),
    "truncated-npy": ("sample_to_metric.npy", truncate, True, "bytes, header.json says"),
    "truncated-header": ("header.json", truncate, True, "not valid JSON"),
    "deleted": ("distinct_values.npy", os.remove, True, "is missing"),
    "decreasing-offsets": ("distinct_offsets.npy", decreasing_offsets, False, "increase strictly"),
    "old-format": ("header.json", old_format, True, "format_version 1; this version reads"),
    "header-padding": ("percentiles.npy", flip_header_padding, True, "sha256"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damage_refused_naming_the_file(copy, case):
    name, damage, checksums, match = DAMAGE[case]
    path = copy / "vocab_rarity" / name
    damage(path)
    with pytest.raises(AnalysisError, match=match) as info:
        load_analysis(copy, metrics=["vocab_rarity"], checksums=checksums)
    message = str(info.value)
    assert message.startswith(str(path) + ":") and message.endswith("rerun analyze() to rewrite the analysis")
    assert "\n" not in message


def test_checksums_opt_out(copy):
    flip_header_padding(copy / "vocab_rarity" / "percentiles.npy")
    a = load_analysis(copy, metrics=["vocab_rarity"], checksums=False)["vocab_rarity"]
    assert a.percentiles[100] == np.max(a.sample_to_metric)


class _Recorder(L.LightningModule):
    """Records the input_ids of each training batch."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.batches = []

    def training_step(self, batch, batch_idx):
        self.batches.append(batch["input_ids"])
        return self.w * batch["input_ids"].float().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit_percentile_curriculum(ds, analysis_dir, checksums):
    from tiny_models import trainer

    from lightning_dataeff.callbacks import CurriculumLearning
    from lightning_dataeff.curriculum import CurriculumDataLoader, CurriculumSampler

    rule = {"difficulty_type": "percentile", "clustering_type": "schedule_based", "min_difficulty": 1,
            "max_difficulty": 100, "schedule_type": "fixed_linear",
            "schedule_config": {"total_curriculum_step": 4, "difficulty_step": 1}}
    cb = CurriculumLearning({"vocab_rarity": rule}, analysis_dir=analysis_dir, checksums=checksums)
    model = _Recorder()
    loader = CurriculumDataLoader(ds, batch_sampler=CurriculumSampler(len(ds), 4))
    trainer(max_steps=1, callbacks=[cb], use_distributed_sampler=False).fit(model, loader)
    return model.batches


def test_curriculum_callback_refuses_a_damaged_analysis(ds, copy):
    flip_header_padding(copy / "vocab_rarity" / "percentiles.npy")
    with pytest.raises(AnalysisError, match="sha256"):
        _fit_percentile_curriculum(ds, copy, checksums=True)


def test_curriculum_callback_checksums_opt_out(ds, copy):
    flip_header_padding(copy / "vocab_rarity" / "percentiles.npy")
    (batch,) = _fit_percentile_curriculum(ds, copy, checksums=False)
    values = load_analysis(copy, metrics=["vocab_rarity"], checksums=False)["vocab_rarity"].sample_to_metric
    easiest = np.lexsort((np.arange(len(ds)), np.asarray(values)))[: -(-len(ds) // 100)]  # percentile 1
    admitted = {tuple(ds[int(i)]["input_ids"].tolist()) for i in easiest}
    assert len(batch) == 4 and all(tuple(row.tolist()) in admitted for row in batch)


def test_damaged_analysis_recomputed_by_rerun(ds, single, copy):
    zero_data(copy / "seqlen" / "sorted_samples.npy")
    with pytest.warns(UserWarning, match="sorted_samples.npy is damaged; recomputing"):
        run(ds, copy, METRICS)
    assert files(copy) == files(single)


# ----------------------------------------------------------------------------------------------
# torchrun


def torchrun(out, mode, script="analyze_ddp.py"):
    """``tests/scripts/<script> OUT MODE`` on 2 local ranks; the process and the ``rank<r>.json`` files written."""
    script = os.path.join(os.path.dirname(__file__), "scripts", script)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script, str(out),
           mode]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**env, "PYTHONWARNINGS": "ignore"})
    return proc, {r: json.load(open(p)) for r, p in ((r, out / f"rank{r}.json") for r in range(2)) if p.exists()}


@pytest.mark.slow
def test_torchrun_two_ranks_identical_to_one_process(tmp_path):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "scripts"))
    try:
        import analyze_ddp
    finally:
        sys.path.pop(0)
    proc, reports = torchrun(tmp_path / "ddp", "shared")
    assert proc.returncode == 0, proc.stderr[-3000:]
    analyze(analyze_ddp.dataset(), analyze_ddp.METRICS, tmp_path / "one", num_workers=0,
            chunk_size=analyze_ddp.CHUNK, progress=False, distributed=False)
    assert files(tmp_path / "ddp" / "analysis") == files(tmp_path / "one")
    assert reports[0]["seqlen_sum"] == reports[1]["seqlen_sum"] > 0  # every rank got the analysis back
    assert [reports[r]["chunks"] for r in range(2)] == [[0, 2, 4], [1, 3, 5]]  # each rank read its own shard only


@pytest.mark.slow
def test_torchrun_without_shared_filesystem_refused(tmp_path):
    proc, reports = torchrun(tmp_path, "unshared")
    assert proc.returncode != 0
    assert "is not shared by all ranks" in reports[0]["error"]
    assert "rank 0 failed" in reports[1]["error"] and "is not shared by all ranks" in reports[1]["error"]


def prepare_data_fit(out, mode):
    proc, reports = torchrun(out, mode, "analyze_prepare_data.py")
    return proc, reports[0]


@pytest.mark.slow
def test_torchrun_prepare_data_fails_within_join_timeout(tmp_path):
    proc, report = prepare_data_fit(tmp_path, "auto")
    assert proc.returncode != 0
    assert "waited 5 s (join_timeout) for all 2 ranks" in report["error"]
    assert "pass distributed=False" in report["error"]
    assert 4.5 <= report["seconds"] < 60  # failed at the join timeout, not later


@pytest.mark.slow
def test_torchrun_prepare_data_with_distributed_false_fits(tmp_path):
    proc, report = prepare_data_fit(tmp_path, "local")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert report == {"samples": 32}


# ----------------------------------------------------------------------------------------------
# item forms, progress, errors


def test_lists_with_padding(tmp_path):
    res = run([[5, 6, 7, 0, 0], [1, 0, 0, 0, 0], [9, 9, 9, 9, 9]], tmp_path, ["seqlen"], pad_token_id=0)
    assert res["seqlen"].sample_to_metric.tolist() == [3, 1, 5]


def test_tensors_without_padding(tmp_path):
    res = run([torch.tensor([5, 6, 7, 0, 0]), torch.tensor([1, 0, 0, 0, 0])], tmp_path, ["seqlen"])
    assert res["seqlen"].sample_to_metric.tolist() == [5, 5]


def test_given_vocab_counts(tmp_path):
    counts = [90, 1, 0, 0, 0, 2, 2, 2, 0, 3]
    res = run([[5, 6, 7, 0, 0], [1, 0, 0, 0, 0], [9, 9, 9, 9, 9]], tmp_path, ["vocab_rarity"], vocab_counts=counts)
    nl = np.log(100) - np.log(np.maximum(counts, 1))
    expected = [nl[[5, 6, 7, 0, 0]].sum(), nl[[1, 0, 0, 0, 0]].sum(), 5 * nl[9]]
    assert np.allclose(res["vocab_rarity"].sample_to_metric, expected)


def test_token_ids_beyond_uint16(tmp_path):
    res = run([[70000, 1, 1], [1]], tmp_path, ["vocab_rarity"])
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
    run(ds, tmp_path, METRICS)
    assert ds.calls > 0 and files(tmp_path) == files(single)


@pytest.mark.parametrize("bad,match", [({"input_ids": torch.zeros(3, 4)}, "dict"), ([[1]], "of length 1")])
def test_getitems_bad_result(bad, match, tmp_path):
    with pytest.raises(TypeError, match=match):
        run(BatchedDataset(bad), tmp_path, ["seqlen"])


def test_progress_says_where_the_outputs_are(tmp_path, capsys):
    analyze([[1, 2], [3]], ["seqlen"], tmp_path / "out", num_workers=0, progress=True)
    err = capsys.readouterr().err
    assert "analyze (map)" in err and "analyze (write)" in err
    assert f"written to {tmp_path / 'out'}" in err


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
        (dict(distributed="yes"), "distributed must be"),
        (dict(distributed=True), "distributed=True needs"),
        (dict(join_timeout=0), "join_timeout must be a positive number"),
        (dict(join_timeout=True), "join_timeout must be a positive number"),
    ],
)
def test_bad_arguments(kwargs, match, tmp_path):
    kwargs = {"metrics": ["seqlen"], "num_workers": 0, "progress": False, **kwargs}
    with pytest.raises(ValueError, match=match):
        analyze([[1, 2], [3]], output_dir=tmp_path, **kwargs)


def test_shard_job_under_torchrun_refused(tmp_path, monkeypatch):
    for k, v in {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match="ranks are the shards; pass distributed=False"):
        analyze([[1]], ["seqlen"], tmp_path, num_workers=0, shard_id=0, num_shards=2, progress=False)


def test_single_rank_world_runs_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert run([[1, 2]], tmp_path, ["seqlen"])["seqlen"].sample_to_metric.tolist() == [2]


@pytest.mark.parametrize(
    "dataset,metrics,error,match",
    [
        ([], ["seqlen"], ValueError, "empty"),
        ([torch.ones(2, 3, dtype=torch.long)], ["seqlen"], ValueError, "1-D"),
        ([{"ids": [1]}], ["seqlen"], ValueError, "input_ids"),
        ([[1, 2], [3, -4]], ["vocab_rarity"], ValueError, r"negative token id in samples 0\.\.1"),
        (FlatTokens(np.array([1, -4]), [0, 1, 2]), ["vocab_rarity"], ValueError,
         r"negative token id in samples 0\.\.1"),
        (iter([[1]]), ["seqlen"], TypeError, "map-style"),
    ],
    ids=["empty", "2-D item", "no input_ids", "negative id", "negative id (fast path)", "iterator"],
)
def test_bad_datasets(dataset, metrics, error, match, tmp_path):
    with pytest.raises(error, match=match):
        run(dataset, tmp_path, metrics)


@pytest.mark.parametrize(
    "tokens,offsets,match",
    [
        (np.zeros((2, 2), np.int32), [0, 1], "tokens must be a 1-D integer array"),
        (np.zeros(3, np.float32), [0, 1], "tokens must be a 1-D integer array"),
        (np.zeros(3, np.int32), [], "offsets must be a non-empty"),
        (np.zeros(3, np.int32), [0, 2, 1], r"offsets\[2\] = 1 < offsets\[1\] = 2"),
        (np.zeros(3, np.int32), [0, 4], r"within \[0, len\(tokens\)=3\]"),
    ],
    ids=["2-D", "float", "no offsets", "decreasing", "beyond the tokens"],
)
def test_flat_tokens_bad_input(tokens, offsets, match):
    with pytest.raises(ValueError, match=match):
        FlatTokens(tokens, offsets)


def test_other_settings_in_progress_refused(tmp_path):
    os.makedirs(tmp_path / "_work")
    json.dump({"num_samples": 5}, open(tmp_path / "_work" / "meta.json", "w"))
    with pytest.raises(ValueError, match="unfinished analysis with other settings"):
        run([[1, 2]], tmp_path, ["seqlen"])


def test_overwrite_discards_other_settings(tmp_path):
    os.makedirs(tmp_path / "_work")
    json.dump({"num_samples": 5}, open(tmp_path / "_work" / "meta.json", "w"))
    assert run([[1, 2]], tmp_path, ["seqlen"], overwrite=True)["seqlen"].sample_to_metric.tolist() == [2]
