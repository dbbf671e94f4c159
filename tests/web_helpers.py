"""What the web page's tests share: small square images (one tile each), launching the page on the loopback
address, and the answers `model.chat` gives for the same settings (the independent reference)."""

from __future__ import annotations

import contextlib
from pathlib import Path

from PIL import Image

from nvlm_d.image_processing_nvlm_d import load_image

MAX_NEW_TOKENS = 4  # short answers: logits over the 152,064-token vocabulary dominate the cost
MAX_TILES = 6
# the page's settings in the order its /ask and /regenerate endpoints take them
SETTINGS = (MAX_TILES, MAX_NEW_TOKENS, False, 0.7, 0.9, None)
GREEDY = {"max_new_tokens": MAX_NEW_TOKENS, "do_sample": False}


def square_image(directory: Path, name: str, colour: tuple[int, int, int]) -> Path:
    """A 64x64 PNG: one 448 px tile (a square image gets a 1x1 grid and no thumbnail)."""
    path = directory / name
    Image.new("RGB", (64, 64), colour).save(path)
    return path


def chat_answers(model, tokenizer, image: Path, questions: list[str], settings: dict = GREEDY) -> list[str]:
    """The card's way, turn by turn: `chat` with the image and the history so far."""
    pixel_values = load_image(str(image), max_num=MAX_TILES)
    history, answers = None, []
    for question in questions:
        answer, history = model.chat(tokenizer, pixel_values, question, settings, history=history, return_history=True)
        answers.append(answer)
    return answers


@contextlib.contextmanager
def launched(app):
    """The page served on 127.0.0.1 (a free port) while the block runs."""
    app.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    try:
        yield app.local_url
    finally:
        app.close()
        app.nvlm_sessions.close()


def last_answer(messages: list[dict]) -> str:
    """The text of the last assistant message the Chatbot holds (as gradio_client returns it)."""
    content = [m for m in messages if m["role"] == "assistant"][-1]["content"]
    return "".join(part.get("text", "") for part in content) if isinstance(content, list) else content
