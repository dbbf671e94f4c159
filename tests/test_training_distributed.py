"""Training on two processes with real engines (torchrun, gloo, CPU): DDP with text-only examples, FSDP2 with the
model's own shard plan, DeepSpeed ZeRO-3 with the shipped config. The workers are the scripts in tests/distributed/;
each writes a JSON report that the test reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent / "distributed"
OUTER_LIMIT_S = 1200  # generous: a busy 2-core machine; the workers finish in about a minute


def torchrun(script: str, *args: object, nproc: int = 2) -> None:
    """`torchrun --standalone --nproc-per-node N script args` (a free port each time); fails with the workers'
    output when it does not exit 0."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [*command, str(SCRIPTS / script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=OUTER_LIMIT_S,
        env=env,
    )
    assert result.returncode == 0, f"torchrun {script} exited {result.returncode}:\n{result.stderr[-6000:]}"


def run_report(tmp_path: Path, script: str, *args: object) -> dict:
    report = tmp_path / "report.json"
    torchrun(script, *args, report)
    return json.loads(report.read_text())


@pytest.mark.slow
def test_text_only_examples_train_under_two_rank_ddp(tmp_path, tiny_checkpoint, conversations_file):
    ranks = run_report(tmp_path, "ddp_text_only.py", tiny_checkpoint, conversations_file)
    assert [rank["image_flags"] for rank in ranks] == [[1], [0]]  # rank 1 has only the dummy tile
    assert all(rank["losses"][1] < rank["losses"][0] for rank in ranks)
    assert ranks[0]["checksum"] == ranks[1]["checksum"]  # the same weights after averaged gradients


@pytest.mark.slow
def test_fsdp2_gradients_equal_those_of_one_process(tmp_path, tiny_checkpoint, conversations_file):
    report = run_report(tmp_path, "fsdp2_gradients.py", tiny_checkpoint, conversations_file)
    assert report["missing"] == []  # every parameter got a gradient, the vision tower's on the text-only rank too
    assert report["gradient_norm"] > 0
    assert report["max_relative_difference"] <= 1e-5
    sharded = report["sharded_modules"]
    assert "vision_model.encoder.layers.0" in sharded and "language_model.model.layers.1" in sharded


@pytest.mark.slow
def test_deepspeed_zero3_builds_the_model_partitioned_and_trains_two_steps(
    tmp_path, tiny_checkpoint, conversations_file
):
    pytest.importorskip("deepspeed", reason="needs DeepSpeed (pip install -e '.[deepspeed]')")
    report = run_report(tmp_path, "zero3_steps.py", tiny_checkpoint, conversations_file)
    assert report["partitioned_at_load"]
    assert len(report["losses"]) == 2 and all(loss == loss for loss in report["losses"])
    assert report["mlp1_moved"] > 0
