"""Bad inputs walked through the ``dataeff`` command line: each must exit 2 with one line naming the key.

The one table of them, used by ``tests/test_bad_inputs.py`` (one test per case) and ``benchmarks/fault_run.py``
(the tally). Arguments may hold ``{tmp}`` (a fresh folder per case, prepared by the case's ``files`` builder),
``{gpt2}``, ``{vit}`` and ``{ds}`` (the shipped recipes and DeepSpeed config). ``base`` names the overrides put
before the case's own: a small GPT-2 (4 blocks, sequences of 32, random-LTD on blocks 1-2) or the tiny ViT, two
steps, quiet, writing to ``{tmp}/run``; a case that is not refused up front therefore trains (and fails the test).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
PATHS = {
    "gpt2": str(ROOT / "recipes" / "gpt2-tiny.yaml"),
    "vit": str(ROOT / "recipes" / "vit-tiny.yaml"),
    "ds": str(ROOT / "recipes" / "deepspeed" / "gpt2-ptb-ds_config.json"),
}
QUIET = ("trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "logger=none")
SMALL_GPT2 = (
    "model.config.n_layer=4", "model.config.n_embd=32", "model.config.n_inner=64", "data.seq_len=32",
    "data.batch_size=8", "data.vocab_size=512", "callbacks[0].init_args.min_len=8",
    "callbacks[0].init_args.max_len=32", "callbacks[0].init_args.duration=6",
    "callbacks[1].init_args.min_tokens=8", "callbacks[1].init_args.max_tokens=32",
    "callbacks[1].init_args.duration=10", "callbacks[1].init_args.layers=[1,2]", "data.max_val_samples=16",
)
BASES = {
    "gpt2": ("{gpt2}", *SMALL_GPT2, *QUIET, "trainer.max_steps=2", "output_dir={tmp}/run"),
    "vit": ("{vit}", *QUIET, "trainer.max_steps=2", "data.max_val_samples=16", "output_dir={tmp}/run"),
    "none": (),
}


@dataclass(frozen=True)
class BadInput:
    id: str
    cls: str  # structure, numbers, trainer, callbacks, model, data, output_dir, deepspeed
    args: tuple[str, ...]
    needles: tuple[str, ...]  # each must be in the one-line error
    base: str = "gpt2"
    files: str | None = None  # a builder of FILES, run on {tmp} first
    command: str = "fit"
    skip: str | None = None  # a condition of SKIPS under which the case does not apply

    def argv(self, tmp: Path) -> list[str]:
        values = {**PATHS, "tmp": str(tmp)}

        def fill(arg: str) -> str:
            for name, value in values.items():
                arg = arg.replace("{" + name + "}", value)
            return arg

        return [self.command, *map(fill, BASES[self.base]), *map(fill, self.args)]


# ---------------------------------------------------------------------------------------------- file builders
def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


_RECIPE_HEAD = "task: causal_lm\ndata: {source: pydoc_topics}\ntrainer: {max_steps: 2}\n"


def _images(root: Path, classes: int = 2, per_class: int = 4) -> None:
    from PIL import Image

    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.new("RGB", (8, 8), (60 * c, 10 * i, 0)).save(root / f"class{c}" / f"{i}.png")


def _prose(i: int) -> str:
    return f"Document {i}. " + "The quick brown fox jumps over the lazy dog again and again. " * 30


def _ds(tmp: Path, name: str, config: object) -> None:
    _write(tmp / name, json.dumps(config) if not isinstance(config, str) else config)


def _ds_routing(**ltd: object) -> dict:
    section = {
        "enabled": True,
        "random_ltd_layer_id": [1, 2],
        "random_ltd_schedule": {"min_value": 8, "max_value": 32, "schedule_type": "fixed_linear",
                                "schedule_config": {"require_steps": 10, "seq_per_step": 8}},
        **ltd,
    }
    return {"data_efficiency": {"enabled": True, "data_routing": {"enabled": True, "random_ltd": section}}}


def _earlier_run(tmp: Path) -> None:
    _write(tmp / "run" / "metrics.csv", "step,split\n1,train\n")
    _write(tmp / "run" / "config.yaml", "name: earlier\n")


def _live_lock(tmp: Path) -> None:
    import socket

    _write(tmp / "run" / ".dataeff.lock", json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))


def _corrupt_checkpoints(tmp: Path) -> None:
    _earlier_run(tmp)
    (tmp / "run" / "checkpoints").mkdir(parents=True)
    (tmp / "run" / "checkpoints" / "last.ckpt").write_bytes(os.urandom(4096))
    (tmp / "run" / "checkpoints" / "step2.ckpt").write_bytes(b"PK\x03\x04" + os.urandom(100))


FILES: dict[str, Callable[[Path], None]] = {
    "yaml_bad": lambda t: _write(t / "bad.yaml", "task: causal_lm\ndata: [unclosed\n"),
    "yaml_list": lambda t: _write(t / "list.yaml", "- task\n- data\n"),
    "yaml_callbacks_mapping": lambda t: _write(
        t / "r.yaml", _RECIPE_HEAD + "callbacks: {class_path: lightning_dataeff.callbacks.RandomLTD}\n"
    ),
    "yaml_trainer_list": lambda t: _write(t / "r.yaml", "task: causal_lm\ndata: {source: pydoc_topics}\n"
                                          "trainer: [1, 2]\n"),
    "yaml_init_args_list": lambda t: _write(
        t / "r.yaml",
        _RECIPE_HEAD + "callbacks: [{class_path: lightning_dataeff.callbacks.RandomLTD, init_args: [8]}]\n",
    ),
    "yaml_no_task": lambda t: _write(t / "r.yaml", "data: {source: pydoc_topics}\n"),
    "json_bad": lambda t: _write(t / "bad.json", "{not json"),
    "a_file": lambda t: _write(t / "file.txt", "not a folder\n"),
    "empty_dir": lambda t: (t / "empty").mkdir(),
    "text_bad_utf8": lambda t: (
        [_write(t / "text" / f"doc{i}.txt", _prose(i)) for i in range(4)],
        (t / "text" / "bad.txt").write_bytes(_prose(9).encode() + b"\xff\xfe caf\xe9\n"),
    ),
    "text_binary": lambda t: (
        [_write(t / "text" / f"doc{i}.txt", _prose(i)) for i in range(4)],
        (t / "text" / "bin.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256))),
    ),
    "images_corrupt": lambda t: (_images(t / "img"), (t / "img" / "class1" / "broken.png").write_bytes(os.urandom(64))),
    "images_one_class": lambda t: _images(t / "img", classes=1),
    "images_empty_class": lambda t: (_images(t / "img"), (t / "img" / "class9").mkdir()),
    "earlier_run": _earlier_run,
    "live_lock": _live_lock,
    "corrupt_checkpoints": _corrupt_checkpoints,
    "ds_ids_out_of_range": lambda t: _ds(t, "ds.json", _ds_routing(random_ltd_layer_id=[1, 7])),
    "ds_nan": lambda t: _ds(t, "ds.json", json.dumps(_ds_routing()).replace('"min_value": 8', '"min_value": NaN')),
    "ds_list": lambda t: _ds(t, "ds.json", [1, 2]),
    "ds_layer_num": lambda t: _ds(t, "ds.json", _ds_routing(random_ltd_layer_num=3)),
    "ds_enabled_string": lambda t: _ds(t, "ds.json", {"data_efficiency": {"enabled": "yes"}}),
    "ds_total_layers": lambda t: _ds(t, "ds.json", _ds_routing(total_layer_num=12)),
}

SKIPS: dict[str, Callable[[], bool]] = {
    "gpu": lambda: __import__("torch").cuda.is_available(),
    "sys_writable": lambda: os.access("/sys", os.W_OK) and _probe("/sys"),
}


def _probe(directory: str) -> bool:
    import tempfile

    try:
        fd, path = tempfile.mkstemp(dir=directory)
    except OSError:
        return False
    os.close(fd)
    os.unlink(path)
    return True


# ------------------------------------------------------------------------------------------------ the table
_CB_LTD = "callbacks[1].init_args"
_CL_SEQLEN = (
    "callbacks[0]={class_path: lightning_dataeff.callbacks.CurriculumLearning, init_args: {metrics: {seqlen_truncate: "
    "{difficulty_type: value, clustering_type: single_cluster, min_difficulty: 8, max_difficulty: %d, schedule_type: "
    "fixed_linear, schedule_config: {total_curriculum_step: 4, difficulty_step: 8}}}}}"
)
_CL_BASED = (
    "callbacks[0]={class_path: lightning_dataeff.callbacks.CurriculumLearning, init_args: {metrics: {vocab_rarity: "
    "{difficulty_type: percentile, clustering_type: schedule_based, min_difficulty: 10, max_difficulty: 100, "
    "schedule_type: fixed_linear, schedule_config: {total_curriculum_step: 4, difficulty_step: 10}}}}}"
)

CASES: list[BadInput] = [
    # recipe structure: files and overrides
    BadInput("recipe-is-a-directory", "structure", ("{tmp}",), ("is a directory",), base="none"),
    BadInput("recipe-missing", "structure", ("{tmp}/nope.yaml",), ("nope.yaml",), base="none"),
    BadInput("recipe-unparsable", "structure", ("{tmp}/bad.yaml",), ("bad.yaml", "line"), base="none",
             files="yaml_bad"),
    BadInput("recipe-top-level-list", "structure", ("{tmp}/list.yaml",), ("mapping at the top level",), base="none",
             files="yaml_list"),
    BadInput("recipe-callbacks-mapping", "structure", ("{tmp}/r.yaml",), ("'callbacks'", "list"), base="none",
             files="yaml_callbacks_mapping"),
    BadInput("recipe-trainer-list", "structure", ("{tmp}/r.yaml",), ("'trainer'", "mapping"), base="none",
             files="yaml_trainer_list"),
    BadInput("recipe-init-args-list", "structure", ("{tmp}/r.yaml",), ("'callbacks[0].init_args'",), base="none",
             files="yaml_init_args_list"),
    BadInput("recipe-no-task", "structure", ("{tmp}/r.yaml",), ("'task'",), base="none", files="yaml_no_task"),
    BadInput("unknown-key", "structure", ("nosuchkey=1",), ("'nosuchkey'",)),
    BadInput("lr-not-a-number", "structure", ("optim.lr=fast",), ("'optim.lr'",)),
    BadInput("batch-size-float", "structure", ("data.batch_size=1.5",), ("'data.batch_size'",)),
    BadInput("override-without-equals", "structure", ("not-an-override",), ("not-an-override",)),
    BadInput("callbacks-override-mapping", "structure", ("callbacks={a: 1}",), ("'callbacks'", "list")),
    BadInput("callback-entry-scalar", "structure", ("callbacks[0]=5",), ("'callbacks[0]'",)),
    BadInput("callback-index-out-of-range", "structure", ("callbacks[5].init_args.x=1",), ("'callbacks[5]'",)),
    BadInput("trainer-scalar", "structure", ("trainer=5",), ("'trainer'",)),
    BadInput("model-config-scalar", "structure", ("model.config=5",), ("'model.config'",)),
    BadInput("betas-one-number", "structure", ("optim.betas=[0.9]",), ("'optim.betas'",)),
    BadInput("task-unknown", "structure", ("task=regression",), ("'task'",)),
    BadInput("variant-unknown", "structure", ("variant=everything",), ("'variant'",)),
    BadInput("logger-unknown", "structure", ("logger=wandb",), ("'logger'",)),
    BadInput("checkpoint-interval-0", "structure", ("checkpoint_every_n_steps=0",), ("'checkpoint_every_n_steps'",)),
    BadInput("resume-not-bool", "structure", ("resume=maybe",), ("'resume'",)),
    BadInput("seed-negative", "structure", ("seed=-1",), ("'seed'",)),
    BadInput("seed-too-large", "structure", ("seed=4294967296",), ("'seed'",)),
    BadInput("seed-not-int", "structure", ("seed=abc",), ("'seed'",)),
    BadInput("compare-duplicate-variants", "structure", ("compare.variants=[baseline,baseline]",),
             ("'compare.variants'",)),
    BadInput("compare-no-budgets", "structure", ("compare.budgets=[]",), ("'compare.budgets'",)),
    BadInput("compare-zero-budget", "value", ("compare.budgets=[0,1]",), ("'compare.budgets[0]'",)),
    BadInput("variants-unknown-callback", "value", ("variants.magic=[nothing]",),
             ("'variants.magic[0]'",)),
    BadInput("compare-unknown-variant", "structure", ("compare.variants=[baseline,magic]",),
             ("'compare.variants[1]'",)),
    BadInput("output-dir-empty", "structure", ("output_dir=",), ("'output_dir'",)),
    BadInput("from-deepspeed-missing", "structure", ("from_deepspeed=missing.json",), ("'from_deepspeed'",)),
    BadInput("from-deepspeed-directory", "structure", ("from_deepspeed={tmp}",), ("'from_deepspeed'", "directory")),
    BadInput("deepspeed-option-directory", "structure", ("--deepspeed-config", "{tmp}"),
             ("'--deepspeed-config'", "directory")),
    BadInput("deepspeed-option-missing", "structure", ("--deepspeed-config", "{tmp}/missing.json"),
             ("'--deepspeed-config'", "missing.json")),
    BadInput("deepspeed-option-unparsable", "structure", ("--deepspeed-config", "{tmp}/bad.json"),
             ("bad.json", "parse"), files="json_bad"),
    # numbers: finite and in range everywhere
    BadInput("lr-inf", "numbers", ("optim.lr=.inf",), ("'optim.lr'", "finite")),
    BadInput("lr-nan", "numbers", ("optim.lr=.nan",), ("'optim.lr'",)),
    BadInput("lr-zero", "numbers", ("optim.lr=0",), ("'optim.lr'",)),
    BadInput("weight-decay-inf", "numbers", ("optim.weight_decay=.inf",), ("'optim.weight_decay'",)),
    BadInput("warmup-nan", "numbers", ("optim.warmup=.nan",), ("'optim.warmup'",)),
    BadInput("min-lr-ratio-above-1", "numbers", ("optim.min_lr_ratio=1.5",), ("'optim.min_lr_ratio'",)),
    BadInput("clip-inf", "numbers", ("optim.gradient_clip_val=.inf",), ("'optim.gradient_clip_val'",)),
    BadInput("beta-nan", "numbers", ("optim.betas=[.nan,0.9]",), ("'optim.betas[0]'",)),
    BadInput("val-fraction-nan", "numbers", ("data.val_fraction=.nan",), ("'data.val_fraction'",)),
    BadInput("budget-zero", "numbers", ("budget.max_layer_tokens=0",), ("'budget.max_layer_tokens'",)),
    BadInput("budget-float", "numbers", ("budget.max_layer_tokens=1.5e9",), ("'budget.max_layer_tokens'",)),
    BadInput("duration-inf", "numbers", (f"{_CB_LTD}.duration=.inf",), (f"'{_CB_LTD}.duration'",)),
    BadInput("warmup-duration-nan", "numbers", ("callbacks[0].init_args.duration=.nan",),
             ("'callbacks[0].init_args.duration'",)),
    BadInput("layer-norm-eps-nan", "numbers", ("model.config.layer_norm_epsilon=.nan",),
             ("'model.config.layer_norm_epsilon'",)),
    BadInput("max-steps-nan", "numbers", ("trainer.max_steps=.nan",), ("'trainer.max_steps'",)),
    # trainer values: Lightning's argument types, the ranges it leaves unchecked, its own checks named by key
    BadInput("max-steps-text", "trainer", ("trainer.max_steps=abc",), ("'trainer.max_steps'",)),
    BadInput("max-steps-float", "trainer", ("trainer.max_steps=1.5",), ("'trainer.max_steps'",)),
    BadInput("max-steps-negative", "trainer", ("trainer.max_steps=-5",), ("'trainer.max_steps'",)),
    BadInput("max-steps-zero", "trainer", ("trainer.max_steps=0",), ("'trainer.max_steps'",)),
    BadInput("accumulate-zero", "trainer", ("trainer.accumulate_grad_batches=0",),
             ("'trainer.accumulate_grad_batches'",)),
    BadInput("accumulate-negative", "trainer", ("trainer.accumulate_grad_batches=-1",),
             ("'trainer.accumulate_grad_batches'",)),
    BadInput("precision-unknown", "trainer", ("trainer.precision=fp7",), ("'trainer.precision'",)),
    BadInput("accelerator-unknown", "trainer", ("trainer.accelerator=tpu9",), ("'trainer.accelerator'",)),
    BadInput("accelerator-gpu-without-one", "trainer", ("trainer.accelerator=gpu",), ("'trainer.accelerator'",),
             skip="gpu"),
    BadInput("devices-zero", "trainer", ("trainer.devices=0",), ("'trainer.devices'",)),
    BadInput("devices-text", "trainer", ("trainer.devices=abc",), ("'trainer.devices'",)),
    BadInput("val-interval-inf", "trainer", ("trainer.val_check_interval=.inf",), ("'trainer.val_check_interval'",)),
    BadInput("val-interval-zero", "trainer", ("trainer.val_check_interval=0",), ("'trainer.val_check_interval'",)),
    BadInput("val-interval-negative", "trainer", ("trainer.val_check_interval=-1",),
             ("'trainer.val_check_interval'",)),
    BadInput("limit-train-zero", "trainer", ("trainer.limit_train_batches=0",), ("'trainer.limit_train_batches'",)),
    BadInput("log-every-negative", "trainer", ("trainer.log_every_n_steps=-3",), ("'trainer.log_every_n_steps'",)),
    BadInput("val-every-epoch-zero", "trainer", ("trainer.check_val_every_n_epoch=0",),
             ("'trainer.check_val_every_n_epoch'",)),
    BadInput("max-epochs-text", "trainer", ("trainer.max_epochs=x",), ("'trainer.max_epochs'",)),
    BadInput("strategy-unknown", "trainer", ("trainer.strategy=nope",), ("'trainer.strategy'",)),
    BadInput("max-time-text", "trainer", ("trainer.max_time=abc",), ("'trainer.max_time'",)),
    BadInput("deterministic-text", "trainer", ("trainer.deterministic=x",), ("'trainer.deterministic'",)),
    BadInput("trainer-callbacks-reserved", "trainer", ("trainer.callbacks=[]",), ("'trainer.callbacks'",)),
    BadInput("trainer-key-unknown", "trainer", ("trainer.max_stepz=3",), ("'trainer.max_stepz'",)),
    BadInput("num-nodes-zero", "trainer", ("trainer.num_nodes=0",), ("'trainer.num_nodes'",)),
    BadInput("benchmark-int", "trainer", ("trainer.benchmark=3",), ("'trainer.benchmark'",)),
    BadInput("min-steps-text", "trainer", ("trainer.min_steps=a",), ("'trainer.min_steps'",)),
    BadInput("detect-anomaly-text", "trainer", ("trainer.detect_anomaly=sometimes",), ("'trainer.detect_anomaly'",)),
    BadInput("clip-algorithm-unknown", "trainer", ("trainer.gradient_clip_algorithm=x",),
             ("'trainer.gradient_clip_algorithm'",)),
    BadInput("profiler-unknown", "trainer", ("trainer.profiler=x",), ("'trainer.profiler'",)),
    BadInput("run-without-end", "trainer", ("budget.max_layer_tokens=null", "trainer.max_steps=-1"), ("no end",)),
    # callbacks against the model they patch (4 blocks, sequences of 32 cut down to 8 by the warmup)
    BadInput("layers-out-of-range", "callbacks", (f"{_CB_LTD}.layers=[1,9]",), (f"'{_CB_LTD}'", "block index 9")),
    BadInput("layers-duplicate", "callbacks", (f"{_CB_LTD}.layers=[1,1]",), (f"'{_CB_LTD}'", "duplicate")),
    BadInput("layers-negative", "callbacks", (f"{_CB_LTD}.layers=[-1]",), (f"'{_CB_LTD}'", "negative")),
    BadInput("layers-empty", "callbacks", (f"{_CB_LTD}.layers=[]",), (f"'{_CB_LTD}'", "at least one")),
    BadInput("layers-text", "callbacks", (f"{_CB_LTD}.layers=abc",), (f"'{_CB_LTD}'", "layers")),
    BadInput("keep-beyond-the-cut-length", "callbacks", (f"{_CB_LTD}.keep_positions=[12]",),
             (f"'{_CB_LTD}'", "keep_positions")),
    BadInput("keep-beyond-the-sequence", "callbacks", (f"{_CB_LTD}.keep_positions=[40]", "variant=random_ltd"),
             (f"'{_CB_LTD}'", "keep_positions")),
    BadInput("keep-duplicate", "callbacks", (f"{_CB_LTD}.keep_positions=[0,0]",), (f"'{_CB_LTD}'", "duplicates")),
    BadInput("keep-negative", "callbacks", (f"{_CB_LTD}.keep_positions=[-1]",), (f"'{_CB_LTD}'", "keep_positions")),
    BadInput("min-tokens-whole-sequence", "callbacks", (f"{_CB_LTD}.min_tokens=32",), (f"'{_CB_LTD}'", "min_tokens")),
    BadInput("max-tokens-beyond-sequence", "callbacks", (f"{_CB_LTD}.max_tokens=64",), (f"'{_CB_LTD}'", "max_tokens")),
    BadInput("min-tokens-below-kept", "callbacks", (f"{_CB_LTD}.min_tokens=1", f"{_CB_LTD}.keep_positions=[0,1]"),
             (f"'{_CB_LTD}'", "keep_positions")),
    BadInput("min-len-whole-sequence", "callbacks", ("callbacks[0].init_args.min_len=32",),
             ("'callbacks[0].init_args'", "min_len")),
    BadInput("max-len-beyond-sequence", "callbacks", ("callbacks[0].init_args.max_len=64",),
             ("'callbacks[0].init_args'", "max_len")),
    BadInput("warmup-mode-unknown", "callbacks", ("callbacks[0].init_args.mode=fold",),
             ("'callbacks[0].init_args'", "mode")),
    BadInput("schedule-type-unknown", "callbacks", (f"{_CB_LTD}.schedule_type=fixed_cubic",),
             (f"'{_CB_LTD}'", "schedule_type")),
    BadInput("root-degree-linear", "callbacks", (f"{_CB_LTD}.root_degree=2",), (f"'{_CB_LTD}'", "root_degree")),
    BadInput("seq-per-step-zero", "callbacks", (f"{_CB_LTD}.seq_per_step=0",), (f"'{_CB_LTD}'", "seq_per_step")),
    BadInput("callback-arg-unknown", "callbacks", (f"{_CB_LTD}.min_tokenz=3",), (f"'{_CB_LTD}.min_tokenz'",)),
    BadInput("callback-class-missing", "callbacks", ("callbacks[1].class_path=lightning_dataeff.callbacks.Nope",),
             ("'callbacks[1].class_path'",)),
    BadInput("callback-class-not-callback", "callbacks", ("callbacks[1].class_path=collections.OrderedDict",),
             ("'callbacks[1].class_path'",)),
    BadInput("curriculum-max-beyond-sequence", "callbacks", (_CL_SEQLEN % 64,),
             ("'callbacks[0].init_args'", "max_difficulty")),
    BadInput("curriculum-needs-analysis", "callbacks", (_CL_BASED,), ("'callbacks[0].init_args'", "analysis")),
    BadInput("curriculum-metric-bad", "callbacks",
             ("callbacks[0]={class_path: lightning_dataeff.callbacks.CurriculumLearning, init_args: {metrics: "
              "{seqlen: {difficulty_type: nope}}}}",), ("'callbacks[0].init_args'", "difficulty_type")),
    BadInput("warmup-on-images", "callbacks",
             ("callbacks=[{class_path: lightning_dataeff.callbacks.SeqLengthWarmup, init_args: {min_len: 8, "
              "duration: 4}}]",), ("'callbacks[0].init_args'", "images"), base="vit"),
    BadInput("vit-keep-beyond-tokens", "callbacks", ("callbacks[0].init_args.keep_positions=[65]",),
             ("'callbacks[0].init_args'", "keep_positions"), base="vit"),
    BadInput("vit-layers-out-of-range", "callbacks", ("callbacks[0].init_args.layers=[6]",),
             ("'callbacks[0].init_args'", "block index 6"), base="vit"),
    # the model config against itself and the data
    BadInput("positions-below-seq-len", "model", ("model.config.n_positions=16",), ("'model.config.n_positions'",)),
    BadInput("heads-not-dividing-width", "model", ("model.config.n_head=5",), ("'model.config.n_head'",)),
    BadInput("no-blocks", "model", ("model.config.n_layer=0",), ("'model.config.n_layer'",)),
    BadInput("width-zero", "model", ("model.config.n_embd=0",), ("'model.config.n_embd'",)),
    BadInput("config-key-typo", "model", ("model.config.n_layers=2",), ("'model.config.n_layers'", "n_layer")),
    BadInput("pretrained-name-malformed", "model", ("model.pretrained='a b/c'",), ("'model.pretrained'", "Repo id")),
    BadInput("vocab-below-tokenizer", "model", ("model.config.vocab_size=100",), ("'model.config.vocab_size'",)),
    BadInput("dropout-above-1", "model", ("model.config.resid_pdrop=1.5",), ("'model.config.resid_pdrop'",)),
    BadInput("inner-negative", "model", ("model.config.n_inner=-1",), ("'model.config.n_inner'",)),
    BadInput("positions-text", "model", ("model.config.n_positions=abc",), ("'model.config.n_positions'",)),
    BadInput("vit-patch-beyond-image", "model", ("model.config.patch_size=32",), ("'model.config.patch_size'",),
             base="vit"),
    BadInput("vit-heads-not-dividing", "model", ("model.config.num_attention_heads=5",),
             ("'model.config.num_attention_heads'",), base="vit"),
    BadInput("vit-no-blocks", "model", ("model.config.num_hidden_layers=0",),
             ("'model.config.num_hidden_layers'",), base="vit"),
    BadInput("vit-image-size-mismatch", "model", ("model.config.image_size=32",), ("'model.config.image_size'",),
             base="vit"),
    # data
    BadInput("source-missing", "data", ("data.source=/nonexistent/corpus",), ("'data.source'",)),
    BadInput("source-empty-folder", "data", ("data.source={tmp}/empty",), ("'data.source'", "no .txt"),
             files="empty_dir"),
    BadInput("seq-len-beyond-text", "data", ("data.seq_len=100000", "callbacks[0].init_args.max_len=null",
                                             f"{_CB_LTD}.max_tokens=null", "model.config.n_positions=100000"),
             ("'data.seq_len'",)),
    BadInput("batch-beyond-dataset", "data", ("data.batch_size=100000",), ("'data.batch_size'",)),
    BadInput("vocab-too-small", "data", ("data.vocab_size=100",), ("'data.vocab_size'",)),
    BadInput("hub-source-no-name", "data", ("data.source=hf:",), ("'data.source'",)),
    BadInput("max-val-zero", "data", ("data.max_val_samples=0",), ("'data.max_val_samples'",)),
    BadInput("val-batch-zero", "data", ("data.val_batch_size=0",), ("'data.val_batch_size'",)),
    BadInput("workers-negative", "data", ("data.num_workers=-1",), ("'data.num_workers'",)),
    BadInput("text-not-utf8", "data", ("data.source={tmp}/text",), ("'data.source'", "bad.txt", "UTF-8"),
             files="text_bad_utf8"),
    BadInput("text-binary", "data", ("data.source={tmp}/text",), ("'data.source'", "bin.txt", "binary"),
             files="text_binary"),
    BadInput("image-corrupt", "data", ("data.source={tmp}/img", "data.num_channels=3"), ("'data.source'", "broken.png"),
             base="vit", files="images_corrupt"),
    BadInput("images-one-class", "data", ("data.source={tmp}/img",), ("'data.source'", "one class"), base="vit",
             files="images_one_class"),
    BadInput("images-empty-class", "data", ("data.source={tmp}/img",), ("'data.source'", "class9"), base="vit",
             files="images_empty_class"),
    BadInput("image-source-a-file", "data", ("data.source={tmp}/file.txt",), ("'data.source'",), base="vit",
             files="a_file"),
    BadInput("vit-channels-2", "data", ("data.num_channels=2",), ("'data.num_channels'",), base="vit"),
    BadInput("vit-image-size-zero", "data", ("data.image_size=0",), ("'data.image_size'",), base="vit"),
    BadInput("cache-dir-a-file", "data", ("data.cache_dir={tmp}/file.txt",), ("'data.cache_dir'",), files="a_file"),
    # output_dir
    BadInput("output-dir-is-a-file", "output_dir", ("output_dir={tmp}/file.txt",), ("'output_dir'", "file"),
             files="a_file"),
    BadInput("output-dir-under-a-file", "output_dir", ("output_dir={tmp}/file.txt/run",), ("'output_dir'",),
             files="a_file"),
    BadInput("output-dir-read-only", "output_dir", ("output_dir=/sys/dataeff-run",), ("'output_dir'", "cannot write"),
             skip="sys_writable"),
    BadInput("output-dir-holds-a-run", "output_dir", (), ("'output_dir'", "resume=true"), files="earlier_run"),
    BadInput("output-dir-in-use", "output_dir", (), ("'output_dir'", "in use", "pid"), files="live_lock"),
    BadInput("compare-report-dir-is-a-file", "output_dir", ("compare.output_dir={tmp}/file.txt",),
             ("'compare.output_dir'", "file"), files="a_file", command="compare"),
    BadInput("compare-output-dir-flag-is-a-file", "output_dir", ("--output-dir", "{tmp}/file.txt"),
             ("'--output-dir'", "file"), files="a_file", command="compare"),
    BadInput("resume-all-checkpoints-corrupt", "output_dir", ("resume=true",), ("'resume'", "intact"),
             files="corrupt_checkpoints"),
    # DeepSpeed configs against the model
    BadInput("shipped-ds-config-on-tiny-model", "deepspeed",
             ("{gpt2}", "output_dir={tmp}/run", "--deepspeed-config", "{ds}"),
             ("gpt2-ptb-ds_config.json", "total_layer_num is 12 but the model has 6"), base="none"),
    BadInput("ds-total-layers", "deepspeed", ("--deepspeed-config", "{tmp}/ds.json"), ("ds.json", "total_layer_num"),
             files="ds_total_layers"),
    BadInput("ds-layer-ids-out-of-range", "deepspeed", ("--deepspeed-config", "{tmp}/ds.json"),
             ("ds.json", "block index 7"), files="ds_ids_out_of_range"),
    BadInput("ds-nan", "deepspeed", ("--deepspeed-config", "{tmp}/ds.json"), ("ds.json", "min_value"),
             files="ds_nan"),
    BadInput("ds-top-level-list", "deepspeed", ("--deepspeed-config", "{tmp}/ds.json"), ("ds.json", "JSON object"),
             files="ds_list"),
    BadInput("ds-layer-num-mismatch", "deepspeed", ("--deepspeed-config", "{tmp}/ds.json"),
             ("ds.json", "random_ltd_layer_num"), files="ds_layer_num"),
    BadInput("ds-enabled-text", "deepspeed", ("--deepspeed-config", "{tmp}/ds.json"), ("ds.json", "enabled"),
             files="ds_enabled_string"),
    # analyze
    BadInput("analyze-output-a-file", "output_dir", ("{gpt2}", "output_dir={tmp}/file.txt"), ("'output_dir'",),
             base="none", files="a_file", command="analyze"),
    BadInput("analyze-images", "structure", ("{vit}",), ("'task'",), base="none", command="analyze"),
]
