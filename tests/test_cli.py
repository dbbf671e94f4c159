"""The `nvlm-d` command line, run as a user runs it: in subprocesses, on the seeded tiny checkpoint.

Where an answer can be predicted, the oracle is the model's own `chat` on the same checkpoint, in this process:
greedy decoding on the CPU in float32 is deterministic, so the CLI must print exactly what `chat` returns.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from transformers.utils import logging as hf_logging

from nvlm_d.cli import main
from nvlm_d.cli.batch import ResultLog
from nvlm_d.cli.common import TILE_SIZE, CLIError
from nvlm_d.cli.tiles import GRID_COLOR, PNG_GAP, PNG_HEADER, PNG_MARGIN
from nvlm_d.conversation import image_prompt
from nvlm_d.image_processing_nvlm_d import load_image

FAST = ["--max-new-tokens", "4"]
GREEDY4 = {"max_new_tokens": 4, "do_sample": False}


def cli_command(*args) -> list[str]:
    return [sys.executable, "-m", "nvlm_d.cli", *map(str, args)]


@pytest.fixture(scope="session")
def cli_env(tmp_path_factory) -> dict[str, str]:
    """The environment of every CLI run: a private cache (never the user's ~/.cache/nvlm_d), offline."""
    env = dict(os.environ)
    env["NVLM_D_CACHE"] = str(tmp_path_factory.mktemp("nvlm_d_cache"))
    env["HF_HUB_OFFLINE"] = "1"
    env.pop("NVLM_D_DEBUG", None)
    return env


class Cli:
    """Runs `python -m nvlm_d.cli ...`. `start` runs it in the background (two at a time, the machine's cores)
    and returns a Future: each run pays a few seconds of interpreter start-up (torch, transformers), so the
    module starts its independent runs at once and each test then checks its own."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="cli")

    def __call__(
        self, *args, input: str | None = None, env: dict | None = None, cwd=None
    ) -> subprocess.CompletedProcess:
        return subprocess.run(
            cli_command(*args), input=input, capture_output=True, text=True, env=env or self.env, cwd=cwd, timeout=300
        )

    def start(self, *args, **kwargs) -> Future:
        return self.pool.submit(self, *args, **kwargs)


@pytest.fixture(scope="module")
def cli(cli_env):
    runner = Cli(cli_env)
    yield runner
    runner.pool.shutdown(wait=True, cancel_futures=True)


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr


def draw_scene(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """A picture whose colour changes everywhere (and is never magenta), so misplaced tiles or lines would show."""
    width, height = size
    x, y = np.meshgrid(np.arange(width), np.arange(height))
    pixels = np.stack([x * 255 // width, y * 255 // height, (seed * 80 + (x + y) // 8) % 200], axis=-1)
    image = Image.fromarray(pixels.astype(np.uint8), "RGB")
    ImageDraw.Draw(image).ellipse([width * 0.3, height * 0.3, width * 0.6, height * 0.7], fill=(20, 200, 40))
    return image


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> Path:
    """scene.png: 1344x896 (a 3x2 grid at --max-num 6, 7 tiles); small.png: 600x400; broken.jpg: not an image."""
    directory = tmp_path_factory.mktemp("images")
    draw_scene((1344, 896)).save(directory / "scene.png")
    draw_scene((600, 400), seed=1).save(directory / "small.png")
    (directory / "broken.jpg").write_bytes(b"this is not a JPEG")
    return directory


# --------------------------------------------------------------------------------------------------------
# The module's CLI runs, started together (see `Cli`); each fixture sits above the tests that check it.
# --------------------------------------------------------------------------------------------------------


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def read_records(path: Path) -> list[dict]:
    text = path.read_text()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


@pytest.fixture(scope="module")
def help_run(cli) -> Future:
    """Through the installed console script, `nvlm-d` (pyproject's [project.scripts])."""
    script = shutil.which("nvlm-d", path=os.path.dirname(sys.executable)) or shutil.which("nvlm-d")
    if script is None:
        pytest.skip("the nvlm-d console script is not installed (pip install -e .)")
    return cli.pool.submit(subprocess.run, [script, "--help"], capture_output=True, text=True, env=cli.env, timeout=300)


@pytest.fixture(scope="module")
def demo_runs(cli, tmp_path_factory) -> tuple[Future, Path]:
    """`nvlm-d demo` twice on an empty cache: a Future of [first run, second run], and the cache directory."""
    cache = tmp_path_factory.mktemp("demo_cache")
    env = {**cli.env, "NVLM_D_CACHE": str(cache)}
    demo = ("demo", *FAST)
    return cli.pool.submit(lambda: [cli(*demo, env=env), cli(*demo, env=env)]), cache


@pytest.fixture(scope="module")
def chat_text_run(cli, tiny_checkpoint) -> Future:
    return cli.start("chat", "--model", tiny_checkpoint, *FAST, "Hello, who are you?")


@pytest.fixture(scope="module")
def chat_images_run(cli, tiny_checkpoint, images) -> Future:
    return cli.start(
        "chat",
        "--model",
        tiny_checkpoint,
        *FAST,
        "--image",
        images / "scene.png",
        "--image",
        images / "small.png",
        "Compare them.",
    )


@pytest.fixture(scope="module")
def interactive_run(cli, tiny_checkpoint, images) -> Future:
    script = (
        f"/image {images / 'scene.png'}\n"
        "What is it?\n"
        "And the colours?\n"
        "/reset\n"
        "And the colours?\n"
        "/quit\n"
        "This is never asked.\n"
    )
    return cli.start("chat", "--model", tiny_checkpoint, "--max-new-tokens", "8", input=script)


@pytest.fixture(scope="module")
def tiles_run(cli, images, tmp_path_factory) -> tuple[Future, Path]:
    out = tmp_path_factory.mktemp("tiles") / "tiles.png"
    return cli.start("tiles", images / "scene.png", "--out", out), out


@pytest.fixture(scope="module")
def batch_runs(cli, tiny_checkpoint, images, tmp_path_factory) -> tuple[Future, Path]:
    """A batch of three requests, then the same command again: Future of [run, rerun], and the output path."""
    directory = tmp_path_factory.mktemp("batch")
    (directory / "pics").mkdir()
    (directory / "pics" / "scene.png").write_bytes((images / "scene.png").read_bytes())
    requests = write_jsonl(
        directory / "requests.jsonl",
        [
            {"id": "text", "question": "Hello, who are you?"},
            {"id": 7, "image": "pics/scene.png", "question": "What is it?"},  # relative to requests.jsonl
            {
                "id": "two",
                "image": [str(images / "small.png"), "pics/scene.png"],
                "question": "Compare.",
                "max_new_tokens": 2,
            },
        ],
    )
    answers = directory / "answers.jsonl"
    command = ("batch", "--model", tiny_checkpoint, "--input", requests, "--output", answers, *FAST)

    def run_then_rerun():
        first = cli(*command, cwd=images)  # another working directory: relative paths follow the input file
        return [first, answers.read_bytes(), cli(*command)]

    return cli.pool.submit(run_then_rerun), answers


TORN_PREFIX = '{"id": 0, "answer": "zero", "seconds": 0.1}\n{"id": 1, "answer": "one", "seconds": 0.1}\n'


@pytest.fixture(scope="module")
def torn_run(cli, tiny_checkpoint, tmp_path_factory) -> tuple[Future, Path]:
    directory = tmp_path_factory.mktemp("torn")
    requests = write_jsonl(directory / "requests.jsonl", [{"id": k, "question": f"Question {k}?"} for k in range(3)])
    answers = directory / "answers.jsonl"
    answers.write_text(TORN_PREFIX + '{"id": 2, "answer": "tw')  # what kill -9 in the middle of a write leaves
    return cli.start("batch", "--model", tiny_checkpoint, "--input", requests, "--output", answers, *FAST), answers


@pytest.fixture(scope="module")
def bad_records_run(cli, tiny_checkpoint, images, tmp_path_factory) -> tuple[Future, Path]:
    directory = tmp_path_factory.mktemp("bad_records")
    requests = write_jsonl(
        directory / "requests.jsonl",
        [
            {"id": "ok-1", "question": "Hello?"},
            "{not json",
            {"question": "I have no id"},
            {"id": "ok-1", "question": "I reuse an id"},
            {"id": "no-question"},
            {"id": "missing-image", "image": "nowhere.png", "question": "What is it?"},
            {"id": "broken-image", "image": str(images / "broken.jpg"), "question": "What is it?"},
            {"id": "ok-2", "image": str(images / "small.png"), "question": "What is it?"},
        ],
    )
    answers = directory / "answers.jsonl"
    return cli.start("batch", "--model", tiny_checkpoint, "--input", requests, "--output", answers, *FAST), answers


@pytest.fixture(scope="module")
def unknown_subcommand_run(cli) -> Future:
    return cli.start("frobnicate")


@pytest.fixture(scope="module", autouse=True)
def _start_runs_early(
    help_run,
    demo_runs,
    chat_text_run,
    chat_images_run,
    interactive_run,
    tiles_run,
    batch_runs,
    torn_run,
    bad_records_run,
    unknown_subcommand_run,
):
    """Requests every run above, so that all of them are under way before the first test waits for one."""


# --------------------------------------------------------------------------------------------------------
# --help
# --------------------------------------------------------------------------------------------------------


def test_help_lists_every_subcommand(help_run):
    result = help_run.result()
    assert_ok(result)
    for command in ("demo", "chat", "tiles", "batch", "plan"):
        assert f"    {command} " in result.stdout


# --------------------------------------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------------------------------------


def answer_line(result: subprocess.CompletedProcess) -> str:
    return next(line for line in result.stdout.splitlines() if line.startswith("answer"))


def test_demo_prints_the_tiling_the_prompt_size_an_answer_and_timings(demo_runs):
    first, _ = demo_runs[0].result()
    assert_ok(first)
    lines = {line.split(maxsplit=1)[0]: line for line in first.stdout.splitlines() if line.strip()}
    # the 1600x900 sample at --max-num 6: 2x1 is the grid nearest 16:9 within 6 tiles
    assert "grid 2x1" in lines["tiling"] and "3 tiles" in lines["tiling"]
    assert "768 of them image tokens" in lines["prompt"]
    assert answer_line(first).split(maxsplit=1)[1:]  # a non-empty answer
    for part in ("load", "preprocess", "generate", "tokens/s"):
        assert part in lines["timings"]


def test_demo_says_the_weights_are_random_and_how_to_run_the_real_model(demo_runs):
    first, _ = demo_runs[0].result()
    assert "RANDOM weights" in first.stdout and "gibberish" in first.stdout
    assert 'nvlm-d chat --model nvidia/NVLM-D-72B --gpus 8 --image photo.jpg "Describe the image."' in first.stdout


def test_demo_builds_the_checkpoint_once_and_its_second_run_reuses_the_cache(demo_runs):
    (first, second), cache = demo_runs[0].result(), demo_runs[1]
    assert_ok(second)
    assert "built now" in first.stdout
    assert "built now" not in second.stdout and "(cached)" in second.stdout
    names = [path.name for path in cache.iterdir()]
    assert len([name for name in names if name.startswith("tiny-") and "-seed0-" in name]) == 1
    assert not [name for name in names if name.startswith(".tmp-")]  # no half-built leftovers
    assert answer_line(first) == answer_line(second)


# --------------------------------------------------------------------------------------------------------
# chat
# --------------------------------------------------------------------------------------------------------


def test_chat_one_shot_text_question_prints_exactly_the_models_answer(chat_text_run, tiny_model, tokenizer):
    result = chat_text_run.result()
    assert_ok(result)
    assert result.stdout == tiny_model.chat(tokenizer, None, "Hello, who are you?", GREEDY4) + "\n"


def test_chat_one_shot_with_two_images_numbers_them_and_stacks_their_tiles(
    chat_images_run, tiny_model, tokenizer, images
):
    result = chat_images_run.result()
    assert_ok(result)
    scene, small = load_image(images / "scene.png", max_num=6), load_image(images / "small.png", max_num=6)
    expected = tiny_model.chat(
        tokenizer,
        torch.cat([scene, small]),
        "Image-1: <image>\nImage-2: <image>\nCompare them.",
        GREEDY4,
        num_patches_list=[len(scene), len(small)],
    )
    assert result.stdout == expected + "\n"


def test_interactive_chat_keeps_history_attaches_images_resets_and_quits(
    interactive_run, tiny_model, tokenizer, images
):
    result = interactive_run.result()
    assert_ok(result)
    greedy8 = {"max_new_tokens": 8, "do_sample": False}
    scene = load_image(images / "scene.png", max_num=6)
    first, history = tiny_model.chat(tokenizer, scene, "<image>\nWhat is it?", greedy8, history=[], return_history=True)
    second = tiny_model.chat(tokenizer, scene, "And the colours?", greedy8, history=history)
    after_reset = tiny_model.chat(tokenizer, None, "And the colours?", greedy8, history=[])
    assert second != after_reset  # the history (and its image) changes the answer
    # streamed answers, one per question; nothing after /quit
    assert result.stdout == f"{first}\n{second}\n{after_reset}\n"
    assert "image 1 added" in result.stderr and "conversation cleared" in result.stderr


# --------------------------------------------------------------------------------------------------------
# tiles
# --------------------------------------------------------------------------------------------------------


def test_tiles_prints_grid_tile_count_and_exact_token_count(tiles_run, tokenizer):
    result = tiles_run[0].result()
    assert_ok(result)
    rows = {line.split(maxsplit=1)[0]: line for line in result.stdout.splitlines()}
    assert "3x2" in rows["grid"]
    assert rows["tiles"].split()[1] == "7" and "thumbnail" in rows["tiles"]
    tokens = len(tokenizer(image_prompt(7), add_special_tokens=False).input_ids)
    assert rows["tokens"].split()[1] == str(tokens) and f"{7 * 256} image tokens" in rows["tokens"]


def test_tiles_png_shows_the_resized_image_under_grid_lines_beside_the_thumbnail(tiles_run, images):
    assert_ok(tiles_run[0].result())
    picture = Image.open(tiles_run[1]).convert("RGB")
    cols, rows, s = 3, 2, TILE_SIZE
    assert picture.size == (2 * PNG_MARGIN + cols * s + PNG_GAP + s, PNG_HEADER + rows * s + PNG_MARGIN)
    pixels = picture.load()
    for c in range(cols + 1):  # vertical lines on every tile boundary, over the whole grid height
        x = PNG_MARGIN + c * s
        assert all(pixels[x, y] == GRID_COLOR for y in range(PNG_HEADER, PNG_HEADER + rows * s))
    for r in range(rows + 1):
        y = PNG_HEADER + r * s
        assert all(pixels[x, y] == GRID_COLOR for x in range(PNG_MARGIN, PNG_MARGIN + cols * s))
    # no line inside a tile
    assert not any(pixels[PNG_MARGIN + s // 2, y] == GRID_COLOR for y in range(PNG_HEADER + 40, PNG_HEADER + s - 4))
    # between the lines: the image resized to the grid, which the tiles are cut from; beside it: the thumbnail
    source = Image.open(images / "scene.png").convert("RGB")
    resized, thumbnail = source.resize((cols * s, rows * s)), source.resize((s, s))
    for x, y in [(s // 2, s // 2), (s + 100, s + 300), (2 * s + 400, 2 * s - 10), (5, 2 * s - 5)]:
        assert pixels[PNG_MARGIN + x, PNG_HEADER + y] == resized.getpixel((x, y))
    thumb_x = PNG_MARGIN + cols * s + PNG_GAP
    for x, y in [(s // 2, s // 2), (400, 400)]:
        assert pixels[thumb_x + x, PNG_HEADER + y] == thumbnail.getpixel((x, y))


# --------------------------------------------------------------------------------------------------------
# batch
# --------------------------------------------------------------------------------------------------------


def test_batch_answers_every_record_with_a_progress_bar(batch_runs, tiny_model, tokenizer, images):
    first, _, _ = batch_runs[0].result()
    assert_ok(first)
    records = read_records(batch_runs[1])
    assert [r["id"] for r in records] == ["text", 7, "two"]
    assert all(set(r) == {"id", "answer", "seconds"} for r in records)
    scene = load_image(images / "scene.png", max_num=6)
    assert records[1]["answer"] == tiny_model.chat(tokenizer, scene, "What is it?", GREEDY4)
    assert "req/s" in first.stderr  # tqdm's progress bar, with its throughput


def test_batch_rerun_on_a_finished_output_adds_nothing(batch_runs):
    _, content, rerun = batch_runs[0].result()
    assert_ok(rerun)
    assert batch_runs[1].read_bytes() == content
    assert "3 already in" in rerun.stderr


def test_batch_killed_mid_run_resumes_with_every_id_answered_exactly_once(cli, tiny_checkpoint, tmp_path):
    ids = [f"r{k:02d}" for k in range(30)]
    requests = write_jsonl(
        tmp_path / "requests.jsonl", [{"id": i, "question": f"Question {i}: tell me a long story."} for i in ids]
    )
    answers = tmp_path / "answers.jsonl"
    slow = subprocess.Popen(
        cli_command(
            "batch", "--model", tiny_checkpoint, "--input", requests, "--output", answers, "--max-new-tokens", "64"
        ),
        env=cli.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and slow.poll() is None:
            if answers.exists() and answers.read_bytes().count(b"\n") >= 3:
                break
            time.sleep(0.005)
        assert slow.poll() is None, "the batch ended before it could be killed: make it slower"
        os.kill(slow.pid, signal.SIGKILL)
    finally:
        if slow.poll() is None:
            os.kill(slow.pid, signal.SIGKILL)
        slow.wait()
    before = answers.read_bytes()
    assert 3 <= before.count(b"\n") < len(ids)

    resumed = cli("batch", "--model", tiny_checkpoint, "--input", requests, "--output", answers, *FAST)
    assert_ok(resumed)
    assert answers.read_bytes().startswith(before[: before.rfind(b"\n") + 1])  # complete records stay as they were
    records = read_records(answers)
    assert len(records) == len(ids)
    assert sorted(r["id"] for r in records) == ids  # every id, each once
    assert all("answer" in r for r in records)


def test_batch_cuts_a_half_written_last_line_before_resuming(torn_run):
    result = torn_run[0].result()
    assert_ok(result)
    assert torn_run[1].read_text().startswith(TORN_PREFIX)
    records = read_records(torn_run[1])
    assert [r["id"] for r in records] == [0, 1, 2]
    assert records[2]["answer"] != "tw"
    assert "half-written" in result.stderr


def test_bad_records_become_error_records_the_others_are_answered_and_the_exit_code_is_1(bad_records_run):
    result = bad_records_run[0].result()
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    records = read_records(bad_records_run[1])
    assert len(records) == 8  # one record per input line
    assert {r["id"] for r in records if "answer" in r} == {"ok-1", "ok-2"}
    errors = {r["line"]: r for r in records if "error" in r}
    assert set(errors) == {2, 3, 4, 5, 6, 7}
    assert errors[2]["id"] is None and "JSON" in errors[2]["error"]
    assert errors[3]["id"] is None and "no id" in errors[3]["error"]
    assert errors[4]["id"] is None and "duplicate id" in errors[4]["error"]  # so ids stay unique in the output
    assert errors[5]["id"] == "no-question" and "question" in errors[5]["error"]
    assert errors[6]["id"] == "missing-image" and "not found" in errors[6]["error"]
    assert errors[7]["id"] == "broken-image" and "cannot read image" in errors[7]["error"]
    ids = [r["id"] for r in records if r["id"] is not None]
    assert len(ids) == len(set(ids))


# --------------------------------------------------------------------------------------------------------
# Bad input: one line on stderr, a non-zero exit, no traceback
# --------------------------------------------------------------------------------------------------------


def assert_one_line_error(code: int, stderr: str, *words: str) -> None:
    assert code != 0
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nvlm-d: error: "), stderr
    for word in words:
        assert word in lines[0]


def test_unknown_subcommand_is_one_line_error(unknown_subcommand_run):
    result = unknown_subcommand_run.result()
    assert_one_line_error(result.returncode, result.stderr, "frobnicate")


# The other cases call `main` in this process: the same code from argv to exit code, without paying an
# interpreter start (torch, transformers) per case. An exception escaping `main` fails the test.


@pytest.fixture
def cli_main(capsys, cli_env, monkeypatch):
    """main(argv) -> (exit code, stderr), with argparse's exits caught as a process would end; the run's stdout
    is left in `cli_main.stdout`."""
    monkeypatch.setenv("NVLM_D_CACHE", cli_env["NVLM_D_CACHE"])
    verbosity, progress_bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()

    def run(*args) -> tuple[int, str]:
        capsys.readouterr()
        try:
            code = main([str(arg) for arg in args])
        except SystemExit as exc:
            code = exc.code
        captured = capsys.readouterr()
        run.stdout = captured.out
        return code, captured.err

    yield run
    # the CLI quiets transformers for its process; give the other tests of this session their logging back
    hf_logging.set_verbosity(verbosity)
    if progress_bars:
        hf_logging.enable_progress_bar()


def test_unknown_flag_is_one_line_error(cli_main, tiny_checkpoint):
    assert_one_line_error(*cli_main("chat", "--model", tiny_checkpoint, "--bogus", "Hi"), "--bogus")


def test_missing_batch_input_file_is_one_line_error(cli_main, tiny_checkpoint, tmp_path):
    code, stderr = cli_main(
        "batch", "--model", tiny_checkpoint, "--input", tmp_path / "none.jsonl", "--output", tmp_path / "answers.jsonl"
    )
    assert_one_line_error(code, stderr, "none.jsonl")
    assert not (tmp_path / "answers.jsonl").exists()


def test_model_path_without_config_json_is_one_line_error(cli_main, tmp_path):
    assert_one_line_error(*cli_main("chat", "--model", tmp_path, "Hi"), "not a model directory")


def test_unreadable_image_is_one_line_error(cli_main, tiny_checkpoint, images):
    assert_one_line_error(
        *cli_main("chat", "--model", tiny_checkpoint, "--image", images / "broken.jpg", "Hi"), "broken.jpg"
    )
    assert_one_line_error(*cli_main("tiles", images / "broken.jpg"), "broken.jpg")


def test_missing_image_is_one_line_error(cli_main, images):
    assert_one_line_error(*cli_main("tiles", images / "absent.png"), "not found")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_gpus_without_cuda_is_one_line_error(cli_main, tiny_checkpoint):
    assert_one_line_error(*cli_main("chat", "--model", tiny_checkpoint, "--gpus", "2", "Hi"), "CUDA")


def test_max_num_zero_is_one_line_error(cli_main, images):
    assert_one_line_error(*cli_main("tiles", images / "scene.png", "--max-num", "0"), "--max-num")


# --------------------------------------------------------------------------------------------------------
# batch, in-process: the parts a subprocess adds nothing to
# --------------------------------------------------------------------------------------------------------


def test_batch_retry_errors_replaces_error_records_by_answers(cli_main, tiny_checkpoint, images, tmp_path):
    requests = write_jsonl(
        tmp_path / "requests.jsonl",
        [
            {"id": "a", "question": "Hello?"},
            {"id": "b", "image": "late.png", "question": "What is it?"},
        ],
    )
    answers = tmp_path / "answers.jsonl"
    assert cli_main("batch", "--model", tiny_checkpoint, "--input", requests, "--output", answers, *FAST)[0] == 1
    assert "error" in read_records(answers)[1]
    (tmp_path / "late.png").write_bytes((images / "small.png").read_bytes())  # the missing image arrives

    code, stderr = cli_main("batch", "--model", tiny_checkpoint, "--input", requests, "--output", answers, *FAST)
    assert code == 1 and "0 to do" in stderr  # error records are final without --retry-errors
    code, _ = cli_main(
        "batch", "--model", tiny_checkpoint, "--input", requests, "--output", answers, *FAST, "--retry-errors"
    )
    assert code == 0
    records = read_records(answers)
    assert [r["id"] for r in records] == ["a", "b"] and all("answer" in r for r in records)


def test_a_second_batch_writer_on_the_same_output_is_refused(tmp_path):
    first = ResultLog(tmp_path / "answers.jsonl")
    try:
        with pytest.raises(CLIError, match="another process is writing"):
            ResultLog(tmp_path / "answers.jsonl")
    finally:
        first.close()


def test_batch_refuses_an_output_with_a_foreign_line_in_the_middle(tmp_path):
    answers = tmp_path / "answers.jsonl"
    answers.write_text('{"id": 1, "answer": "x", "seconds": 1}\nnot a record\n{"id": 2, "answer": "y", "seconds": 1}\n')
    with pytest.raises(CLIError, match="line 2 is not an nvlm-d batch record"):
        ResultLog(answers)
    assert answers.read_text().count("\n") == 3  # nothing was cut


# --------------------------------------------------------------------------------------------------------
# plan (in-process: it needs no model weights and no GPU)
# --------------------------------------------------------------------------------------------------------


def test_plan_without_gpus_finds_the_fewest_that_fit(cli_main):
    code, _ = cli_main("plan", "--gpu-memory", "80GB", "--dtype", "int8")
    out = cli_main.stdout
    assert code == 0
    assert "2 GPU(s) of 80GB" in out
    assert "vision_model" in out.splitlines()[3]  # GPU 0's row


def test_plan_that_does_not_fit_says_how_many_gpus_are_needed(cli_main):
    code, _ = cli_main("plan", "--gpus", "2", "--gpu-memory", "80GB", "--dtype", "bf16")
    assert code == 1
    assert "it needs 3 GPUs of 80GB" in cli_main.stdout


def test_plan_saves_a_device_map_that_from_pretrained_accepts(cli_main, tmp_path):
    from accelerate.utils import check_device_map

    from nvlm_d.device_map import build_meta_model

    code, _ = cli_main("plan", "--gpus", "3", "--gpu-memory", "80GB", "--save", tmp_path / "map.json")
    assert code == 0
    device_map = json.loads((tmp_path / "map.json").read_text())
    check_device_map(build_meta_model(), device_map)
    assert set(device_map.values()) == {0, 1, 2}


@pytest.mark.parametrize(
    "args, words",
    [
        (["--gpus", "0"], ["--gpus"]),
        (["--gpu-memory=-80GB"], ["--gpu-memory", "positive"]),
        (["--gpu-memory", "lots"], ["--gpu-memory", "lots"]),
        (["--dtype", "int3"], ["--dtype"]),
    ],
)
def test_plan_bad_arguments_are_one_line_errors(cli_main, args, words):
    assert_one_line_error(*cli_main("plan", *args), *words)


def test_plan_that_fits_no_gpu_count_says_so(cli_main):
    code, _ = cli_main("plan", "--gpu-memory", "1GB")
    assert code == 1
    assert "does not fit on any number of GPUs" in cli_main.stdout


def test_batch_answers_a_beam_search_request(cli_main, tiny_checkpoint, tiny_model, tokenizer, tmp_path):
    requests = write_jsonl(tmp_path / "requests.jsonl", [{"id": 1, "question": "Hello?", "num_beams": 2}])
    answers = tmp_path / "answers.jsonl"
    code, stderr = cli_main("batch", "--model", tiny_checkpoint, "--input", requests, "--output", answers, *FAST)
    assert code == 0, stderr
    expected = tiny_model.chat(tokenizer, None, "Hello?", {**GREEDY4, "num_beams": 2})
    assert read_records(answers)[0]["answer"] == expected


def test_interactive_chat_accepts_the_same_image_twice(cli_main, tiny_checkpoint, images, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("Compare them.\n/quit\n"))
    image = images / "scene.png"
    code, stderr = cli_main("chat", "--model", tiny_checkpoint, "--image", image, "--image", image, *FAST)
    assert code == 0, stderr
    assert "image 1 added" in stderr and "image 2 added" in stderr
