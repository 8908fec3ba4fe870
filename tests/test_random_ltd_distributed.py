"""RandomLTD + TokenBudget with 2 CPU processes (gloo): DDP and FSDP2 (ModelParallelStrategy + fully_shard)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "rltd_ddp.py"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_cpu_processes(mode, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), mode, str(tmp_path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    for r in (r0, r1):
        assert r["classes"] == [("FSDP" if mode == "fsdp2" else "") + "RandomLTDGPT2Block"]
        assert r["global_step"] == 2  # TokenBudget stopped both ranks at the layer-token budget
        assert r["local_tokens"] == 2 * 2 * 8  # 2 steps x B=2 x S=8 on this rank
        assert r["budget_tokens"] == 2 * r["local_tokens"]  # summed over both ranks
        assert r["budget_layer_tokens"] == 2 * r["local_layer_tokens"] == 2 * 2 * 2 * (8 * 2 + 2 * 2)
    assert r0["param_sum"] == r1["param_sum"]  # replicas agree
    assert r0["indices"] != r1["indices"]  # token sampling is seeded per rank
