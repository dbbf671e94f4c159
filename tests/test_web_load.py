"""A bounded load test of `nvlm-d web` on the loopback address: 16 clients at once through `gradio_client`, each
with an image and a follow-up. Every request is answered, each answer equals the one `model.chat` gives alone,
and once the sessions expire the server holds none of their conversations."""

from __future__ import annotations

import gc
import time
import weakref
from concurrent.futures import ThreadPoolExecutor

import pytest
from web_helpers import SETTINGS, chat_answers, last_answer, launched, square_image

pytest.importorskip("gradio", reason="the web extra (gradio) is not installed: pip install -e '.[web]'")
from gradio_client import Client, handle_file  # noqa: E402

from nvlm_d.web import InProcessBackend, build_app  # noqa: E402

CLIENTS = 16
OUTER_LIMIT = 1800  # seconds per client: generous, for a busy machine; the test waits on the answers themselves
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220)}
QUESTIONS = [("What colour is it?", "Are you sure?"), ("Describe the image.", "What shape is it?")]


def converse(url: str, image, questions) -> tuple[list[str], Client]:
    """Two turns; the client is returned, to keep its session open (a client that goes away ends its session)."""
    client = Client(url, verbose=False)
    first = client.submit({"text": questions[0], "files": [handle_file(str(image))]}, *SETTINGS, api_name="/ask")
    answers = [last_answer(first.result(timeout=OUTER_LIMIT)[0])]
    second = client.submit({"text": questions[1], "files": []}, *SETTINGS, api_name="/ask")
    answers.append(last_answer(second.result(timeout=OUTER_LIMIT)[0]))
    return answers, client


def test_sixteen_clients_at_once_get_the_answers_chat_gives_alone(tiny_model, tokenizer, tmp_path):
    images = {name: square_image(tmp_path, f"{name}.png", colour) for name, colour in COLOURS.items()}
    work = [(images[name], questions) for name in COLOURS for questions in QUESTIONS] * (CLIENTS // 4)
    expected = {
        (image, questions): chat_answers(tiny_model, tokenizer, image, list(questions))
        for image, questions in set(work)
    }
    app = build_app(InProcessBackend(tiny_model, tokenizer), concurrency=2, max_queue=CLIENTS * 2)
    store = app.nvlm_sessions
    with launched(app) as url, ThreadPoolExecutor(CLIENTS) as pool:
        futures = [pool.submit(converse, url, image, questions) for image, questions in work]
        results = [future.result(timeout=OUTER_LIMIT) for future in futures]
        assert [answers for answers, _ in results] == [expected[item] for item in work]
        conversations = store.conversations()
        assert len(conversations) == CLIENTS and all(len(c.turns) == 2 for c in conversations)
        sessions = [weakref.ref(c.session) for c in conversations]
        del conversations
        assert store.expire_idle(now=time.monotonic() + store.idle_timeout + 1) == CLIENTS
        gc.collect()
        assert len(store) == 0 and all(session() is None for session in sessions)
