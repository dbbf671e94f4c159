"""`nvlm-d finetune` end to end under `torchrun --nproc-per-node 2` (gloo, CPU): a fine-tuned model that loads and
answers, and a run killed with SIGKILL after a checkpoint that, run again, ends with the weights of an uninterrupted
run."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CONVERSATIONS, write_conversations
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer

from nvlm_d.cli import main
from nvlm_d.training.trainer import COMPLETE_MARKER

pytest.importorskip("peft", reason="LoRA needs peft (pip install -e '.[train]')")

OUTER_LIMIT_S = 1200  # generous: a busy 2-core machine; a run takes about a minute
STEPS, SAVE_EVERY = 6, 2


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> Path:
    """Eight examples: two passes of the shared records, so that two ranks take 6 steps over two epochs."""
    return write_conversations(tmp_path_factory.mktemp("finetune_data"), CONVERSATIONS * 2)


def finetune_command(model: Path, data: Path, output: Path, *extra: str) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    return [
        *launcher,
        "-m",
        "nvlm_d.cli",
        "finetune",
        f"--model={model}",
        f"--data={data}",
        f"--output={output}",
        "--lora=4",
        "--freeze=vision",
        f"--max-steps={STEPS}",
        f"--save-steps={SAVE_EVERY}",
        "--logging-steps=1",
        "--lr=1e-3",
        "--workers=0",
        "--seed=7",
        *extra,
    ]


def run_to_the_end(command: list[str]) -> str:
    """Runs `command`; returns its output (stdout and stderr: progress, logs, the summary line)."""
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=OUTER_LIMIT_S)
    assert result.returncode == 0, f"nvlm-d finetune exited {result.returncode}:\n{result.stdout[-6000:]}"
    return result.stdout


def descendants(pid: int) -> list[int]:
    """The processes `pid` started, and theirs (torchrun starts each worker in a session of its own)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in map(int, (task / "children").read_text().split()):
            found += [child, *descendants(child)]
    return found


@pytest.fixture(scope="module")
def uninterrupted(tiny_checkpoint, records, tmp_path_factory) -> tuple[Path, str]:
    output = tmp_path_factory.mktemp("finetune_uninterrupted")
    log = run_to_the_end(finetune_command(tiny_checkpoint, records, output, f"--eval-data={records}", "--eval-steps=6"))
    return output, log


@pytest.mark.slow
def test_finetune_under_torchrun_writes_a_model_that_loads_and_answers(uninterrupted, tiny_checkpoint):
    output, log = uninterrupted
    assert "'eval_loss'" in log and f"trained {STEPS} steps" in log
    assert (output / "adapter" / "adapter_model.safetensors").is_file()
    base, tuned = load_file(tiny_checkpoint / "model.safetensors"), load_file(output / "model.safetensors")
    assert base.keys() == tuned.keys()  # the released names: adapters merged, no peft tensors
    changed = {name for name in base if not torch.equal(base[name], tuned[name])}
    assert "language_model.model.layers.0.self_attn.q_proj.weight" in changed and "mlp1.1.weight" in changed
    assert not [name for name in changed if name.startswith("vision_model.")]  # --freeze vision
    model = AutoModel.from_pretrained(output, trust_remote_code=True, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(output)
    answer = model.chat(tokenizer, None, "Say hello.", {"max_new_tokens": 4, "do_sample": False})
    assert isinstance(answer, str)
    assert model.config.use_llm_lora == 0


@pytest.mark.slow
def test_a_run_killed_after_a_checkpoint_resumes_to_the_weights_of_an_uninterrupted_run(
    tiny_checkpoint, records, uninterrupted, tmp_path
):
    command = finetune_command(tiny_checkpoint, records, tmp_path)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # the workers' log lines arrive as they are written
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    seen = []
    try:
        # The log of step SAVE_EVERY + 1 comes after checkpoint-SAVE_EVERY was saved and marked complete.
        for line in process.stdout:
            seen.append(line)
            if sum(line.count("'loss'") for line in seen) > SAVE_EVERY:
                break
        assert process.poll() is None, "the run ended before it could be killed:\n" + "".join(seen)[-4000:]
        assert (tmp_path / f"checkpoint-{SAVE_EVERY}" / COMPLETE_MARKER).is_file()
    finally:
        for pid in [*descendants(process.pid), process.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        process.wait(timeout=OUTER_LIMIT_S)
    assert not (tmp_path / "model.safetensors").exists()  # it was killed mid-run

    log = run_to_the_end(command)
    assert f"resuming from {tmp_path / f'checkpoint-{SAVE_EVERY}'}" in log
    expected = load_file(uninterrupted[0] / "model.safetensors")
    resumed = load_file(tmp_path / "model.safetensors")
    assert expected.keys() == resumed.keys()
    different = [name for name in expected if not torch.equal(expected[name], resumed[name])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--qlora"], "give --lora R too"),
        (["--lora=4", "--qlora", "--fsdp"], "--qlora is not sharded"),
        (["--lora=4", "--freeze=vision,llm"], "needs the decoder or the vision tower unfrozen"),
        (["--freeze=vision,mlp1,llm"], "leaves nothing to train"),
        (["--save-total-limit=1"], "at least 2"),
    ],
)
def test_impossible_settings_are_one_line_errors(tiny_checkpoint, records, tmp_path, capsys, arguments, message):
    argv = ["finetune", f"--model={tiny_checkpoint}", f"--data={records}", f"--output={tmp_path}", *arguments]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_a_missing_data_file_is_named(tiny_checkpoint, tmp_path, capsys):
    missing = tmp_path / "none.jsonl"
    assert main(["finetune", f"--model={tiny_checkpoint}", f"--data={missing}", f"--output={tmp_path}"]) == 2
    assert f"--data {missing}: no such file" in capsys.readouterr().err


def refuse_to_load_the_model(monkeypatch) -> None:
    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("nvlm_d.training.finetune.load_model", load_model)


@pytest.mark.parametrize("where", ["the model", "inside it", "holding it"])
def test_an_output_that_is_inside_or_holds_the_model_is_refused(tiny_checkpoint, records, tmp_path, capsys, where):
    model = tiny_checkpoint
    if where == "holding it":  # a model that is a checkpoint-N folder of --output would be rotated away
        model = tmp_path / "checkpoint-500"
        model.symlink_to(tiny_checkpoint, target_is_directory=True)
        output = tmp_path
    else:
        output = tiny_checkpoint if where == "the model" else tiny_checkpoint / "tuned"
    before = sorted(path.name for path in tiny_checkpoint.iterdir())
    assert main(["finetune", f"--model={model}", f"--data={records}", f"--output={output}", "--lora=4"]) == 2
    assert "Choose a folder of its own" in capsys.readouterr().err
    assert sorted(path.name for path in tiny_checkpoint.iterdir()) == before


def test_the_data_is_checked_before_the_model_is_loaded(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    data = write_conversations(tmp_path, [CONVERSATIONS[0], {"image": "gone.png", "conversations": []}])
    refuse_to_load_the_model(monkeypatch)
    assert main(["finetune", f"--model={tiny_checkpoint}", f"--data={data}", f"--output={tmp_path / 'out'}"]) == 2
    assert "train.jsonl:2" in capsys.readouterr().err


def test_a_finished_run_run_again_is_a_no_op_that_says_so(tiny_checkpoint, conversations_file, tmp_path, monkeypatch):
    """Two steps of a four-step epoch: resumed from its last checkpoint, the Trainer would run a third."""
    argv = [
        "finetune", f"--model={tiny_checkpoint}", f"--data={conversations_file}", f"--output={tmp_path}",
        "--lora=4", "--max-steps=2", "--save-steps=1", "--workers=0", "--max-tiles=1", "--seed=7",
    ]  # fmt: skip
    summary = run_in_process(argv)
    assert "trained 2 steps, mean training loss " in summary
    weights = (tmp_path / "model.safetensors").read_bytes()
    checkpoints = sorted(path.name for path in tmp_path.glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-1", "checkpoint-2"]

    refuse_to_load_the_model(monkeypatch)
    again = run_in_process(argv)
    assert "already holds this finished run: 2 steps (--max-steps 2); nothing to do" in again
    assert sorted(path.name for path in tmp_path.glob("checkpoint-*")) == checkpoints
    assert (tmp_path / "model.safetensors").read_bytes() == weights

    # stopped while writing the model: run again, the model is written from the last checkpoint, nothing trained
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "finetune_run.json").unlink()
    shutil.rmtree(tmp_path / "adapter")
    assert "its model was not written: writing it now" in run_in_process(argv)
    assert sorted(path.name for path in tmp_path.glob("checkpoint-*")) == checkpoints
    assert (tmp_path / "model.safetensors").read_bytes() == weights
    assert "nothing to do" in run_in_process(argv)


def run_in_process(argv: list[str]) -> str:
    """`nvlm-d ARGV` in this process (no launcher); its status lines (stderr), which must say it succeeded."""
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    assert code == 0, err.getvalue()[-4000:]
    return err.getvalue()
