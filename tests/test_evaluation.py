"""The card's evaluation end to end on lmms-eval, offline: hand-made records in each dataset's schema as local
files (`--data-dir`), a model with fixed answers for exact expected scores, resuming after a kill, bad input, the
lmms-eval registration, and the card's command on the tiny checkpoint."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval", reason="the [eval] extra (lmms-eval) is not installed")

from eval_fixtures import ANSWERS, FixedAnswers, write_records  # noqa: E402
from PIL import Image  # noqa: E402

from nvlm_d.evaluation.runner import EvalRequest, run_evaluation  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG = REPO_ROOT / "eval" / "full_eval.yaml"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_records(tmp_path_factory.mktemp("eval_data"))


def _run(result_dir: Path, data_dir: Path, tasks: list[str], model, limit: int | None = None):
    request = EvalRequest(
        config_path=str(CONFIG),
        result_save_path=str(result_dir),
        tasks=tasks,
        data_dir=str(data_dir),
        batch_size=2,
        limit=limit,
        model=model,
        tokenizer=object(),
    )
    return run_evaluation(request)


@pytest.fixture(scope="module")
def fixed_run(tmp_path_factory, data_dir):
    result_dir = tmp_path_factory.mktemp("fixed_run")
    model = FixedAnswers()
    collected = _run(result_dir, data_dir, ["chartqa", "textvqa", "chartqa", "ocrbench", "mmmu", "docvqa_test"], model)
    return result_dir, {result.name: result for result in collected}, model


def test_fixed_answers_give_the_expected_scores_in_both_profiles(fixed_run):
    _, results, _ = fixed_run
    assert results["chartqa"].scores == pytest.approx({"nvlm": 200 / 3, "standard": 100 / 3})
    assert results["textvqa"].scores == pytest.approx({"nvlm": 200 / 3, "standard": 60.0})
    assert results["ocrbench"].scores == {"nvlm": 2.0, "standard": 1.0}
    assert results["mmmu"].scores == {"nvlm": 50.0, "standard": 50.0}


def test_duplicate_task_names_run_once(fixed_run):
    result_dir, results, model = fixed_run
    assert list(results) == ["chartqa", "textvqa", "ocrbench", "mmmu", "docvqa_test"]
    assert sum("Share of red?" in question for question in model.asked) == 1


def test_sample_records_keep_prompt_raw_output_cut_answer_and_scores(fixed_run):
    result_dir, _, _ = fixed_run
    records = [json.loads(line) for line in (result_dir / "samples" / "chartqa.jsonl").read_text().splitlines()]
    assert [record["doc_id"] for record in records] == [0, 1, 2]
    first = records[0]
    assert first["prompt"] == "Share of red?\nAnswer the question using a single word or phrase."
    assert first["raw_output"] == "45%\nbecause the bar says so"
    assert first["answer"] == "45%"
    assert (first["nvlm"], first["standard"]) == (1.0, 0.0)


def test_server_only_split_gets_a_submission_file_not_a_score(fixed_run):
    result_dir, results, _ = fixed_run
    assert results["docvqa_test"].scores == {"nvlm": None, "standard": None}
    submission = json.loads((result_dir / "submissions" / "docvqa_test.json").read_text())
    assert submission == [{"questionId": 101, "answer": "Annual Report"}]


def test_summary_table_and_chart(fixed_run):
    result_dir, _, _ = fixed_run
    summary = json.loads((result_dir / "summary.json").read_text())
    assert summary["tasks"]["chartqa"]["card"] == 86.0
    assert summary["tasks"]["chartqa"]["difference"]["standard"] == pytest.approx(100 / 3 - 86.0)
    table = (result_dir / "results.md").read_text()
    assert "| chartqa | test | 3 | 66.7 | 33.3 | 86.0 | -19.3 | -52.7 |" in table
    assert "| docvqa_test | test | 1 | server | server |" in table
    with Image.open(result_dir / "results.png") as chart:
        assert chart.format == "PNG" and chart.width > 300


class NoModel(FixedAnswers):
    def batch_chat(self, *args, **kwargs):
        raise AssertionError("a resumed run must not ask the model again")


def test_a_finished_run_resumes_without_asking_again(fixed_run, data_dir):
    result_dir, results, _ = fixed_run
    again = {r.name: r for r in _run(result_dir, data_dir, ["chartqa", "textvqa", "ocrbench", "mmmu"], NoModel())}
    assert again["chartqa"].scores == results["chartqa"].scores
    assert again["chartqa"].samples == 3


def test_another_models_answers_are_not_reused(tmp_path, data_dir):
    _run(tmp_path, data_dir, ["textvqa"], FixedAnswers())
    other = FixedAnswers()
    other.name_or_path = "another-model"
    _run(tmp_path, data_dir, ["textvqa"], other)
    assert len(other.asked) == 1


def test_a_killed_run_resumes_with_only_the_missing_answers(tmp_path, data_dir):
    first = FixedAnswers()
    _run(tmp_path, data_dir, ["chartqa"], first)
    journal = tmp_path / "answers" / "rank-0.jsonl"
    lines = journal.read_text().splitlines()
    journal.write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])  # killed while writing the second answer
    second = FixedAnswers()
    results = _run(tmp_path, data_dir, ["chartqa"], second)
    assert len(second.asked) == 2  # the first answer came from the journal, none twice
    assert results[0].samples == 3
    assert results[0].scores == pytest.approx({"nvlm": 200 / 3, "standard": 100 / 3})


def test_answers_journaled_after_a_torn_line_survive_the_next_resume(tmp_path):
    """A kill mid-write leaves a line without its end; the resumed run's answers must not be glued to it, or a
    second kill would make the run ask them again."""
    from nvlm_d.evaluation.journal import AnswerJournal

    AnswerJournal(tmp_path).add([("first", "45%")])
    with (tmp_path / "rank-0.jsonl").open("a") as journal:
        journal.write('{"key": "second", "ans')  # killed here
    resumed = AnswerJournal(tmp_path)
    assert resumed.get("first") == "45%" and resumed.get("second") is None
    resumed.add([("third", "10.4")])
    after_a_second_kill = AnswerJournal(tmp_path)
    assert after_a_second_kill.get("first") == "45%" and after_a_second_kill.get("third") == "10.4"


def test_unknown_task_name_is_a_clear_error(tmp_path, data_dir):
    with pytest.raises(ValueError, match=r"unknown task 'chartqaa'.*known: .*chartqa"):
        _run(tmp_path, data_dir, ["chartqaa"], FixedAnswers())


def test_missing_local_file_names_the_expected_path(tmp_path, data_dir):
    with pytest.raises(ValueError, match=r"realworldqa.*test\.jsonl"):
        _run(tmp_path, data_dir, ["realworldqa"], FixedAnswers())


def test_a_missing_file_under_the_environments_data_dir_names_the_variable_and_path(data_dir, monkeypatch):
    from nvlm_d.evaluation.local_data import with_environment_data_dir

    monkeypatch.setenv("NVLM_EVAL_DATA_DIR", str(data_dir))
    config = {"task": "nvlm_ai2d", "test_split": "test", "dataset_path": "lmms-lab-encoder/ai2d"}
    with pytest.raises(ValueError, match=r"^NVLM_EVAL_DATA_DIR: task 'ai2diagram' .*ai2diagram/test\.jsonl"):
        with_environment_data_dir(config)


def test_an_evaluation_keeps_pillow_strict_about_truncated_images():
    """lmms-eval's task module turns Pillow's tolerance of truncated images on for its whole process; the evaluation
    puts it back, so a truncated benchmark image is an error, not a partly grey picture scored as if whole. A fresh
    interpreter: in this one, lmms-eval was imported long ago."""
    code = (
        "from PIL import ImageFile\n"
        "from nvlm_d.evaluation.lmms_compat import import_lmms_eval\n"
        "import_lmms_eval()\n"
        "import lmms_eval.api.task, lmms_eval.evaluator\n"
        "print(ImageFile.LOAD_TRUNCATED_IMAGES)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-1] == "False"


def test_lmms_eval_finds_the_nvlm_d_model():
    """Through the installed entry point where the package is installed with its metadata (CI), else through the
    manifest the entry point names."""
    from importlib.metadata import entry_points

    from lmms_eval.models.registry_v2 import ModelRegistryV2

    from nvlm_d.evaluation.lmms_model import MANIFEST, NVLMD

    registry = ModelRegistryV2()
    if any(ep.name == "nvlm_d" for ep in entry_points(group="lmms_eval.models")):
        registry.load_entrypoint_manifests()
    else:
        registry.register_manifest(MANIFEST)
    assert registry.get_model_class("nvlm_d") is NVLMD
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    assert 'nvlm_d = "nvlm_d.evaluation.lmms_model:MANIFEST"' in pyproject


OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}


def _tiny_eval_options(
    checkpoint: Path, data: Path, result_dir: Path, limit: int = 3, batch_size: int = 2
) -> list[str]:
    return [
        "--result-save-path", str(result_dir), "--model", str(checkpoint), "--data-dir", str(data),
        "--limit", str(limit), "--batch-size", str(batch_size), "--device", "cpu",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def cards_command_run(tiny_checkpoint, data_dir, tmp_path_factory):
    """The card's command, uninterrupted, on the tiny checkpoint: (result directory, finished process)."""
    result_dir = tmp_path_factory.mktemp("cards_command")
    command = [
        sys.executable, "run_eval.py", "--config-path", "eval/full_eval.yaml",
        "--zero-shot-eval-tasks", "chartqa", "mmmu", "chartqa", "docvqa_test",
        *_tiny_eval_options(tiny_checkpoint, data_dir, result_dir),
    ]  # fmt: skip
    env = {**os.environ, **OFFLINE}
    return result_dir, subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1800)


def test_the_cards_command_runs_on_the_tiny_checkpoint(cards_command_run):
    result_dir, result = cards_command_run
    assert result.returncode == 0, result.stderr[-4000:]
    assert "| chartqa | test | 3 |" in result.stdout
    assert "| docvqa_test | test | 1 | server | server |" in result.stdout
    record = json.loads((result_dir / "samples" / "mmmu.jsonl").read_text().splitlines()[0])
    assert (
        record["prompt"]
        == "Which colour?\n(A) red\n(B) blue\n\nAnswer with the option's letter from the given choices directly."
    )
    assert record["answer"] == record["raw_output"].split("<|im_end|>")[0].strip().split("\n")[0].strip()


def _finished_answers(journal: Path) -> int:
    """The answers a journal holds in whole lines (a line still being written does not count)."""
    if not journal.is_file():
        return 0
    return len(journal.read_bytes().split(b"\n")[:-1])


def test_a_run_killed_with_sigkill_resumes_without_asking_finished_samples_again(
    cards_command_run, tiny_checkpoint, data_dir, tmp_path
):
    """`nvlm-d eval` (one sample a batch) killed with SIGKILL once its first window of batches (four ChartQA
    samples, which the backend reorders by cost) is journaled, then run again to the end. Until the kill, the fifth
    sample's image is a named pipe nobody writes: the first run blocks there, so the kill cannot come after the end.
    Before the second run the finished samples' images are deleted: asking the model about one of them again would
    fail naming its record."""
    data = shutil.copytree(data_dir, tmp_path / "data")
    chartqa = data / "chartqa"
    records = [json.loads(line) for line in (chartqa / "test.jsonl").read_text().splitlines()]
    for index in (3, 4):  # two more samples: the fifth lies past the first window of four
        shutil.copy(chartqa / "images" / f"{index - 3}.png", chartqa / "images" / f"{index}.png")
        records.append({**records[index - 3], "image": f"images/{index}.png"})
    (chartqa / "test.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    blocked = chartqa / "images" / "4.png"
    blocked.unlink()
    os.mkfifo(blocked)
    result_dir = tmp_path / "results"
    command = [
        sys.executable, "-m", "nvlm_d.cli", "eval", "--zero-shot-eval-tasks", "chartqa",
        *_tiny_eval_options(tiny_checkpoint, data, result_dir, limit=5, batch_size=1),
    ]  # fmt: skip
    env = {**os.environ, **OFFLINE}
    journal = result_dir / "answers" / "rank-0.jsonl"
    log = tmp_path / "killed.log"
    with log.open("w") as output:
        first = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=output, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 1800
    try:
        while _finished_answers(journal) < 4:
            assert first.poll() is None, f"the run ended before the kill:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, "the first window was not journaled in 1800 s"
            time.sleep(0.1)  # poll interval
    finally:
        first.kill()  # SIGKILL
        first.wait(timeout=1800)
    assert first.returncode == -signal.SIGKILL
    assert _finished_answers(journal) == 4 and not (result_dir / "summary.json").exists()

    blocked.unlink()
    shutil.copy(chartqa / "images" / "1.png", blocked)
    for index in range(4):
        (chartqa / "images" / f"{index}.png").unlink()
    second = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert second.returncode == 0, second.stderr[-4000:]

    keys = [json.loads(line)["key"] for line in journal.read_text().splitlines()]
    assert len(keys) == len(set(keys)) == 5  # four answers before the kill, one after, none asked twice
    samples = (result_dir / "samples" / "chartqa.jsonl").read_text().splitlines()
    assert [json.loads(line)["doc_id"] for line in samples] == [0, 1, 2, 3, 4]
    uninterrupted_dir, uninterrupted = cards_command_run
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-4000:]
    assert samples[:3] == (uninterrupted_dir / "samples" / "chartqa.jsonl").read_text().splitlines()
    summary = json.loads((result_dir / "summary.json").read_text())["tasks"]["chartqa"]
    assert summary["samples"] == 5


def _entry_point_path(directory: Path) -> str:
    """Where `python -m lmms_eval` finds the `nvlm_d` model: the installed package's entry point (CI installs it), or
    else, where this checkout is not installed with its metadata, the same entry point as pip would write it from
    pyproject.toml, as a distribution's metadata in `directory` (to put on PYTHONPATH)."""
    from importlib.metadata import entry_points

    import tomllib

    if any(entry.name == "nvlm_d" for entry in entry_points(group="lmms_eval.models")):
        return ""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    table = project["entry-points"]["lmms_eval.models"]
    metadata = directory / "nvlm_d_checkout-0.dist-info"
    metadata.mkdir(parents=True)
    (metadata / "METADATA").write_text("Metadata-Version: 2.1\nName: nvlm-d-checkout\nVersion: 0\n")
    lines = "".join(f"{name} = {target}\n" for name, target in table.items())
    (metadata / "entry_points.txt").write_text("[lmms_eval.models]\n" + lines)
    return str(directory)


def test_lmms_evals_own_command_runs_the_nvlm_d_model_on_local_data(
    cards_command_run, tiny_checkpoint, data_dir, tmp_path
):
    """`python -m lmms_eval --model nvlm_d --tasks nvlm_chartqa`, offline: the task pack through --include_path, the
    records through NVLM_EVAL_DATA_DIR. Its metrics and answers are those of the card's command on the same items
    (same batch of two)."""
    from nvlm_d.evaluation.runner import TASKS_DIR

    output = tmp_path / "output"
    command = [
        sys.executable, "-m", "lmms_eval", "--model", "nvlm_d",
        "--model_args", f"pretrained={tiny_checkpoint},device=cpu", "--tasks", "nvlm_chartqa",
        "--include_path", str(TASKS_DIR), "--limit", "2", "--batch_size", "2",
        "--output_path", str(output), "--log_samples",
    ]  # fmt: skip
    python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), _entry_point_path(tmp_path / "metadata")]))
    env = {**os.environ, **OFFLINE, "PYTHONPATH": python_path, "NVLM_EVAL_DATA_DIR": str(data_dir)}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-4000:]
    [results_file] = output.glob("*/*_results.json")
    results = json.loads(results_file.read_text())
    assert results["n-samples"]["nvlm_chartqa"] == {"original": 3, "effective": 2}
    [samples_file] = output.glob("*/*_samples_nvlm_chartqa.jsonl")
    samples = sorted((json.loads(line) for line in samples_file.read_text().splitlines()), key=lambda s: s["doc_id"])
    uninterrupted_dir, uninterrupted = cards_command_run
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-4000:]
    expected = [json.loads(line) for line in (uninterrupted_dir / "samples" / "chartqa.jsonl").read_text().splitlines()]
    for sample, record in zip(samples, expected[:2], strict=True):
        answer = sample.get("resps", sample["filtered_resps"])  # lmms-eval drops `resps` when it equals the filtered
        while isinstance(answer, list):
            [answer] = answer
        assert answer == record["raw_output"]
        assert (sample["nvlm"], sample["standard"]) == (record["nvlm"], record["standard"])
    metrics = results["results"]["nvlm_chartqa"]
    for profile in ("nvlm", "standard"):
        mean = 100.0 * sum(record[profile] for record in expected[:2]) / 2
        assert metrics[f"{profile},none"] == pytest.approx(mean)


def test_every_tasks_local_folder_is_named_as_the_card_names_it():
    from nvlm_d.evaluation.config import load_config
    from nvlm_d.evaluation.local_data import card_name

    for name, settings in load_config(CONFIG).tasks.items():
        assert card_name(settings.task) == name


def test_torchrun_two_processes_score_every_sample_once(fixed_run, data_dir, tmp_path):
    """Data parallel as lmms-eval does it (gloo, CPU): each rank answers its own share, rank 0 gathers; the same
    samples and scores as one process, none lost, none twice."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    script = REPO_ROOT / "tests" / "distributed" / "eval_data_parallel.py"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [*command, str(script), str(data_dir), str(tmp_path)], capture_output=True, text=True, timeout=1800, env=env
    )
    assert result.returncode == 0, result.stderr[-6000:]
    asked = [json.loads((tmp_path / f"asked-{rank}.json").read_text()) for rank in (0, 1)]
    assert asked[0] and asked[1]  # both ranks worked
    # Every question was asked; a rank with fewer documents also answers copies of its last request, which
    # lmms-eval adds to even the ranks out and drops before scoring (the sample files below hold each sample once).
    assert len(set(asked[0]) | set(asked[1])) == 3 + 1 + 2 + 2
    one_process_dir, one_process, _ = fixed_run
    summary = json.loads((tmp_path / "summary.json").read_text())["tasks"]
    for name in ("chartqa", "textvqa", "ocrbench", "mmmu"):
        assert summary[name]["samples"] == one_process[name].samples
        assert summary[name]["scores"] == pytest.approx(one_process[name].scores)
        assert (tmp_path / "samples" / f"{name}.jsonl").read_text() == (
            one_process_dir / "samples" / f"{name}.jsonl"
        ).read_text()


class _FakeOpenAI(http.server.BaseHTTPRequestHandler):
    """A loopback OpenAI chat-completions endpoint: records each request body, answers from ANSWERS."""

    bodies: list[dict] = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).bodies.append(body)
        text = body["messages"][-1]["content"][-1]["text"]
        answer = next(answer for key, answer in ANSWERS.items() if key in text)
        reply = {
            "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": answer}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }  # fmt: skip
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_openai_backend_sends_nvlm_prompts_and_scores_as_the_hf_backend(fixed_run, data_dir, tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeOpenAI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        request = EvalRequest(
            config_path=str(CONFIG),
            result_save_path=str(tmp_path),
            tasks=["chartqa", "mmmu"],
            data_dir=str(data_dir),
            backend="openai",
            base_url=f"http://127.0.0.1:{server.server_address[1]}/v1",
            served_model_name="nvlm-d",
        )
        results = {result.name: result for result in run_evaluation(request)}
    finally:
        server.shutdown()
        thread.join()
    _, one_process, _ = fixed_run
    assert results["chartqa"].scores == pytest.approx(one_process["chartqa"].scores)
    assert results["mmmu"].scores == pytest.approx(one_process["mmmu"].scores)
    body = next(body for body in _FakeOpenAI.bodies if "Share of red?" in json.dumps(body))
    assert body["model"] == "nvlm-d" and body["temperature"] == 0.0 and body["max_tokens"] == 16
    assert body["messages"][0] == {"role": "system", "content": "Answer the questions."}
    image, text = body["messages"][1]["content"]
    assert image["image_url"]["url"].startswith("data:image/png;base64,")
    assert text["text"] == "Share of red?\nAnswer the question using a single word or phrase."


def test_eval_help_and_argument_errors_import_no_heavy_library():
    probe = (
        "import contextlib, io, json, sys\n"
        "from nvlm_d.cli import main\n"
        "for argv in (['eval', '--help'], ['eval', '--result-save-path', 'r'], ['eval', '--bits', '3']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
        "        try:\n"
        "            main(argv)\n"
        "        except SystemExit:\n"
        "            pass\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'lmms_eval'})))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=1800, env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


def test_run_eval_reports_an_unknown_task_in_one_line(tmp_path):
    command = [sys.executable, "run_eval.py", "--result-save-path", str(tmp_path), "--zero-shot-eval-tasks", "chrtqa"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("run_eval.py: error: unknown task 'chrtqa'")


def test_summary_breaks_mmmu_down_by_subject_and_ocrbench_by_category(fixed_run):
    result_dir, _, _ = fixed_run
    tasks = json.loads((result_dir / "summary.json").read_text())["tasks"]
    assert tasks["mmmu"]["breakdown"] == {"Art": {"nvlm": 50.0, "standard": 50.0}}
    assert tasks["ocrbench"]["breakdown"] == {
        "Doc-oriented VQA": {"nvlm": 2.0, "standard": 1.0},
        "Regular Text Recognition": {"nvlm": 0.0, "standard": 0.0},
    }
