"""Every bad input of the table in ``tests/bad_inputs.py``, through ``dataeff``: exit 2, one line, the key named,
no traceback, nothing trained."""

from __future__ import annotations

import lightning  # noqa: F401  (imported outside capsys: its log handler must not hold a test's closed stream)
import pytest
from bad_inputs import CASES, FILES, SKIPS

from lightning_dataeff.cli import main

pytestmark = pytest.mark.usefixtures("recipe_env")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_exits_2_with_one_line_naming_the_key(case, tmp_path, capsys):
    if case.skip and SKIPS[case.skip]():
        pytest.skip(f"does not apply here ({case.skip})")
    if case.files:
        FILES[case.files](tmp_path)
    code = main(case.argv(tmp_path))
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.startswith("dataeff: error:")]
    assert code == 2, err
    assert "Traceback" not in err and len(lines) == 1, err
    for needle in case.needles:
        assert needle in lines[0], lines[0]
    assert not (tmp_path / "run" / "metrics.csv").exists() or case.files in ("earlier_run", "corrupt_checkpoints")
