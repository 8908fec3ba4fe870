"""output_dir checks, the run lock and the choice of a checkpoint to resume from (no training here)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import warnings
import zipfile

import pytest
import torch

from lightning_dataeff.recipes import RecipeError
from lightning_dataeff.recipes.rundir import (
    LOCK_NAME,
    RunLock,
    check_output_dir,
    checkpoint_problem,
    choose_checkpoint,
)


def _ckpt(path, step):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {"w": torch.arange(4096.0)}, "global_step": step}, path)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_new_or_empty_output_dir_is_fine_and_nothing_is_created(tmp_path):
    assert check_output_dir(tmp_path / "a" / "b", resume=False) == tmp_path / "a" / "b"
    assert not (tmp_path / "a").exists()
    (tmp_path / "empty").mkdir()
    check_output_dir(tmp_path / "empty", resume=False)
    assert list(tmp_path.iterdir()) == [tmp_path / "empty"] and not list((tmp_path / "empty").iterdir())


def test_other_files_do_not_make_a_run(tmp_path):
    (tmp_path / "analysis").mkdir()  # dataeff analyze writes here before a curriculum fit
    check_output_dir(tmp_path, resume=False)


@pytest.mark.parametrize("name", ["metrics.csv", "summary.json", "config.yaml", "checkpoints", "logs"])
def test_an_earlier_run_needs_resume(name, tmp_path):
    (tmp_path / name).mkdir()
    with pytest.raises(RecipeError, match=f"holds an earlier run \\({name}\\).*resume=true or choose a new"):
        check_output_dir(tmp_path, resume=False)
    check_output_dir(tmp_path, resume=True)


def test_a_live_lock_refuses_and_a_stale_one_does_not(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname()}))
    check_output_dir(tmp_path, resume=True)  # stale: the process is gone
    with pytest.warns(UserWarning, match="stale lock"):
        with RunLock(tmp_path):
            with pytest.raises(RecipeError, match=r"in use by another run, pid \d+"):
                check_output_dir(tmp_path, resume=True)
            with pytest.raises(RecipeError, match="in use"):
                RunLock(tmp_path).acquire()
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_lock_from_another_host_is_respected(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere"}))
    with pytest.raises(RecipeError, match="host elsewhere.*delete it if that run is gone"):
        check_output_dir(tmp_path, resume=True)


def test_intact_checkpoints_resume_from_the_newest(tmp_path):
    _ckpt(tmp_path / "checkpoints" / "step2.ckpt", 2)
    _ckpt(tmp_path / "checkpoints" / "last.ckpt", 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert choose_checkpoint(tmp_path).name == "last.ckpt"


def test_no_checkpoint_folder_means_none(tmp_path):
    assert choose_checkpoint(tmp_path) is None


def _flip_a_data_byte(path):
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.file_size > 1000)
    data = bytearray(path.read_bytes())
    data[info.header_offset + 200] ^= 0xFF  # inside the member's stored data, past its local header
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage, why",
    [
        (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "not a checkpoint archive"),
        (lambda p: p.write_bytes(b""), "empty file"),
        (lambda p: p.write_bytes(bytes(range(256)) * 8), "not a checkpoint archive"),
        (_flip_a_data_byte, "CRC mismatch"),
        (lambda p: torch.save({"weights": 1}, p), "not a Lightning checkpoint"),
    ],
    ids=["truncated", "empty", "random-bytes", "bit-flip", "not-lightning"],
)
def test_a_corrupt_newest_checkpoint_falls_back_with_a_warning_naming_both(damage, why, tmp_path):
    _ckpt(tmp_path / "checkpoints" / "step2.ckpt", 2)
    _ckpt(tmp_path / "checkpoints" / "last.ckpt", 3)
    damage(tmp_path / "checkpoints" / "last.ckpt")
    assert checkpoint_problem(tmp_path / "checkpoints" / "last.ckpt")[0].startswith(why)
    with pytest.warns(UserWarning, match=rf"last\.ckpt \({why}.*resuming from .*step2\.ckpt \(step 2\)"):
        assert choose_checkpoint(tmp_path).name == "step2.ckpt"


def test_only_corrupt_checkpoints_is_a_one_line_error(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"junk")
    with pytest.raises(RecipeError, match=r"'resume': no intact checkpoint.*last\.ckpt") as info:
        choose_checkpoint(tmp_path)
    assert "\n" not in str(info.value)
