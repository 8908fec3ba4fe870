"""Recipe building blocks: the shipped YAMLs, datamodules on local folders, Hub errors, comparison maths."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch

from lightning_dataeff.recipes import HubUnavailableError, ImageDataModule, TextDataModule, load_recipe

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("recipe_env")


@pytest.mark.parametrize("name", ["gpt2-tiny", "vit-tiny", "gpt2-finetune", "vit-finetune", "gpt2-pretrain-stdlib"])
def test_shipped_recipes_validate(name):
    recipe = load_recipe(ROOT / "recipes" / f"{name}.yaml")
    assert recipe.name == name and recipe.budget.max_layer_tokens
    ltd = [c for c in recipe.callbacks if c.class_path.endswith("RandomLTD")]
    assert len(ltd) == 1
    if name.startswith("vit"):
        assert ltd[0].init_args["keep_positions"] == [0]  # the CLS token is never dropped


def test_full_recipes_use_the_papers_settings():
    gpt2 = load_recipe(ROOT / "recipes" / "gpt2-finetune.yaml")
    warmup, ltd = (c.init_args for c in gpt2.callbacks)
    assert gpt2.model.pretrained == "gpt2" and gpt2.data.seq_len == 1024 and gpt2.optim.schedule == "layer_tokens"
    assert (warmup["min_len"], warmup["max_len"], warmup["mode"]) == (32, 1024, "reshape")
    assert (ltd["min_tokens"], ltd["max_tokens"], ltd["layers"]) == (128, 1024, list(range(1, 11)))
    steps = gpt2.budget.max_layer_tokens // (8 * 1024 * 12)
    assert ltd["duration"] == round(0.3 * steps)  # 30% of the baseline's steps
    vit = load_recipe(ROOT / "recipes" / "vit-finetune.yaml")
    (ltd,) = (c.init_args for c in vit.callbacks)
    assert (vit.data.image_size, ltd["min_tokens"], ltd["max_tokens"]) == (224, 32, 197)
    steps = vit.budget.max_layer_tokens // (64 * 197 * 12)
    assert abs(ltd["duration"] / steps - 10 / 14) < 0.01  # 10 of 14 epochs


def test_text_datamodule_on_a_local_folder(tmp_path):
    from lightning_dataeff.curriculum import CurriculumSampler

    for i in range(6):
        (tmp_path / f"doc{i}.txt").write_text(f"Document {i}. " + "The quick brown fox jumps over the lazy dog. " * 40)
    dm = TextDataModule(str(tmp_path), seq_len=16, batch_size=4, vocab_size=300, val_fraction=0.2)
    dm.setup()
    assert dm.vocab_size <= 300 and dm.eos_id is not None
    assert dm.train_set.blocks.shape[1] == 16 and len(dm.val_set) > 0
    loader = dm.train_dataloader()
    assert isinstance(loader.batch_sampler, CurriculumSampler)
    batch = next(iter(loader))
    assert batch["input_ids"].shape == (4, 16) and batch["input_ids"].dtype == torch.long


def test_image_datamodule_on_a_local_folder(tmp_path):
    from PIL import Image

    for c, color in enumerate([(255, 0, 0), (0, 0, 255)]):
        (tmp_path / f"class{c}").mkdir()
        for i in range(5):
            Image.new("RGB", (10, 7), color).save(tmp_path / f"class{c}" / f"{i}.png")
    dm = ImageDataModule(str(tmp_path), image_size=8, batch_size=2, num_channels=3, val_fraction=0.2)
    dm.setup()
    assert dm.num_labels == 2 and len(dm.train_set) + len(dm.val_set) == 10
    item = dm.train_set[0]
    assert item["pixel_values"].shape == (3, 8, 8) and item["labels"] in (0, 1)
    assert item["pixel_values"].min() >= -1 and item["pixel_values"].max() <= 1


def test_bad_local_sources_name_the_key(tmp_path):
    from lightning_dataeff.recipes import RecipeError

    with pytest.raises(RecipeError, match="data.source"):
        TextDataModule(str(tmp_path / "missing")).setup()
    with pytest.raises(RecipeError, match="data.source"):
        ImageDataModule(str(tmp_path)).setup()  # a folder without class sub-folders


def _fake_datasets(exc: Exception) -> types.ModuleType:
    mod = types.ModuleType("datasets")

    def load_dataset(*args, **kwargs):
        raise exc

    mod.load_dataset = load_dataset
    return mod


@pytest.mark.parametrize("recipe, offline", [("gpt2-finetune", "gpt2-tiny"), ("vit-finetune", "vit-tiny")])
def test_unreachable_hub_dataset_names_the_offline_recipe(recipe, offline, monkeypatch, capsys):
    from lightning_dataeff.cli import main

    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets(ConnectionError("Couldn't reach the Hub")))
    assert main(["fit", str(ROOT / "recipes" / f"{recipe}.yaml"), "trainer.accelerator=cpu"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"recipes/{offline}.yaml" in err and "Hugging Face Hub" in err and "ConnectionError" in err


def fit_exit(capsys, *overrides):
    """``dataeff fit recipes/gpt2-finetune.yaml`` on CPU: the exit code and the one-line error."""
    from lightning_dataeff.cli import main

    code = main(["fit", str(ROOT / "recipes" / "gpt2-finetune.yaml"), "trainer.accelerator=cpu", *overrides])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return code, err


def test_uncached_pretrained_model_fails_before_any_data(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets(AssertionError("the data was read")))
    code, err = fit_exit(capsys, "model.pretrained=nobody/no-model")
    assert code == 1 and "model config 'nobody/no-model'" in err and "recipes/gpt2-tiny.yaml" in err


def test_pretrained_config_checked_against_the_data_before_any_data(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets(AssertionError("the data was read")))
    code, err = fit_exit(capsys, "data.seq_len=2048")
    assert code == 2  # a recipe error
    assert err == ("dataeff: error: invalid value for 'model.config.n_positions': 1024 positions are fewer than "
                   "data.seq_len=2048")


def test_pretrained_config_value_refused_as_a_recipe_error(capsys):
    code, err = fit_exit(capsys, "model.config.n_layer=abc")
    assert code == 2 and "'model.config.n_layer'" in err


def test_pretrained_directory_without_config_refused(capsys, tmp_path):
    code, err = fit_exit(capsys, f"model.pretrained={tmp_path}")
    assert code == 2 and err.endswith(f"the directory '{tmp_path}' has no config.json")


def test_pretrained_name_not_on_the_hub_refused(capsys, monkeypatch):
    import transformers

    real = transformers.GPT2Config.from_pretrained.__func__

    def from_pretrained(cls, name, *args, local_files_only=False, **kwargs):
        if name == "nobody/no-model" and not local_files_only:  # what transformers raises for a missing repo
            raise OSError("nobody/no-model is not a local folder and is not a valid model identifier listed on "
                          "'https://huggingface.co/models'")
        return real(cls, name, *args, local_files_only=local_files_only, **kwargs)

    monkeypatch.setattr(transformers.GPT2Config, "from_pretrained", classmethod(from_pretrained))
    code, err = fit_exit(capsys, "model.pretrained=nobody/no-model")
    assert code == 2 and "invalid value for 'model.pretrained': no model 'nobody/no-model' on the Hugging Face" in err


def test_missing_datasets_package_names_the_offline_recipe(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    code, err = fit_exit(capsys)
    assert code == 1 and "lightning-dataeff[hf]" in err and "recipes/gpt2-tiny.yaml" in err


@pytest.mark.parametrize("task, cls, offline", [
    ("causal_lm", "GPT2LMHeadModel", "gpt2-tiny"), ("image_classification", "ViTForImageClassification", "vit-tiny"),
])
def test_unreachable_hub_model_names_the_offline_recipe(task, cls, offline, monkeypatch):
    import transformers

    from lightning_dataeff.recipes.models import build_hf_model

    def offline_error(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(getattr(transformers, cls), "from_pretrained", offline_error)
    with pytest.raises(HubUnavailableError, match=f"recipes/{offline}.yaml"):
        build_hf_model(task, "some/model", {}, num_labels=10)


def test_hub_tokenizer_error_names_the_offline_recipe(monkeypatch, capsys, tmp_path):
    import transformers

    from lightning_dataeff.cli import main

    offline = lambda *a, **k: (_ for _ in ()).throw(OSError("offline"))  # noqa: E731
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    assert main(["fit", str(ROOT / "recipes" / "gpt2-tiny.yaml"), "data.tokenizer=gpt2",
                 f"output_dir={tmp_path / 'run'}"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "tokenizer 'gpt2'" in err and "recipes/gpt2-tiny.yaml" in err


def test_analyze_command_writes_the_analysis(tmp_path):
    from lightning_dataeff.cli import main
    from lightning_dataeff.curriculum import load_analysis

    out = tmp_path / "run"
    assert main(["analyze", str(ROOT / "recipes" / "gpt2-tiny.yaml"), f"output_dir={out}", "data.vocab_size=512"]) == 0
    analysis = load_analysis(out / "analysis")
    assert set(analysis) == {"seqlen", "vocab_rarity"}


def test_missing_optional_package_says_how_to_install(monkeypatch, capsys):
    from lightning_dataeff.cli import main

    monkeypatch.setitem(sys.modules, "transformers", None)
    assert main(["fit", str(ROOT / "recipes" / "gpt2-tiny.yaml"), "trainer.max_steps=1"]) == 1
    err = capsys.readouterr().err.strip()
    assert "'transformers'" in err and "lightning-dataeff[recipes]" in err and len(err.splitlines()) == 1


class _FakeSplit:
    """Just enough of a ``datasets.Dataset``: columns, column access, row access, features."""

    def __init__(self, columns: dict, features: dict | None = None) -> None:
        self.columns, self.column_names, self.features = columns, list(columns), features or {}

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def __getitem__(self, key):
        if isinstance(key, str):
            return self.columns[key]
        return {k: v[key] for k, v in self.columns.items()}


def _hub_returning(splits: dict, calls: list) -> types.ModuleType:
    mod = types.ModuleType("datasets")

    def load_dataset(name, config=None):
        calls.append((name, config))
        return splits

    mod.load_dataset = load_dataset
    return mod


def test_hub_text_dataset_path_with_a_stand_in_hub(monkeypatch):
    """The real loading code (name/config parsing, splits, line joining) against a stand-in for ``datasets``."""
    calls: list = []
    lines = [" = Heading = \n", "Some prose about foxes and dogs .\n", ""] * 60
    splits = {"train": _FakeSplit({"text": lines}), "validation": _FakeSplit({"text": lines[:30]})}
    monkeypatch.setitem(sys.modules, "datasets", _hub_returning(splits, calls))
    dm = TextDataModule("hf:Salesforce/wikitext:wikitext-2-raw-v1", seq_len=8, batch_size=2, vocab_size=300)
    dm.setup()
    assert calls == [("Salesforce/wikitext", "wikitext-2-raw-v1")]
    assert len(dm.train_set) > len(dm.val_set) > 0
    from lightning_dataeff.recipes import RecipeError

    with pytest.raises(RecipeError, match="data.text_field"):
        TextDataModule("hf:x", text_field="sentence").setup()


def test_hub_image_dataset_path_with_a_stand_in_hub(monkeypatch):
    from PIL import Image

    calls: list = []
    images = [Image.new("RGB", (32, 32), (i * 20, 0, 0)) for i in range(12)]
    feature = types.SimpleNamespace(num_classes=10)
    train = _FakeSplit({"img": images, "label": [i % 10 for i in range(12)]}, {"label": feature})
    test = _FakeSplit({"img": images[:4], "label": [0, 1, 2, 3]}, {"label": feature})
    monkeypatch.setitem(sys.modules, "datasets", _hub_returning({"train": train, "test": test}, calls))
    dm = ImageDataModule("hf:uoft-cs/cifar10", image_size=16, batch_size=4, num_channels=3)
    dm.setup()
    assert calls == [("uoft-cs/cifar10", None)] and dm.num_labels == 10
    assert (len(dm.train_set), len(dm.val_set)) == (12, 4)
    assert dm.val_set[3]["pixel_values"].shape == (3, 16, 16) and dm.val_set[3]["labels"] == 3
