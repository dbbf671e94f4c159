"""The `nvlm-d` command line, on the seeded tiny checkpoint.

Most runs call `main(argv)` in this process: the same code from the argument list to the exit code, without an
interpreter start (torch, transformers) per run. A fresh `python -m nvlm_d.cli` runs where a fresh process is the
point: the console script, what `--help` imports, the first demo on an empty cache, `kill -9`, the Hub checks.

Where an answer can be predicted, the oracle is the model's own `chat` on the same checkpoint, in this process:
greedy decoding on the CPU in float32 is deterministic, so the CLI must print exactly what `chat` returns.

No test waits on the clock: a subprocess gets an outer limit of half an hour (a correct program on the slowest
machine stays far below it), and waits are on events (a process ending, a pipe being opened). A failure shows the
child's stderr.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import weakref
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from transformers import AutoModel, AutoTokenizer, GenerationConfig
from transformers.utils import logging as hf_logging

from nvlm_d.batch_inference import ResultLog, ResultLogError
from nvlm_d.batch_inference.planning import GROUP_BATCHES, LoadedRequest, plan_batches
from nvlm_d.batch_inference.prefetch import Prefetcher
from nvlm_d.cli import main
from nvlm_d.cli.tiles import GRID_COLOR, PNG_GAP, PNG_HEADER, PNG_MARGIN
from nvlm_d.configuration_nvlm_d import NVLM_D_Config
from nvlm_d.conversation import image_prompt
from nvlm_d.image_processing_nvlm_d import load_image
from nvlm_d.tiny import save_tiny_checkpoint

FAST = ["--max-new-tokens", "4"]
GREEDY4 = {"max_new_tokens": 4, "do_sample": False}
OUTER_LIMIT_S = 1800  # for a subprocess: only a hung program gets near it
TILE = NVLM_D_Config().force_image_size  # the tile side `nvlm-d tiles` draws, from the package's config


def cli_command(*args) -> list[str]:
    return [sys.executable, "-m", "nvlm_d.cli", *map(str, args)]


def run_process(command: list[str], env: dict[str, str], **kwargs) -> subprocess.CompletedProcess:
    """Run a command to its end (or the outer limit); a hung one fails with what it printed so far."""
    try:
        return subprocess.run(
            command, stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env, timeout=OUTER_LIMIT_S, **kwargs
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{command} still ran after {OUTER_LIMIT_S} s; stderr so far:\n{exc.stderr}")


@pytest.fixture(scope="session")
def cli_env(tmp_path_factory) -> dict[str, str]:
    """The environment of every CLI run: a private cache (never the user's ~/.cache/nvlm_d), offline."""
    env = dict(os.environ)
    env["NVLM_D_CACHE"] = str(tmp_path_factory.mktemp("nvlm_d_cache"))
    env["HF_HUB_OFFLINE"] = "1"
    env.pop("NVLM_D_DEBUG", None)
    return env


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


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def read_records(path: Path) -> list[dict]:
    text = path.read_text()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


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


def assert_one_line_error(code: int, stderr: str, *words: str) -> None:
    assert code != 0
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nvlm-d: error: "), stderr
    for word in words:
        assert word in lines[0]


# --------------------------------------------------------------------------------------------------------
# --help and start-up
# --------------------------------------------------------------------------------------------------------


def test_help_lists_every_subcommand(cli_env):
    """Through the installed console script, `nvlm-d` (pyproject's [project.scripts])."""
    script = shutil.which("nvlm-d", path=os.path.dirname(sys.executable)) or shutil.which("nvlm-d")
    if script is None:
        pytest.skip("the nvlm-d console script is not installed (pip install -e .)")
    result = run_process([script, "--help"], cli_env)
    assert_ok(result)
    for command in ("demo", "chat", "tiles", "batch", "plan", "web"):
        assert f"    {command} " in result.stdout


HEAVY_MODULES = ("torch", "transformers", "accelerate", "PIL", "numpy")

STARTUP_PROBE = textwrap.dedent(
    """
    import contextlib, io, json, sys
    from nvlm_d.cli import main

    loaded = {}
    for argv in json.loads(sys.argv[1]):
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            try:
                main(argv)
            except SystemExit:
                pass
        loaded[" ".join(argv)] = sorted({name.split(".")[0] for name in sys.modules} & set(sys.argv[2:]))
    print(json.dumps(loaded))
    """
)


def test_help_argument_errors_and_plan_parsing_import_no_heavy_library(cli_env):
    """What makes `nvlm-d --help` and a mistyped option answer at once: no torch, transformers, accelerate, PIL or
    numpy is imported before a command does its work."""
    argvs = [
        ["--help"],
        ["chat", "--help"],
        ["chat", "--model", "m", "--max-num", "0", "Hi"],
        ["tiles"],
        ["plan", "--gpu-memory", "lots"],
        ["plan", "--gpus", "0"],
        ["plan", "--strategy", "diagonal"],
        ["batch", "--model", "m", "--input", "r.jsonl"],
        ["serve", "--help"],
        ["web", "--help"],
        ["web", "--port", "0"],
        ["frobnicate"],
    ]
    result = run_process([sys.executable, "-c", STARTUP_PROBE, json.dumps(argvs), *HEAVY_MODULES], cli_env)
    assert_ok(result)
    assert json.loads(result.stdout) == {" ".join(argv): [] for argv in argvs}


def test_unknown_subcommand_is_one_line_error(cli_main):
    assert_one_line_error(*cli_main("frobnicate"), "frobnicate", "plan")


# --------------------------------------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("demo_cache")


@pytest.fixture(scope="module")
def first_demo(cli_env, demo_cache) -> subprocess.CompletedProcess:
    """`nvlm-d demo` on an empty cache, in a fresh process, as a new user runs it first."""
    return run_process(cli_command("demo", *FAST), {**cli_env, "NVLM_D_CACHE": str(demo_cache)})


def answer_line(stdout: str) -> str:
    return next(line for line in stdout.splitlines() if line.startswith("answer"))


def test_demo_prints_the_tiling_the_prompt_size_an_answer_and_timings(first_demo):
    assert_ok(first_demo)
    lines = {line.split(maxsplit=1)[0]: line for line in first_demo.stdout.splitlines() if line.strip()}
    # the 1600x900 sample at --max-num 6: 2x1 is the grid nearest 16:9 within 6 tiles
    assert "grid 2x1" in lines["tiling"] and "3 tiles" in lines["tiling"]
    assert "768 of them image tokens" in lines["prompt"]
    assert answer_line(first_demo.stdout).split(maxsplit=1)[1:]  # a non-empty answer
    for part in ("load", "preprocess", "generate", "tokens/s"):
        assert part in lines["timings"]


def test_demo_says_the_weights_are_random_and_how_to_run_the_real_model(first_demo):
    assert_ok(first_demo)
    assert "RANDOM weights" in first_demo.stdout and "gibberish" in first_demo.stdout
    hint = 'nvlm-d chat --model nvidia/NVLM-D-72B --gpus 8 --image photo.jpg "Describe the image."'
    assert hint in first_demo.stdout


def test_demo_builds_the_checkpoint_once_and_its_second_run_reuses_the_cache(
    first_demo, demo_cache, cli_main, monkeypatch
):
    assert_ok(first_demo)
    monkeypatch.setenv("NVLM_D_CACHE", str(demo_cache))
    code, stderr = cli_main("demo", *FAST)
    assert code == 0, stderr
    assert "built now" in first_demo.stdout
    assert "built now" not in cli_main.stdout and "(cached)" in cli_main.stdout
    names = [path.name for path in demo_cache.iterdir()]
    assert len([name for name in names if name.startswith("tiny-") and "-seed0-" in name]) == 1
    assert not [name for name in names if name.startswith(".tmp-")]  # no half-built leftovers
    assert answer_line(first_demo.stdout) == answer_line(cli_main.stdout)


def test_demo_rejects_a_file_that_is_not_an_image_before_loading_a_model(cli_main, tmp_path, monkeypatch):
    monkeypatch.setenv("NVLM_D_CACHE", str(tmp_path / "cache"))  # empty: building the tiny model would show
    (tmp_path / "notes.txt").write_text("not a picture")
    code, stderr = cli_main("demo", "--image", tmp_path / "notes.txt")
    assert_one_line_error(code, stderr, "cannot read image", "notes.txt")
    assert cli_main.stdout == "" and not (tmp_path / "cache").exists()


def test_demo_with_an_unwritable_nvlm_d_cache_says_to_point_it_elsewhere(cli_main, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("NVLM_D_CACHE", str(blocker / "cache"))  # under a file: no directory can be made there
    code, stderr = cli_main("demo", *FAST)
    assert_one_line_error(code, stderr, str(blocker / "cache"), "which NVLM_D_CACHE names")
    assert "set NVLM_D_CACHE" not in stderr


def test_demo_with_an_unwritable_default_cache_says_to_set_nvlm_d_cache(cli_main, tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    (home / ".cache").write_text("")  # a file where ~/.cache should be
    monkeypatch.delenv("NVLM_D_CACHE")
    monkeypatch.setenv("HOME", str(home))
    code, stderr = cli_main("demo", *FAST)
    assert_one_line_error(code, stderr, "set NVLM_D_CACHE to a directory you can write to")


# --------------------------------------------------------------------------------------------------------
# chat
# --------------------------------------------------------------------------------------------------------


def test_chat_one_shot_text_question_prints_exactly_the_models_answer(cli_main, tiny_checkpoint, tiny_model, tokenizer):
    code, stderr = cli_main("chat", "--model", tiny_checkpoint, *FAST, "Hello, who are you?")
    assert code == 0, stderr
    assert cli_main.stdout == tiny_model.chat(tokenizer, None, "Hello, who are you?", GREEDY4) + "\n"


def test_chat_one_shot_with_two_images_numbers_them_and_stacks_their_tiles(
    cli_main, tiny_checkpoint, tiny_model, tokenizer, images
):
    code, stderr = cli_main(
        "chat", "--model", tiny_checkpoint, *FAST, "--image", images / "scene.png", "--image", images / "small.png",
        "Compare them.",
    )  # fmt: skip
    assert code == 0, stderr
    scene, small = load_image(images / "scene.png", max_num=6), load_image(images / "small.png", max_num=6)
    expected = tiny_model.chat(
        tokenizer,
        torch.cat([scene, small]),
        "Image-1: <image>\nImage-2: <image>\nCompare them.",
        GREEDY4,
        num_patches_list=[len(scene), len(small)],
    )
    assert cli_main.stdout == expected + "\n"


def test_chat_tiles_images_at_the_tile_size_of_the_models_config(cli_main, images, tmp_path_factory):
    """A model whose tiles are 224 px (64 tokens each, not 448 and 256): the CLI takes both from its config."""
    checkpoint = save_tiny_checkpoint(
        tmp_path_factory.mktemp("tiny_224"), seed=0, vision_config={"image_size": 224}, force_image_size=224
    )
    model = AutoModel.from_pretrained(checkpoint, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    code, stderr = cli_main("chat", "--model", checkpoint, *FAST, "--image", images / "scene.png", "What is it?")
    assert code == 0, stderr
    pixel_values = load_image(images / "scene.png", input_size=224, max_num=6)
    assert cli_main.stdout == model.chat(tokenizer, pixel_values, "<image>\nWhat is it?", GREEDY4) + "\n"


def test_interactive_chat_keeps_history_attaches_images_resets_and_quits(
    cli_main, tiny_checkpoint, tiny_model, tokenizer, images, monkeypatch
):
    script = (
        f"/image {images / 'scene.png'}\n"
        "What is it?\n"
        "And the colours?\n"
        "/reset\n"
        "And the colours?\n"
        "/quit\n"
        "This is never asked.\n"
    )
    monkeypatch.setattr("sys.stdin", io.StringIO(script))
    code, stderr = cli_main("chat", "--model", tiny_checkpoint, "--max-new-tokens", "8")
    assert code == 0, stderr
    greedy8 = {"max_new_tokens": 8, "do_sample": False}
    scene = load_image(images / "scene.png", max_num=6)
    first, history = tiny_model.chat(tokenizer, scene, "<image>\nWhat is it?", greedy8, history=[], return_history=True)
    second = tiny_model.chat(tokenizer, scene, "And the colours?", greedy8, history=history)
    after_reset = tiny_model.chat(tokenizer, None, "And the colours?", greedy8, history=[])
    assert second != after_reset  # the history (and its image) changes the answer
    # streamed answers, one per question; nothing after /quit
    assert cli_main.stdout == f"{first}\n{second}\n{after_reset}\n"
    assert "image 1 added" in stderr and "conversation cleared" in stderr


class ChatProcess:
    """`nvlm-d chat` in a subprocess driven through pipes: questions in, streamed answers and status lines out."""

    def __init__(self, command: list[str], env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
        )
        self.stderr_lines: list[str] = []
        self._new_stderr = threading.Condition()
        threading.Thread(target=self._collect_stderr, daemon=True).start()

    def _collect_stderr(self) -> None:
        for line in self.process.stderr:
            with self._new_stderr:
                self.stderr_lines.append(line.decode())
                self._new_stderr.notify_all()
        with self._new_stderr:
            self.stderr_lines.append("")  # end of stderr
            self._new_stderr.notify_all()

    def ask(self, question: str) -> None:
        self.process.stdin.write(question.encode() + b"\n")
        self.process.stdin.flush()

    def read_stdout(self, until_newline: bool) -> bytes:
        """The next bytes the answer streams (blocks until some come), or everything up to its closing newline."""
        read = os.read(self.process.stdout.fileno(), 65536)
        while until_newline and read and not read.endswith(b"\n"):
            read += os.read(self.process.stdout.fileno(), 65536)
        return read

    def wait_for_notes(self, text: str, count: int) -> None:
        """Until stderr holds `count` lines with `text` (or ends)."""

        def seen() -> int:
            return sum(text in line for line in self.stderr_lines)

        with self._new_stderr:
            self._new_stderr.wait_for(lambda: seen() >= count or "" in self.stderr_lines, timeout=OUTER_LIMIT_S)
            assert seen() >= count, "".join(self.stderr_lines)[-4000:]

    def interrupt_the_answer(self, question: str, notes_so_far: int) -> str:
        """Ask, wait for the answer to start streaming, press Ctrl-C, wait for the note; the answer as printed."""
        self.ask(question)
        printed = self.read_stdout(until_newline=False)
        self.process.send_signal(signal.SIGINT)
        self.wait_for_notes("answer stopped by Ctrl-C", notes_so_far + 1)
        if not printed.endswith(b"\n"):
            printed += self.read_stdout(until_newline=True)
        return printed.decode().removesuffix("\n")


def test_ctrl_c_stops_a_streaming_answer_and_the_session_goes_on_with_it(
    tiny_checkpoint, tiny_model, tokenizer, cli_env
):
    """The answers are long (2,000 tokens at most): Ctrl-C comes while they stream. The stopped answer stays in the
    conversation as printed: the next answer is `chat`'s with that turn in its history."""
    chat = ChatProcess(cli_command("chat", "--model", tiny_checkpoint, "--max-new-tokens", "2000"), cli_env)
    try:
        first = chat.interrupt_the_answer("Hello, who are you?", notes_so_far=0)
        second = chat.interrupt_the_answer("Tell me more.", notes_so_far=1)
        chat.ask("/quit")
        chat.process.stdin.close()
        assert chat.process.wait(timeout=OUTER_LIMIT_S) == 0, "".join(chat.stderr_lines)[-4000:]
    finally:
        chat.process.kill()
    stderr = "".join(chat.stderr_lines)
    assert "Traceback" not in stderr and stderr.count("answer stopped by Ctrl-C") == 2
    assert 0 < len(tokenizer(first).input_ids) < 2000 and second
    history = [("Hello, who are you?", first)]
    settings = {"max_new_tokens": len(tokenizer(second).input_ids) + 4, "do_sample": False}
    expected = tiny_model.chat(tokenizer, None, "Tell me more.", settings, history=history)
    assert expected.startswith(second.rstrip("\ufffd"))  # a character cut in the middle shows as U+FFFD


GREEDY8 = {"max_new_tokens": 8, "do_sample": False}


def test_interactive_chat_answers_as_chat_with_history_over_four_turns_and_two_images(
    cli_main, tiny_checkpoint, tiny_model, tokenizer, images, monkeypatch
):
    """The session reuses its KV cache turn after turn; its answers are still those of `chat(history=...)` given
    every image of the conversation each turn."""
    script = (
        "What is a picture?\n"
        f"/image {images / 'scene.png'}\n"
        "What is it?\n"
        "And the colours?\n"
        f"/image {images / 'small.png'}\n"
        "Compare it with the first one.\n"
    )
    monkeypatch.setattr("sys.stdin", io.StringIO(script))
    code, stderr = cli_main("chat", "--model", tiny_checkpoint, "--max-new-tokens", "8")
    assert code == 0, stderr
    scene, small = load_image(images / "scene.png", max_num=6), load_image(images / "small.png", max_num=6)
    both = torch.cat([scene, small])
    turns = [
        (None, "What is a picture?", None),
        (scene, "<image>\nWhat is it?", None),
        (scene, "And the colours?", None),
        (both, "Image-2: <image>\nCompare it with the first one.", [len(scene), len(small)]),
    ]
    history, expected = [], []
    for pixel_values, question, num_patches_list in turns:
        answer, history = tiny_model.chat(
            tokenizer, pixel_values, question, GREEDY8, history, return_history=True, num_patches_list=num_patches_list
        )
        expected.append(answer)
    assert cli_main.stdout == "".join(f"{answer}\n" for answer in expected)


def test_interactive_chat_runs_the_vision_tower_once_for_an_image(cli_main, tiny_checkpoint, images, monkeypatch):
    from nvlm_d.cli import chat as chat_command

    tiles_seen: list[int] = []
    load_model = chat_command.load_model

    def load_and_watch(*args, **kwargs):
        model, tokenizer = load_model(*args, **kwargs)
        model.vision_model.register_forward_pre_hook(lambda module, inputs: tiles_seen.append(len(inputs[0])))
        return model, tokenizer

    monkeypatch.setattr(chat_command, "load_model", load_and_watch)
    monkeypatch.setattr("sys.stdin", io.StringIO("What is it?\nAnd the colours?\nWhere is the ellipse?\n"))
    code, stderr = cli_main("chat", "--model", tiny_checkpoint, *FAST, "--image", images / "scene.png")
    assert code == 0, stderr
    assert len(cli_main.stdout.splitlines()) == 3
    assert sum(tiles_seen) == len(load_image(images / "scene.png", max_num=6))  # 7 tiles, in the first turn only


def test_interactive_chat_over_the_token_limit_says_so_in_one_line_and_goes_on_after_reset(
    cli_main, images, tmp_path_factory, monkeypatch
):
    """A decoder of 2,400 positions: a 7-tile image fits, a second one does not."""
    checkpoint = save_tiny_checkpoint(
        tmp_path_factory.mktemp("tiny_short_context"), seed=0, llm_config={"max_position_embeddings": 2400}
    )
    script = f"What is it?\n/image {images / 'scene.png'}\nAnd this one?\n/reset\nHello again?\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(script))
    code, stderr = cli_main("chat", "--model", checkpoint, *FAST, "--image", images / "scene.png")
    assert code == 0, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("nvlm-d: error:")]
    assert len(errors) == 1 and "max_tokens=2400" in errors[0] and "/reset" in errors[0]
    assert "Traceback" not in stderr
    model = AutoModel.from_pretrained(checkpoint, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    scene = load_image(images / "scene.png", max_num=6)
    first = model.chat(tokenizer, scene, "<image>\nWhat is it?", GREEDY4)
    after_reset = model.chat(tokenizer, None, "Hello again?", GREEDY4)
    assert cli_main.stdout == f"{first}\n{after_reset}\n"  # the refused turn printed nothing


def test_interactive_chat_goes_on_as_it_was_after_a_turn_fails_inside_a_layer(
    cli_main, tiny_checkpoint, tiny_model, tokenizer, monkeypatch
):
    """The second question fails in the decoder's last layer (as out of memory would); the third is answered as if
    the second had never been asked."""
    from nvlm_d.cli import chat as chat_command

    load_model, prefills = chat_command.load_model, []

    def fail_in_the_second_turn(module, args, kwargs):
        hidden_states = args[0] if args else kwargs["hidden_states"]
        prefills.extend([1] if hidden_states.shape[1] > 1 else [])  # a decoding step runs one token
        if len(prefills) == 2:
            raise RuntimeError("simulated out of memory")

    def load_and_break(*args, **kwargs):
        model, tokenizer = load_model(*args, **kwargs)
        model.language_model.model.layers[-1].register_forward_pre_hook(fail_in_the_second_turn, with_kwargs=True)
        return model, tokenizer

    monkeypatch.setattr(chat_command, "load_model", load_and_break)
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello, who are you?\nWhat can you do?\nTell me more.\n"))
    code, stderr = cli_main("chat", "--model", tiny_checkpoint, *FAST)
    assert code == 0, stderr
    assert "RuntimeError: simulated out of memory" in stderr and "Traceback" not in stderr
    first, history = tiny_model.chat(tokenizer, None, "Hello, who are you?", GREEDY4, return_history=True)
    third = tiny_model.chat(tokenizer, None, "Tell me more.", GREEDY4, history=history)
    assert cli_main.stdout == f"{first}\n{third}\n"


def test_interactive_chat_accepts_the_same_image_twice(cli_main, tiny_checkpoint, images, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("Compare them.\n/quit\n"))
    image = images / "scene.png"
    code, stderr = cli_main("chat", "--model", tiny_checkpoint, "--image", image, "--image", image, *FAST)
    assert code == 0, stderr
    assert "image 1 added" in stderr and "image 2 added" in stderr


# --------------------------------------------------------------------------------------------------------
# tiles
# --------------------------------------------------------------------------------------------------------


def test_tiles_prints_grid_tile_count_and_exact_token_count(cli_main, images, tokenizer, tmp_path):
    code, stderr = cli_main("tiles", images / "scene.png", "--out", tmp_path / "tiles.png")
    assert code == 0, stderr
    rows = {line.split(maxsplit=1)[0]: line for line in cli_main.stdout.splitlines()}
    assert "3x2" in rows["grid"]
    assert rows["tiles"].split()[1] == "7" and "thumbnail" in rows["tiles"]
    tokens = len(tokenizer(image_prompt(7), add_special_tokens=False).input_ids)
    assert rows["tokens"].split()[1] == str(tokens) and f"{7 * 256} image tokens" in rows["tokens"]


def test_tiles_loads_no_model_library(cli_env, images, tmp_path):
    """`nvlm-d tiles` loads no model, so it imports neither torch nor transformers (which took it to 8-10 s)."""
    argv = ["tiles", str(images / "scene.png"), "--out", str(tmp_path / "tiles.png")]
    result = run_process([sys.executable, "-c", STARTUP_PROBE, json.dumps([argv]), "torch", "transformers"], cli_env)
    assert_ok(result)
    assert json.loads(result.stdout) == {" ".join(argv): []}
    assert (tmp_path / "tiles.png").is_file()


def test_tiles_png_shows_the_resized_image_under_grid_lines_beside_the_thumbnail(cli_main, images, tmp_path):
    code, stderr = cli_main("tiles", images / "scene.png", "--out", tmp_path / "tiles.png")
    assert code == 0, stderr
    picture = Image.open(tmp_path / "tiles.png").convert("RGB")
    cols, rows, s = 3, 2, TILE
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


def test_tiles_of_photo_png_and_photo_jpg_write_two_pictures(cli_main, images, tmp_path, monkeypatch):
    draw_scene((600, 400)).save(tmp_path / "photo.png")
    draw_scene((400, 600)).save(tmp_path / "photo.jpg")
    monkeypatch.chdir(tmp_path)
    assert cli_main("tiles", "photo.png")[0] == 0
    assert cli_main("tiles", "photo.jpg")[0] == 0
    landscape, portrait = Image.open("photo.png.tiles.png"), Image.open("photo.jpg.tiles.png")
    assert landscape.size[0] > portrait.size[0] and landscape.size[1] < portrait.size[1]


def test_tiles_writes_the_format_its_out_extension_names(cli_main, images, tmp_path):
    assert cli_main("tiles", images / "small.png", "--out", tmp_path / "tiles.jpg")[0] == 0
    assert Image.open(tmp_path / "tiles.jpg").format == "JPEG"


@pytest.mark.parametrize(
    "out, words",
    [("tiles.unknown", [".unknown", ".png"]), ("tiles", ["without an extension"]), ("missing/t.png", ["missing"])],
)
def test_tiles_rejects_an_unusable_out_before_tiling(cli_main, tmp_path, out, words):
    """Checked first: the image does not even exist, and the error is about --out."""
    code, stderr = cli_main("tiles", tmp_path / "absent.png", "--out", tmp_path / out)
    assert_one_line_error(code, stderr, "--out", *words)


def test_tiles_and_chat_say_the_same_about_the_same_bad_image(cli_main, tiny_checkpoint, images):
    code, from_tiles = cli_main("tiles", images / "broken.jpg")
    assert_one_line_error(code, from_tiles, "broken.jpg", "not an image")
    assert cli_main("chat", "--model", tiny_checkpoint, "--image", images / "broken.jpg", "Hi")[1] == from_tiles


def test_tiles_help_describes_the_image_argument(cli_main):
    assert cli_main("tiles", "--help")[0] == 0
    assert "the image file to tile" in cli_main.stdout


# --------------------------------------------------------------------------------------------------------
# batch
# --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def batch_directory(images, tmp_path_factory) -> Path:
    """requests.jsonl with three requests, one image path relative to the file, one a list of two images."""
    directory = tmp_path_factory.mktemp("batch")
    (directory / "pics").mkdir()
    shutil.copy(images / "scene.png", directory / "pics" / "scene.png")
    write_jsonl(
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
    return directory


def run_batch(cli_main, checkpoint, requests: Path, answers: Path, *extra) -> tuple[int, str]:
    return cli_main("batch", "--model", checkpoint, "--input", requests, "--output", answers, *FAST, *extra)


def test_batch_answers_every_record_with_a_progress_bar(
    cli_main, tiny_checkpoint, tiny_model, tokenizer, images, batch_directory, monkeypatch
):
    monkeypatch.chdir(images)  # another working directory: relative paths follow the input file
    answers = batch_directory / "answers.jsonl"
    code, stderr = run_batch(cli_main, tiny_checkpoint, batch_directory / "requests.jsonl", answers)
    assert code == 0, stderr
    records = read_records(answers)
    assert [r["id"] for r in records] == ["text", 7, "two"]
    assert all(set(r) == {"id", "answer", "seconds"} for r in records)
    scene = load_image(images / "scene.png", max_num=6)
    assert records[1]["answer"] == tiny_model.chat(tokenizer, scene, "What is it?", GREEDY4)
    assert "req/s" in stderr  # tqdm's progress bar, with its throughput


def test_batch_rerun_on_a_finished_output_adds_nothing(cli_main, tiny_checkpoint, batch_directory, tmp_path):
    answers = tmp_path / "answers.jsonl"
    requests = batch_directory / "requests.jsonl"
    assert run_batch(cli_main, tiny_checkpoint, requests, answers)[0] == 0
    content = answers.read_bytes()
    code, stderr = run_batch(cli_main, tiny_checkpoint, requests, answers)
    assert code == 0, stderr
    assert answers.read_bytes() == content
    assert "3 already in" in stderr


class Gate:
    """A named pipe standing in for a request's image: the batch blocks opening it until this test opens the other
    end, so `wait_for_reader` returns exactly when the batch has reached that request (all earlier records fsynced)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        os.mkfifo(path)

    def wait_for_reader(self, process: subprocess.Popen, stderr_file: Path) -> int:
        """The write end, once the batch has opened the pipe; if it ends first (or the outer limit passes), the test
        fails with its stderr. Keep the write end open until the batch is killed: closing it lets the batch read
        an empty picture and go on."""
        opened: list[int] = []
        reached_or_ended = threading.Event()  # set by whichever comes first: the batch opens the pipe, or it ends

        def open_write_end() -> None:
            opened.append(os.open(self.path, os.O_WRONLY))
            reached_or_ended.set()

        def wait_for_exit() -> None:
            process.wait()
            reached_or_ended.set()

        writer = threading.Thread(target=open_write_end, daemon=True)
        writer.start()
        threading.Thread(target=wait_for_exit, daemon=True).start()
        reached_or_ended.wait(OUTER_LIMIT_S)
        if opened and process.poll() is None:
            return opened[0]
        os.close(os.open(self.path, os.O_RDONLY | os.O_NONBLOCK))  # let the writer thread's open return
        writer.join()
        for fd in opened:
            os.close(fd)
        state = f"ended with exit code {process.returncode}" if process.poll() is not None else "hung"
        pytest.fail(f"the batch {state} before reaching the gate request; stderr:\n{stderr_file.read_text()}")


def start_batch(command: list[str], env: dict[str, str], stderr_file: Path) -> subprocess.Popen:
    with open(stderr_file, "wb") as stderr:
        return subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr)


def kill_at_gate(batch: subprocess.Popen, gate: Gate, stderr_file: Path) -> None:
    """kill -9 the batch as soon as it opens the gate picture."""
    try:
        write_end = gate.wait_for_reader(batch, stderr_file)
        batch.send_signal(signal.SIGKILL)
        batch.wait()
        os.close(write_end)
    finally:
        if batch.poll() is None:
            batch.kill()
            batch.wait()
    assert batch.returncode == -signal.SIGKILL


def test_batch_of_one_killed_mid_run_resumes_with_every_id_answered_exactly_once(
    cli_main, cli_env, tiny_checkpoint, images, tmp_path
):
    """One request at a time, nothing loaded ahead: the records before the request being loaded are on disk."""
    ids = [f"r{k:02d}" for k in range(8)]
    gate = Gate(tmp_path / "gate.png")
    records = [{"id": i, "question": f"Question {i}: tell me a story."} for i in ids]
    records[3]["image"] = str(gate.path)  # the batch stops here, in the middle of its run
    requests = write_jsonl(tmp_path / "requests.jsonl", records)
    answers = tmp_path / "answers.jsonl"
    sequential = ["--batch-size", "1", "--prefetch", "0"]
    command = cli_command("batch", "--model", tiny_checkpoint, "--input", requests, "--output", answers, *FAST)
    kill_at_gate(start_batch(command + sequential, cli_env, tmp_path / "batch.stderr"), gate, tmp_path / "batch.stderr")
    before = answers.read_bytes()
    assert [json.loads(line)["id"] for line in before.splitlines()] == ids[:3]

    gate.path.unlink()
    shutil.copy(images / "small.png", gate.path)  # the picture arrives; the rerun answers the rest
    code, stderr = run_batch(cli_main, tiny_checkpoint, requests, answers, *sequential)
    assert code == 0, stderr
    assert answers.read_bytes().startswith(before)  # complete records stay as they were
    records = read_records(answers)
    assert sorted(r["id"] for r in records) == ids  # every id, each once
    assert all("answer" in r for r in records)


def test_batch_killed_mid_batch_resumes_with_every_id_answered_once_in_input_order(
    cli_main, cli_env, tiny_checkpoint, tiny_model, tokenizer, images, tmp_path
):
    """Batches of 2 in windows of 8, images loaded 2 requests ahead: the gate (request 9, in the second window) is
    opened by a loader thread while the model answers the first window, and the run is killed there."""
    ids = [f"r{k:02d}" for k in range(12)]
    gate = Gate(tmp_path / "gate.png")
    records = [{"id": i, "question": f"Question {i}: {'tell me a story. ' * (k % 3)}"} for k, i in enumerate(ids)]
    for k in (1, 4, 6):
        records[k]["image"] = str(images / "small.png")
    records[9]["image"] = str(gate.path)
    requests = write_jsonl(tmp_path / "requests.jsonl", records)
    answers = tmp_path / "answers.jsonl"
    batched = ["--batch-size", "2", "--prefetch", "1"]
    command = cli_command("batch", "--model", tiny_checkpoint, "--input", requests, "--output", answers, *FAST)
    kill_at_gate(start_batch(command + batched, cli_env, tmp_path / "batch.stderr"), gate, tmp_path / "batch.stderr")
    before = answers.read_bytes()
    written = [json.loads(line)["id"] for line in before.splitlines()]  # complete lines only
    assert written == ids[: len(written)] and len(written) < len(ids)  # a prefix, in input order

    gate.path.unlink()
    shutil.copy(images / "scene.png", gate.path)
    code, stderr = run_batch(cli_main, tiny_checkpoint, requests, answers, *batched)
    assert code == 0, stderr
    assert answers.read_bytes().startswith(before)
    records = read_records(answers)
    assert [r["id"] for r in records] == ids  # every id once, in input order, as an uninterrupted run writes them
    scene = load_image(images / "scene.png", max_num=6)
    assert records[9]["answer"] == tiny_model.chat(tokenizer, scene, records_question(requests, 9), GREEDY4)


def records_question(requests: Path, index: int) -> str:
    return json.loads(requests.read_text().splitlines()[index])["question"]


def batch_sizes_seen(monkeypatch) -> list[int]:
    """Spy on the batches `nvlm-d batch` hands to the model (in this process): their sizes, in order."""
    from nvlm_d.batch_inference import engine as batch_command

    sizes: list[int] = []
    generate = batch_command._generate

    def spy(model, tokenizer, batch, seed):
        sizes.append(len(batch))
        return generate(model, tokenizer, batch, seed)

    monkeypatch.setattr(batch_command, "_generate", spy)
    return sizes


def test_batched_greedy_answers_equal_one_at_a_time_answers_for_a_mixed_request_file(
    cli_main, tiny_checkpoint, tiny_model, tokenizer, images, tmp_path, monkeypatch
):
    """Text-only requests, 1-image requests of 2 and 7 tiles, a 2-image request and other generation settings,
    answered 4 at a time (left-padded batches) = each asked alone with `chat`, records in input order."""
    scene, small = str(images / "scene.png"), str(images / "small.png")
    requests = [
        {"id": "text-long", "question": "Hello, who are you? Tell me everything about yourself, please."},
        {"id": "scene", "image": scene, "question": "What is it?"},
        {"id": "text-short", "question": "Hi?"},
        {"id": "small", "image": small, "question": "Describe the colours."},
        {"id": "two", "image": [small, scene], "question": "Compare."},
        {"id": "short-answer", "question": "Hello?", "max_new_tokens": 2},
        {"id": "scene-again", "image": scene, "question": "Where is the green ellipse?"},
        {"id": "text-3", "question": "What is two plus two?"},
    ]
    sizes = batch_sizes_seen(monkeypatch)
    answers = tmp_path / "answers.jsonl"
    code, stderr = cli_main(
        "batch", "--model", tiny_checkpoint, "--input", write_jsonl(tmp_path / "requests.jsonl", requests),
        "--output", answers, "--max-new-tokens", "8", "--batch-size", "4",
    )  # fmt: skip
    assert code == 0, stderr
    assert sorted(sizes) == [1, 3, 4]  # 7 requests with equal settings in batches of 4 and 3; the other alone
    records = read_records(answers)
    assert [r["id"] for r in records] == [r["id"] for r in requests]
    pixels = {scene: load_image(scene, max_num=6), small: load_image(small, max_num=6)}
    for request, record in zip(requests, records, strict=True):
        paths = [request["image"]] if isinstance(request.get("image"), str) else request.get("image", [])
        question = request["question"]
        if len(paths) > 1:
            question = "".join(f"Image-{k + 1}: <image>\n" for k in range(len(paths))) + question
        settings = {"max_new_tokens": request.get("max_new_tokens", 8), "do_sample": False}
        pixel_values = torch.cat([pixels[p] for p in paths]) if paths else None
        expected = tiny_model.chat(
            tokenizer, pixel_values, question, settings, num_patches_list=[len(pixels[p]) for p in paths] or None
        )
        assert record["answer"] == expected, request["id"]


def test_sampled_answers_are_seeded_per_request_whatever_their_batch(
    cli_main, tiny_checkpoint, tiny_model, tokenizer, images, tmp_path, monkeypatch
):
    """Each sampled answer is what transformers' own sampling gives that request alone, from the seed
    --seed + crc32(its id as JSON): sharing a batch changes nothing, so a resumed run samples as an uninterrupted
    one."""
    warped = {"do_sample": True, "temperature": 0.8, "top_p": 0.9, "top_k": 20}
    requests = [
        {"id": "a", "question": "Tell me a story.", **warped},
        {"id": 2, "question": "What is it?", "image": str(images / "small.png"), **warped},
        {"id": "c", "question": "Tell me a story.", **warped},
        {"id": "d", "question": "Hi?", **warped},
        {"id": "e", "question": "Tell me a story.", "do_sample": True},  # transformers' defaults (top_k 50)
        {"id": "f", "question": "Hi?", "do_sample": True},
    ]
    sizes = batch_sizes_seen(monkeypatch)
    answers = tmp_path / "answers.jsonl"
    code, stderr = cli_main(
        "batch", "--model", tiny_checkpoint, "--input", write_jsonl(tmp_path / "requests.jsonl", requests),
        "--output", answers, "--max-new-tokens", "8", "--batch-size", "4", "--seed", "5",
    )  # fmt: skip
    assert code == 0, stderr
    assert sorted(sizes) == [2, 4]
    small = load_image(images / "small.png", max_num=6)
    for request, record in zip(requests, read_records(answers), strict=True):
        settings = {key: request[key] for key in warped if key in request}
        torch.manual_seed(5 + zlib.crc32(json.dumps(request["id"]).encode()))
        pixel_values = small if "image" in request else None
        expected = tiny_model.chat(tokenizer, pixel_values, request["question"], {"max_new_tokens": 8, **settings})
        assert record["answer"] == expected, request["id"]
    same_question = [r["answer"] for r in read_records(answers) if r["id"] in ("a", "c")]
    assert same_question[0] != same_question[1]  # different ids, different seeds


def test_batch_keeps_at_most_a_window_and_the_prefetched_batches_of_images_in_memory(
    cli_main, tiny_checkpoint, images, tmp_path, monkeypatch
):
    """--batch-size 2 --prefetch 1: a window of 4 batches being answered plus 1 batch loaded ahead, so at most
    (4 + 1) x 2 = 10 requests' pixel values are alive at any time, whatever the length of the input."""
    from nvlm_d.batch_inference import engine as batch_command

    lock = threading.Lock()
    alive, peak, loaded_total = [0], [0], [0]
    load = batch_command._load_request

    def release() -> None:
        with lock:
            alive[0] -= 1

    def counting_load(*args, **kwargs):
        loaded = load(*args, **kwargs)
        with lock:
            alive[0] += 1
            loaded_total[0] += 1
            peak[0] = max(peak[0], alive[0])
        weakref.finalize(loaded.pixel_values, release)
        return loaded

    monkeypatch.setattr(batch_command, "_load_request", counting_load)
    requests = [{"id": k, "image": str(images / "small.png"), "question": f"Picture {k}?"} for k in range(30)]
    answers = tmp_path / "answers.jsonl"
    code, stderr = cli_main(
        "batch", "--model", tiny_checkpoint, "--input", write_jsonl(tmp_path / "requests.jsonl", requests),
        "--output", answers, *FAST, "--max-num", "1", "--batch-size", "2", "--prefetch", "1",
    )  # fmt: skip
    assert code == 0, stderr
    assert loaded_total[0] == 30 and len(read_records(answers)) == 30
    assert peak[0] <= (GROUP_BATCHES + 1) * 2


def loaded_request(position: int, image_tokens: int, question: str = "Q?", **generation) -> LoadedRequest:
    return LoadedRequest(
        position, None, question, image_tokens=image_tokens, generation={"max_new_tokens": 4, **generation}
    )


def test_a_window_is_sorted_by_prompt_length_and_settings_never_share_a_batch():
    window = [
        loaded_request(0, 3328),
        loaded_request(1, 0, "A long text-only question, but far shorter than any image."),
        loaded_request(2, 256),
        loaded_request(3, 0, "Hi?"),
        loaded_request(4, 1792, max_new_tokens=2),
        loaded_request(5, 1792),
        loaded_request(6, 0, "Why?", max_new_tokens=2),
    ]
    batches = plan_batches(window, batch_size=2, model_generation_config=GenerationConfig())
    assert [[loaded.position for loaded in batch] for batch in batches] == [[0], [3, 1], [2, 5], [6, 4]]


def test_a_sampled_request_with_a_repetition_penalty_is_answered_alone():
    """`chat` applies a repetition penalty after every other logits processor, so the per-request sampler cannot
    run after it: such a request keeps transformers' own sampling, seeded for it alone."""
    window = [loaded_request(k, 0, do_sample=True, repetition_penalty=1.2) for k in range(3)]
    batches = plan_batches(window, batch_size=4, model_generation_config=GenerationConfig())
    assert [len(batch) for batch in batches] == [1, 1, 1]


def test_the_prefetcher_loads_the_next_items_while_the_consumer_works_on_one():
    started = [threading.Event() for _ in range(6)]

    def load(k: int) -> int:
        started[k].set()
        return k

    prefetcher = Prefetcher(range(6), load, ahead=2, workers=2)
    items = iter(prefetcher)
    assert next(items) == 0
    # the consumer holds item 0: items 1 and 2 are loaded meanwhile, and nothing beyond them is handed out
    assert started[1].wait(OUTER_LIMIT_S) and started[2].wait(OUTER_LIMIT_S)
    assert prefetcher.submitted == 3
    assert list(items) == [1, 2, 3, 4, 5]


def test_the_prefetcher_yields_in_input_order_when_loads_finish_out_of_order():
    second_done = threading.Event()

    def load(k: int) -> int:
        if k == 0:
            assert second_done.wait(OUTER_LIMIT_S)  # item 0 finishes after item 1
        if k == 1:
            second_done.set()
        return k

    assert list(Prefetcher(range(5), load, ahead=3, workers=2)) == [0, 1, 2, 3, 4]


def test_the_prefetcher_raises_a_failed_load_where_its_item_is_taken():
    def load(k: int) -> int:
        if k == 2:
            raise OSError("disk gone")
        return k

    taken = []
    with pytest.raises(OSError, match="disk gone"):
        for item in Prefetcher(range(5), load, ahead=2, workers=2):
            taken.append(item)
    assert taken == [0, 1]


def test_the_prefetcher_without_lookahead_loads_on_the_consumers_thread():
    threads = []
    prefetched = Prefetcher(range(3), lambda k: threads.append(threading.current_thread()) or k, ahead=0, workers=1)
    assert list(prefetched) == [0, 1, 2]
    assert threads == [threading.main_thread()] * 3


TORN_PREFIX = '{"id": 0, "answer": "zero", "seconds": 0.1}\n{"id": 1, "answer": "one", "seconds": 0.1}\n'


def test_batch_cuts_a_half_written_last_line_before_resuming(cli_main, tiny_checkpoint, tmp_path):
    requests = write_jsonl(tmp_path / "requests.jsonl", [{"id": k, "question": f"Question {k}?"} for k in range(3)])
    answers = tmp_path / "answers.jsonl"
    answers.write_text(TORN_PREFIX + '{"id": 2, "answer": "tw')  # what kill -9 in the middle of a write leaves
    code, stderr = run_batch(cli_main, tiny_checkpoint, requests, answers)
    assert code == 0, stderr
    assert answers.read_text().startswith(TORN_PREFIX)
    records = read_records(answers)
    assert [r["id"] for r in records] == [0, 1, 2]
    assert records[2]["answer"] != "tw"
    assert "half-written" in stderr


def test_bad_records_become_error_records_the_others_are_answered_and_the_exit_code_is_1(
    cli_main, tiny_checkpoint, images, tmp_path
):
    requests = write_jsonl(
        tmp_path / "requests.jsonl",
        [
            {"id": "ok-1", "question": "Hello?", "metadata": {"source": "mine"}},
            "{not json",
            {"question": "I have no id"},
            {"id": "ok-1", "question": "I reuse an id"},
            {"id": "no-question"},
            {"id": "missing-image", "image": "nowhere.png", "question": "What is it?"},
            {"id": "broken-image", "image": str(images / "broken.jpg"), "question": "What is it?"},
            {"id": "ok-2", "image": str(images / "small.png"), "question": "What is it?"},
        ],
    )
    answers = tmp_path / "answers.jsonl"
    code, stderr = run_batch(cli_main, tiny_checkpoint, requests, answers)
    assert code == 1
    assert "Traceback" not in stderr
    records = read_records(answers)
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


@pytest.mark.parametrize("key, suggestion", [("max_tokens", "max_new_tokens"), ("top_q", "top_p")])
def test_a_misspelled_generation_key_is_an_error_record_naming_it(cli_main, tiny_checkpoint, tmp_path, key, suggestion):
    requests = write_jsonl(tmp_path / "requests.jsonl", [{"id": 1, "question": "Hello?", key: 3}])
    answers = tmp_path / "answers.jsonl"
    assert run_batch(cli_main, tiny_checkpoint, requests, answers)[0] == 1
    (record,) = read_records(answers)
    assert f"unknown key {key!r}" in record["error"] and f"did you mean {suggestion!r}" in record["error"]


def test_a_request_with_temperature_but_no_do_sample_is_an_error_record_naming_the_fix(
    cli_main, tiny_checkpoint, tmp_path
):
    requests = write_jsonl(
        tmp_path / "requests.jsonl",
        [
            {"id": "unset", "question": "Hello?", "temperature": 0.7, "max_new_tokens": 2},
            {"id": "greedy", "question": "Hello?", "temperature": 0.7, "do_sample": False, "max_new_tokens": 2},
        ],
    )
    answers = tmp_path / "answers.jsonl"
    assert run_batch(cli_main, tiny_checkpoint, requests, answers)[0] == 1
    records = {record["id"]: record for record in read_records(answers)}
    assert 'add "do_sample": true to sample, or "do_sample": false' in records["unset"]["error"]
    assert "answer" in records["greedy"]


@pytest.mark.parametrize(
    "content, words",
    [
        ("id,question\n1,Hello?\n2,Hi?\n", ["not JSON Lines", "line 1"]),
        ('[\n  {"id": 1, "question": "Hello?"},\n  {"id": 2, "question": "Hi?"}\n]\n', ["one JSON array"]),
        ('{\n  "id": 1,\n  "question": "Hello?"\n}\n', ["one JSON object over several lines"]),
    ],
)
def test_a_requests_file_that_is_not_jsonl_is_one_error(cli_main, tiny_checkpoint, tmp_path, content, words):
    requests = tmp_path / "requests.txt"
    requests.write_text(content)
    code, stderr = run_batch(cli_main, tiny_checkpoint, requests, tmp_path / "answers.jsonl")
    assert_one_line_error(code, stderr, "--input", *words)
    assert not (tmp_path / "answers.jsonl").exists()


def test_batch_retry_errors_replaces_error_records_by_answers(cli_main, tiny_checkpoint, images, tmp_path):
    requests = write_jsonl(
        tmp_path / "requests.jsonl",
        [
            {"id": "a", "question": "Hello?"},
            {"id": "b", "image": "late.png", "question": "What is it?"},
        ],
    )
    answers = tmp_path / "answers.jsonl"
    assert run_batch(cli_main, tiny_checkpoint, requests, answers)[0] == 1
    assert "error" in read_records(answers)[1]
    shutil.copy(images / "small.png", tmp_path / "late.png")  # the missing image arrives

    code, stderr = run_batch(cli_main, tiny_checkpoint, requests, answers)
    assert code == 1 and "0 to do" in stderr  # error records are final without --retry-errors
    assert run_batch(cli_main, tiny_checkpoint, requests, answers, "--retry-errors")[0] == 0
    records = read_records(answers)
    assert [r["id"] for r in records] == ["a", "b"] and all("answer" in r for r in records)


def test_batch_answers_a_beam_search_request(cli_main, tiny_checkpoint, tiny_model, tokenizer, tmp_path):
    requests = write_jsonl(tmp_path / "requests.jsonl", [{"id": 1, "question": "Hello?", "num_beams": 2}])
    answers = tmp_path / "answers.jsonl"
    code, stderr = run_batch(cli_main, tiny_checkpoint, requests, answers)
    assert code == 0, stderr
    expected = tiny_model.chat(tokenizer, None, "Hello?", {**GREEDY4, "num_beams": 2})
    assert read_records(answers)[0]["answer"] == expected


def test_a_second_batch_writer_on_the_same_output_is_refused(tmp_path):
    first = ResultLog(tmp_path / "answers.jsonl")
    try:
        with pytest.raises(ResultLogError, match="another process is writing"):
            ResultLog(tmp_path / "answers.jsonl")
    finally:
        first.close()


def test_batch_refuses_an_output_with_a_foreign_line_in_the_middle(tmp_path):
    answers = tmp_path / "answers.jsonl"
    answers.write_text('{"id": 1, "answer": "x", "seconds": 1}\nnot a record\n{"id": 2, "answer": "y", "seconds": 1}\n')
    with pytest.raises(ResultLogError, match="line 2 is not an nvlm-d batch record"):
        ResultLog(answers)
    assert answers.read_text().count("\n") == 3  # nothing was cut


# --------------------------------------------------------------------------------------------------------
# Bad input: one line on stderr, a non-zero exit, no traceback
# --------------------------------------------------------------------------------------------------------


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


def test_missing_image_is_one_line_error(cli_main, images):
    assert_one_line_error(*cli_main("tiles", images / "absent.png"), "not found")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_gpus_without_cuda_is_one_line_error(cli_main, tiny_checkpoint):
    assert_one_line_error(*cli_main("chat", "--model", tiny_checkpoint, "--gpus", "2", "Hi"), "CUDA")


def test_max_num_zero_is_one_line_error(cli_main, images):
    assert_one_line_error(*cli_main("tiles", images / "scene.png", "--max-num", "0"), "--max-num")


# --------------------------------------------------------------------------------------------------------
# --model as a Hub id, without a network (fresh processes: huggingface_hub reads its settings at import)
# --------------------------------------------------------------------------------------------------------


@pytest.fixture
def hub_env(cli_env, tmp_path) -> dict[str, str]:
    """An empty Hugging Face cache, and a Hub endpoint where nothing listens (connection refused at once)."""
    env = {**cli_env, "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9"}
    env.pop("HF_HUB_OFFLINE")
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE"):
        env.pop(name, None)
    return env


def test_a_hub_id_that_is_not_cached_with_hf_hub_offline_is_one_clear_error(hub_env):
    result = run_process(cli_command("chat", "--model", "nvidia/NVLM-D-72B", "Hi"), {**hub_env, "HF_HUB_OFFLINE": "1"})
    assert_one_line_error(result.returncode, result.stderr, "nvidia/NVLM-D-72B", "not in the Hugging Face cache")
    assert "HF_HUB_OFFLINE" in result.stderr


def test_a_hub_id_with_the_hub_unreachable_is_one_clear_error_without_retries(hub_env):
    result = run_process(cli_command("chat", "--model", "nvidia/NVLM-D-72B", "Hi"), hub_env)
    assert_one_line_error(result.returncode, result.stderr, "cannot reach the Hugging Face Hub", "not in the cache")


def test_a_cached_hub_model_loads_when_the_hub_is_unreachable(
    hub_env, tiny_checkpoint, tiny_model, tokenizer, tmp_path
):
    snapshot = Path(hub_env["HF_HOME"]) / "hub" / "models--nvlm-d--tiny" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_checkpoint, snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    result = run_process(cli_command("chat", "--model", "nvlm-d/tiny", *FAST, "Hello, who are you?"), hub_env)
    assert_ok(result)
    assert "unreachable" in result.stderr and "using the cached nvlm-d/tiny" in result.stderr
    assert "Retrying" not in result.stderr  # no request beyond the one that found the Hub unreachable
    assert result.stdout == tiny_model.chat(tokenizer, None, "Hello, who are you?", GREEDY4) + "\n"


# --------------------------------------------------------------------------------------------------------
# plan (in-process: it needs no model weights and no GPU)
# --------------------------------------------------------------------------------------------------------


def plan_rows(stdout: str) -> dict[int, str]:
    """GPU index -> its row of the plan table."""
    return {int(line.split()[0]): line for line in stdout.splitlines() if line[:3].strip().isdigit()}


def test_plan_without_gpus_finds_the_fewest_that_fit(cli_main):
    code, _ = cli_main("plan", "--gpu-memory", "80GB", "--dtype", "int8")
    assert code == 0
    assert "2 GPU(s) of 80GB" in cli_main.stdout
    assert "vision_model" in plan_rows(cli_main.stdout)[0]


def test_plan_on_8_gpus_puts_decoder_layers_on_every_gpu_by_default(cli_main):
    code, _ = cli_main("plan", "--gpus", "8", "--gpu-memory", "80GB")
    assert code == 0
    rows = plan_rows(cli_main.stdout)
    assert sorted(rows) == list(range(8))
    assert all(row.split()[1] != "-" for row in rows.values())  # a layer range on every GPU
    assert "vision_model, mlp1, model.embed_tokens" in rows[0]


def test_plan_with_the_sequential_strategy_fills_gpus_in_order(cli_main):
    code, _ = cli_main("plan", "--gpus", "8", "--gpu-memory", "80GB", "--strategy", "sequential")
    assert code == 0
    used = [row.split()[1] != "-" for row in plan_rows(cli_main.stdout).values()]
    assert used == [True, True, True, False, False, False, False, False]


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
        (["--strategy", "diagonal"], ["--strategy"]),
    ],
)
def test_plan_bad_arguments_are_one_line_errors(cli_main, args, words):
    assert_one_line_error(*cli_main("plan", *args), *words)


def test_plan_that_fits_no_gpu_count_says_so(cli_main):
    code, _ = cli_main("plan", "--gpu-memory", "1GB")
    assert code == 1
    assert "does not fit on any number of GPUs" in cli_main.stdout
