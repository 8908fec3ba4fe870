"""Small datamodules for the recipes: text for causal LMs, images for classifiers.

Sources: the stdlib's ``pydoc_data.topics`` prose, the standard library's own source code
(``stdlib_source``, split by file) and scikit-learn's ``digits`` (offline), a local path, or
``hf:<name>[:<config>]`` through Hugging Face ``datasets``. Every train loader uses a
:class:`~lightning_dataeff.curriculum.CurriculumSampler` as its batch sampler, so the data order is a
function of the step and a run resumes exactly, mid-epoch included.
"""

from __future__ import annotations

import hashlib
import os
import random
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_dataeff.recipes.config import HubUnavailableError, RecipeError, _one_line

__all__ = [
    "TextDataModule",
    "ImageDataModule",
    "cache_root",
    "hub_call",
    "hub_error",
    "OFFLINE_RECIPES",
    "IMAGE_SUFFIXES",
    "image_files",
    "text_files",
]

#: Data sources built into the package (no path, no Hub), per task.
BUILTIN_SOURCES = {"causal_lm": ("pydoc_topics", "stdlib_source"), "image_classification": ("digits",)}
OFFLINE_RECIPES = {"causal_lm": "recipes/gpt2-tiny.yaml", "image_classification": "recipes/vit-tiny.yaml"}
_EOS = "<|endoftext|>"
_SPLIT_SEED = 0  # the train/validation split never depends on the run's seed


def cache_root(cache_dir: str | None = None) -> Path:
    """``cache_dir``, else ``$LIGHTNING_DATAEFF_CACHE``, else ``~/.cache/lightning_dataeff``."""
    root = cache_dir or os.environ.get("LIGHTNING_DATAEFF_CACHE") or Path.home() / ".cache" / "lightning_dataeff"
    return Path(root).expanduser()


def hub_call(what: str, fn: Callable[[], Any], offline_recipe: str) -> Any:
    """Run a Hub download; any failure becomes a :class:`HubUnavailableError` that names the offline recipe."""
    try:
        return fn()
    except Exception as exc:  # network errors differ across datasets/huggingface_hub versions
        raise hub_error(what, exc, offline_recipe) from None


def hub_error(what: str, exc: Exception, offline_recipe: str) -> HubUnavailableError:
    """The :class:`HubUnavailableError` for a failed Hub download of ``what`` (missing packages or no access)."""
    if isinstance(exc, ImportError):
        return HubUnavailableError(
            f"loading {what} needs the Hugging Face packages ({exc.name or exc}); "
            f"install them with pip install 'lightning-dataeff[hf]', or use the offline recipe {offline_recipe}"
        )
    first = _one_line(exc)[:200]
    return HubUnavailableError(
        f"could not load {what} from the Hugging Face Hub ({type(exc).__name__}: {first}); this recipe needs "
        f"internet access (nothing is substituted), for an offline run use {offline_recipe}"
    )


def _parse_hf(source: str) -> tuple[str, str | None]:
    name, _, config = source[len("hf:"):].partition(":")
    if not name:
        raise RecipeError("invalid value for 'data.source': expected hf:<dataset>[:<config>]")
    return name, config or None


def _load_hf_dataset(source: str, task: str) -> Any:
    name, config = _parse_hf(source)

    def load() -> Any:
        import datasets

        return datasets.load_dataset(name, config)

    return hub_call(f"dataset {name!r}", load, OFFLINE_RECIPES[task])


def _split_indices(n: int, val_fraction: float) -> tuple[list[int], list[int]]:
    order = list(range(n))
    random.Random(_SPLIT_SEED).shuffle(order)
    n_val = max(1, round(n * val_fraction))
    return sorted(order[n_val:]), sorted(order[:n_val])


def _train_loader(dataset: Dataset, batch_size: int, seed: int, num_workers: int) -> DataLoader:
    from lightning_dataeff.curriculum import CurriculumDataLoader, CurriculumSampler

    if len(dataset) < batch_size:
        raise RecipeError(
            f"invalid value for 'data.batch_size': {batch_size} is larger than the training set "
            f"({len(dataset)} samples)"
        )
    sampler = CurriculumSampler(len(dataset), batch_size, seed=seed)
    # stateful: Lightning checkpoints its position, so a run resumes mid-epoch exactly and without warning
    return CurriculumDataLoader(dataset, batch_sampler=sampler, num_workers=num_workers)


# ----------------------------------------------------------------------------------------------- text


class TokenBlocks(Dataset):
    """Fixed-length blocks of token ids: item ``i`` is ``{"input_ids": LongTensor[seq_len]}``."""

    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i]}


def _join_lines(lines: Sequence[str]) -> str:
    """One running text from a line-per-row corpus (WikiText rows keep their newline, PTB rows do not)."""
    return "".join(line if line.endswith("\n") else line + "\n" for line in lines)


def _read_text_source(
    source: str, text_field: str, skip_bad_files: bool = False
) -> tuple[list[str], list[str] | None]:
    """Documents for training and, when the source has one, its own validation split."""
    if source == "pydoc_topics":
        from pydoc_data.topics import topics

        return [topics[k] for k in sorted(topics)], None
    if source == "stdlib_source":
        return _read_text_files(stdlib_source_files(), source, skip_bad_files), None
    if source.startswith("hf:"):
        ds = _load_hf_dataset(source, "causal_lm")
        if text_field not in ds["train"].column_names:
            raise RecipeError(
                f"invalid value for 'data.text_field': {text_field!r} is not a column of {source} "
                f"(columns: {', '.join(ds['train'].column_names)})"
            )
        val_split = next((s for s in ("validation", "valid", "test") if s in ds), None)
        val = [_join_lines(ds[val_split][text_field])] if val_split else None
        return [_join_lines(ds["train"][text_field])], val
    return _read_text_files(text_files(source), source, skip_bad_files), None


def text_files(source: str) -> list[Path]:
    """The ``.txt`` files of a local text source (a file, or a folder searched recursively); ``RecipeError``
    naming ``data.source`` when there are none. Lists files only: cheap enough for the validation pass."""
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(f for f in path.rglob("*.txt") if f.is_file())
        if not files:
            raise RecipeError(f"invalid value for 'data.source': no .txt files under {source}")
        return files
    raise RecipeError(
        f"invalid value for 'data.source': {source!r} is not pydoc_topics, stdlib_source, hf:<name>[:<config>] "
        "or an existing path"
    )


def stdlib_source_files() -> list[Path]:
    """The Python standard library's own ``.py`` files outside test directories (and site-packages), sorted.

    About 730 files and 12 MB on CPython 3.11: a real code corpus on every machine, large enough to pretrain
    a tiny model for a single pass. It depends on the Python version (the recipes record it).
    """
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
    return [p for p in sorted(root.rglob("*.py")) if not skip & set(p.relative_to(root).parts[:-1])]


def _decode_text(path: Path) -> str:
    """A file's text, strictly UTF-8 (a BOM is dropped); ``ValueError`` saying why it is not text."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot be read ({exc.strerror or exc})") from None
    nul = data.find(b"\x00")
    if nul >= 0:
        raise ValueError(f"looks binary (NUL byte at offset {nul}), not text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})") from None


def _skipped(bad: list[tuple[Path, str]], total: int, source: str, skip: bool, kind: str) -> None:
    """Refuse the first bad file (one line naming it), or with ``data.skip_bad_files`` warn with the count."""
    if not bad:
        return
    first = f"{bad[0][0]} {bad[0][1]}"
    if not skip:
        raise RecipeError(
            f"invalid value for 'data.source': {first}; fix or remove it, or set data.skip_bad_files=true to skip "
            f"bad {kind}"
        )
    if len(bad) == total:
        raise RecipeError(f"invalid value for 'data.source': all {total} {kind} under {source} are unreadable "
                          f"(first: {first})")
    warnings.warn(f"data.skip_bad_files: skipped {len(bad)} of {total} {kind} under {source} (first: {first})",
                  stacklevel=3)


def _read_text_files(files: list[Path], source: str, skip_bad_files: bool) -> list[str]:
    docs, bad = [], []
    for f in files:
        try:
            docs.append(_decode_text(f))
        except ValueError as exc:
            bad.append((f, str(exc)))
    _skipped(bad, len(files), source, skip_bad_files, "text files")
    return docs


def train_bpe_tokenizer(docs: Sequence[str], vocab_size: int, cache_dir: str | None = None) -> Any:
    """A byte-level BPE tokenizer trained on ``docs``, cached under :func:`cache_root` by content hash."""
    from tokenizers import Tokenizer
    from tokenizers.implementations import ByteLevelBPETokenizer

    digest = hashlib.sha256()
    for doc in docs:
        digest.update(doc.encode("utf-8", errors="replace"))
    digest.update(f"|{vocab_size}".encode())
    path = cache_root(cache_dir) / "tokenizers" / f"bpe-{digest.hexdigest()[:16]}.json"
    if path.is_file():
        return Tokenizer.from_file(str(path))
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(
        list(docs), vocab_size=vocab_size, min_frequency=2, special_tokens=[_EOS], show_progress=False
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tok.save(str(tmp))
    tmp.replace(path)  # atomic: concurrent runs never read a half-written file
    return Tokenizer.from_file(str(path))


class _Encoder:
    """One interface over a ``tokenizers.Tokenizer`` and a Hugging Face tokenizer."""

    def __init__(self, name: str, docs: Sequence[str], vocab_size: int, cache_dir: str | None) -> None:
        if name == "bpe":
            self._tok = train_bpe_tokenizer(docs, vocab_size, cache_dir)
            self.eos_id = self._tok.token_to_id(_EOS)
            self.vocab_size = self._tok.get_vocab_size()
            self._encode = lambda texts: [e.ids for e in self._tok.encode_batch(list(texts))]
        else:
            from transformers import AutoTokenizer

            tok = hub_call(
                f"tokenizer {name!r}", lambda: AutoTokenizer.from_pretrained(name), OFFLINE_RECIPES["causal_lm"]
            )
            self.eos_id = tok.eos_token_id
            self.vocab_size = len(tok)
            self._encode = lambda texts: tok(list(texts))["input_ids"]

    def blocks(self, docs: Sequence[str], seq_len: int) -> torch.Tensor:
        ids: list[int] = []
        for doc_ids in self._encode([d for d in docs if d.strip()]):
            ids.extend(doc_ids)
            ids.append(self.eos_id)
        n = len(ids) // seq_len
        return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


class _RecipeDataModule(L.LightningDataModule):
    """Loaders shared by the recipe datamodules: a step-indexed train sampler, a plain val loader."""

    train_set: Dataset
    val_set: Dataset
    batch_size: int
    val_batch_size: int
    num_workers: int
    seed: int

    def train_dataloader(self) -> DataLoader:
        return _train_loader(self.train_set, self.batch_size, self.seed, self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.val_batch_size, num_workers=self.num_workers)

    def analysis_dataset(self) -> Dataset:
        """The training set as the curriculum analyzer sees it."""
        self.setup()
        return self.train_set


class TextDataModule(_RecipeDataModule):
    """Token blocks of ``seq_len`` from prose; batches are ``{"input_ids": LongTensor[B, seq_len]}``."""

    def __init__(
        self,
        source: str = "pydoc_topics",
        seq_len: int = 128,
        batch_size: int = 16,
        *,
        tokenizer: str = "bpe",
        vocab_size: int = 2048,
        val_fraction: float = 0.1,
        max_val_samples: int | None = None,
        val_batch_size: int | None = None,
        text_field: str = "text",
        num_workers: int = 0,
        cache_dir: str | None = None,
        seed: int = 1234,
        skip_bad_files: bool = False,
    ) -> None:
        super().__init__()
        self.source, self.seq_len, self.batch_size = source, seq_len, batch_size
        self.skip_bad_files = skip_bad_files
        self.tokenizer, self.requested_vocab_size = tokenizer, vocab_size
        self.val_fraction, self.max_val_samples = val_fraction, max_val_samples
        self.val_batch_size = val_batch_size or batch_size
        self.text_field, self.num_workers, self.cache_dir, self.seed = text_field, num_workers, cache_dir, seed
        self.train_set: TokenBlocks | None = None
        self.val_set: TokenBlocks | None = None
        self.vocab_size: int | None = None
        self.eos_id: int | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train_docs, val_docs = _read_text_source(self.source, self.text_field, self.skip_bad_files)
        if val_docs is None:
            train_idx, val_idx = _split_indices(len(train_docs), self.val_fraction)
            if len(train_docs) < 2:  # one long text: split its blocks instead of its documents
                train_idx, val_idx = [0], []
            train_docs, val_docs = [train_docs[i] for i in train_idx], [train_docs[i] for i in val_idx]
        enc = _Encoder(self.tokenizer, train_docs, self.requested_vocab_size, self.cache_dir)
        self.vocab_size, self.eos_id = enc.vocab_size, enc.eos_id
        train = enc.blocks(train_docs, self.seq_len)
        val = enc.blocks(val_docs, self.seq_len) if val_docs else train[:0]
        if val.shape[0] == 0:
            n_val = max(1, round(train.shape[0] * self.val_fraction))
            train, val = train[n_val:], train[:n_val]
        if train.shape[0] == 0:
            raise RecipeError(f"invalid value for 'data.seq_len': {self.seq_len} is longer than the training text")
        if train.shape[0] < self.batch_size:
            raise RecipeError(
                f"invalid value for 'data.seq_len' / 'data.batch_size': blocks of {self.seq_len} tokens give "
                f"{train.shape[0]} training samples, fewer than a batch of {self.batch_size}"
            )
        if self.max_val_samples is not None:
            val = val[: self.max_val_samples]
        self.train_set, self.val_set = TokenBlocks(train), TokenBlocks(val)


# --------------------------------------------------------------------------------------------- images


#: Files of a class folder read as images (torchvision's ``ImageFolder`` suffixes, and GIF); others are ignored.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


def image_files(source: str, warn: bool = False) -> tuple[list[str], list[tuple[Path, int]]]:
    """Class names and ``(file, label)`` pairs of a local image folder (one sub-folder per class); ``RecipeError``
    naming ``data.source`` unless there are at least 2 classes, each with an image. Lists files only (cheap: the
    validation pass runs it); ``warn``: say how many files without an image suffix are ignored."""
    root = Path(source).expanduser()
    if not root.is_dir():
        raise RecipeError(
            f"invalid value for 'data.source': {source!r} is not digits, hf:<name>[:<config>] or a folder"
        )
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise RecipeError(f"invalid value for 'data.source': no class sub-folders in {source} (one folder of "
                          "images per class)")
    if len(classes) < 2:
        raise RecipeError(f"invalid value for 'data.source': {source} has one class sub-folder ({classes[0]}); "
                          "image classification needs at least 2")
    files, other = [], 0
    for label, name in enumerate(classes):
        found = []
        for f in sorted((root / name).iterdir()):
            if f.is_file() and not f.name.startswith("."):
                if f.suffix.lower() in IMAGE_SUFFIXES:
                    found.append((f, label))
                else:
                    other += 1
        if not found:
            raise RecipeError(f"invalid value for 'data.source': class folder {root / name} has no image files "
                              f"({', '.join(IMAGE_SUFFIXES)})")
        files += found
    if other and warn:
        warnings.warn(f"data.source: ignored {other} file(s) without an image suffix under {source}", stacklevel=2)
    return classes, files


def _image_problem(path: Path) -> str | None:
    """Why ``path`` is not a readable image (PIL's ``verify``: header and structure, no decoding), or None."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as exc:  # UnidentifiedImageError, OSError (truncated), SyntaxError (broken PNG chunks)
        return f"cannot be read as an image ({type(exc).__name__}: {_one_line(exc)})"
    return None


def _to_pixels(image: Any, image_size: int, num_channels: int) -> torch.Tensor:
    """A PIL image or an [H, W] / [C, H, W] array in [0, 1] -> normalized [C, S, S] float tensor."""
    if hasattr(image, "convert"):  # PIL
        import numpy as np

        image = image.convert("L" if num_channels == 1 else "RGB")
        x = torch.from_numpy(np.asarray(image, dtype="float32") / 255.0)
        x = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)
    else:
        x = torch.as_tensor(image, dtype=torch.float32)
        x = x.unsqueeze(0) if x.ndim == 2 else x
    if x.shape[0] != num_channels:  # gray <-> RGB; extra channels (alpha) dropped
        x = x[:3].mean(0, keepdim=True) if num_channels == 1 else x[:1].expand(3, -1, -1) if x.shape[0] == 1 else x[:3]
    if x.shape[-1] != image_size or x.shape[-2] != image_size:
        x = torch.nn.functional.interpolate(
            x[None], size=(image_size, image_size), mode="bilinear", align_corners=False
        )[0]
    return (x - 0.5) / 0.5


class _Images(Dataset):
    """Items ``{"pixel_values": [C, S, S], "labels": int}``; ``load(i)`` returns (image, label)."""

    def __init__(self, n: int, load: Callable[[int], tuple[Any, int]], image_size: int, num_channels: int) -> None:
        self.n, self.load, self.image_size, self.num_channels = n, load, image_size, num_channels

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        image, label = self.load(i)
        return {"pixel_values": _to_pixels(image, self.image_size, self.num_channels), "labels": int(label)}


def _subset(load: Callable[[int], tuple[Any, int]], idx: Sequence[int]) -> Callable[[int], tuple[Any, int]]:
    return lambda i: load(idx[i])


class ImageDataModule(_RecipeDataModule):
    """Labelled images resized to ``image_size``; batches are ``{"pixel_values", "labels"}``."""

    def __init__(
        self,
        source: str = "digits",
        image_size: int = 16,
        batch_size: int = 32,
        *,
        num_channels: int = 1,
        val_fraction: float = 0.1,
        max_val_samples: int | None = None,
        val_batch_size: int | None = None,
        image_field: str = "img",
        label_field: str = "label",
        num_workers: int = 0,
        seed: int = 1234,
        skip_bad_files: bool = False,
    ) -> None:
        super().__init__()
        self.skip_bad_files = skip_bad_files
        self.source, self.image_size, self.batch_size, self.num_channels = source, image_size, batch_size, num_channels
        self.val_fraction, self.max_val_samples = val_fraction, max_val_samples
        self.val_batch_size = val_batch_size or batch_size
        self.image_field, self.label_field, self.num_workers, self.seed = image_field, label_field, num_workers, seed
        self.train_set: _Images | None = None
        self.val_set: _Images | None = None
        self.num_labels: int | None = None

    def _sources(self) -> tuple[Callable, int, Callable | None, int, int]:
        """(train load, n, val load or None, n_val, num_labels)."""
        if self.source == "digits":
            from sklearn.datasets import load_digits

            digits = load_digits()
            images = torch.tensor(digits.images, dtype=torch.float32) / 16.0
            labels = digits.target.tolist()
            return (lambda i: (images[i], labels[i])), len(labels), None, 0, 10
        if self.source.startswith("hf:"):
            ds = _load_hf_dataset(self.source, "image_classification")
            train = ds["train"]
            for key, col in (("data.image_field", self.image_field), ("data.label_field", self.label_field)):
                if col not in train.column_names:
                    raise RecipeError(f"invalid value for '{key}': {col!r} is not a column of {self.source}")
            val_split = next((s for s in ("validation", "valid", "test") if s in ds), None)
            feature = train.features[self.label_field]
            num_labels = getattr(feature, "num_classes", None) or len(set(train[self.label_field]))
            fields = (self.image_field, self.label_field)
            load = lambda split: lambda i: tuple(split[i][k] for k in fields)  # noqa: E731  (one decode per item)
            if val_split is None:
                return load(train), len(train), None, 0, num_labels
            return load(train), len(train), load(ds[val_split]), len(ds[val_split]), num_labels
        classes, files = image_files(self.source, warn=True)
        problems = [_image_problem(f) for f, _ in files]
        bad = [(f, p) for (f, _), p in zip(files, problems) if p is not None]
        _skipped(bad, len(files), self.source, self.skip_bad_files, "image files")
        files = [item for item, p in zip(files, problems) if p is None]
        empty = sorted(set(classes) - {classes[c] for _, c in files})
        if empty:
            raise RecipeError(f"invalid value for 'data.source': no readable image left in class folder(s) "
                              f"{', '.join(empty)} under {self.source}")

        def load_file(i: int) -> tuple[Any, int]:
            from PIL import Image

            path, label = files[i]
            try:
                with Image.open(path) as im:
                    return im.copy(), label
            except Exception as exc:  # a file that passed verify() but does not decode
                raise RecipeError(f"invalid value for 'data.source': {path} cannot be decoded as an image "
                                  f"({type(exc).__name__}: {_one_line(exc)})") from None

        return load_file, len(files), None, 0, len(classes)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        load, n, val_load, n_val, self.num_labels = self._sources()
        if self.num_labels < 2:
            raise RecipeError(f"invalid value for 'data.source': {self.source} has {self.num_labels} class(es); "
                              "image classification needs at least 2")
        if val_load is None:
            train_idx, val_idx = _split_indices(n, self.val_fraction)
            load, val_load, n, n_val = _subset(load, train_idx), _subset(load, val_idx), len(train_idx), len(val_idx)
        if self.max_val_samples is not None:
            n_val = min(n_val, self.max_val_samples)
        self.train_set = _Images(n, load, self.image_size, self.num_channels)
        self.val_set = _Images(n_val, val_load, self.image_size, self.num_channels)
