"""`nvlm-d web`: the chat page's answers equal `model.chat`'s, sessions stay apart, bad input gets a message and the
server keeps serving; the OpenAI mode sends what an OpenAI-compatible NVLM-D server needs."""

from __future__ import annotations

import base64
import gc
import json
import threading
import time
import weakref
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from web_helpers import GREEDY, MAX_NEW_TOKENS, SETTINGS, chat_answers, last_answer, launched, square_image

pytest.importorskip("gradio", reason="the web extra (gradio) is not installed: pip install -e '.[web]'")
from gradio_client import Client, handle_file  # noqa: E402

from nvlm_d.image_processing_nvlm_d import load_image  # noqa: E402
from nvlm_d.web import InProcessBackend, OpenAIBackend, SessionStore, Settings, UserFacingError, build_app  # noqa: E402

SETTINGS_OBJECT = Settings(max_tiles=SETTINGS[0], max_new_tokens=MAX_NEW_TOKENS)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    directory = tmp_path_factory.mktemp("web_images")
    (directory / "notes.txt").write_text("a text file, not an image\n")
    return {
        "red": square_image(directory, "red.png", (220, 30, 30)),
        "blue": square_image(directory, "blue.png", (30, 30, 220)),
        "text": directory / "notes.txt",
    }


@pytest.fixture(scope="module")
def page(tiny_model, tokenizer):
    """The page over the tiny model, served on 127.0.0.1 for this module's tests."""
    app = build_app(InProcessBackend(tiny_model, tokenizer))
    with launched(app) as url:
        yield app, url


def ask(client, question, *files, settings=SETTINGS):
    message = {"text": question, "files": [handle_file(str(path)) for path in files]}
    return client.predict(message, *settings, api_name="/ask")


def test_the_streamed_answer_grows_to_what_chat_answers(page, tiny_model, tokenizer, images):
    _, url = page
    job = Client(url, verbose=False).submit(
        {"text": "What colour is it?", "files": [handle_file(str(images["red"]))]}, *SETTINGS, api_name="/ask"
    )
    job.result()
    streamed = [last_answer(output[0]) for output in job.outputs()]
    (expected,) = chat_answers(tiny_model, tokenizer, images["red"], ["What colour is it?"])
    assert streamed[-1] == expected
    shown = [text for text in streamed if text]
    assert len(set(shown)) > 1, "the answer came in one piece, not token by token"
    assert all(expected.startswith(text.strip()[:-1]) for text in shown)


def test_a_follow_up_answers_as_chat_with_history(page, tiny_model, tokenizer, images):
    _, url = page
    client = Client(url, verbose=False)
    questions = ["Describe the image.", "And its colour?"]
    first = last_answer(ask(client, questions[0], images["blue"])[0])
    second = last_answer(ask(client, questions[1])[0])
    assert [first, second] == chat_answers(tiny_model, tokenizer, images["blue"], questions)


def test_two_sessions_never_see_each_others_conversation(page, images):
    _, url = page
    alice, bob = Client(url, verbose=False), Client(url, verbose=False)
    ask(alice, "Alice asks about red.", images["red"])
    bob_messages = ask(bob, "Bob asks about blue.", images["blue"])[0]
    alice_messages = ask(alice, "Alice again.")[0]
    texts = [json.dumps(m["content"]) for m in bob_messages]
    assert any("Bob asks" in t for t in texts) and not any("Alice" in t or "red.png" in t for t in texts)
    texts = [json.dumps(m["content"]) for m in alice_messages]
    assert sum("Alice" in t for t in texts) == 2 and not any("Bob" in t or "blue.png" in t for t in texts)


def test_a_text_file_gets_a_message_and_the_page_keeps_serving(page, tiny_model, tokenizer, images):
    _, url = page
    client = Client(url, verbose=False)
    messages, kept_input, status, _ = ask(client, "What is this?", images["text"])
    assert "notes.txt is not an image" in status
    assert messages == [] and kept_input["text"] == "What is this?"  # nothing asked; the question is kept
    answer = last_answer(ask(client, "What colour is it?", images["red"])[0])
    assert [answer] == chat_answers(tiny_model, tokenizer, images["red"], ["What colour is it?"])


def test_an_empty_question_gets_a_message(page, images):
    _, url = page
    _, _, status, _ = ask(Client(url, verbose=False), "   ", images["red"])
    assert "Type a question" in status


def test_regenerate_answers_the_last_question_again_with_new_settings(page, tiny_model, tokenizer, images):
    _, url = page
    client = Client(url, verbose=False)
    ask(client, "What colour is it?", images["red"])
    longer = (SETTINGS[0], MAX_NEW_TOKENS + 2, *SETTINGS[2:])
    messages = client.predict(*longer, api_name="/regenerate")[0]
    settings = {**GREEDY, "max_new_tokens": MAX_NEW_TOKENS + 2}
    assert (
        last_answer(messages) == chat_answers(tiny_model, tokenizer, images["red"], ["What colour is it?"], settings)[0]
    )
    assert sum(m["role"] == "assistant" for m in messages) == 1


def test_clear_starts_a_new_conversation(page, tiny_model, tokenizer, images):
    app, url = page
    client = Client(url, verbose=False)
    ask(client, "What colour is it?", images["red"])
    client.predict(api_name="/clear")
    answer = last_answer(ask(client, "Describe the image.", images["blue"])[0])
    assert [answer] == chat_answers(tiny_model, tokenizer, images["blue"], ["Describe the image."])


# ---------------------------------------------------------------------------------------------------------
# The backend on its own: stop, limits, sessions
# ---------------------------------------------------------------------------------------------------------


def test_stop_ends_the_answer_where_it_is_and_a_follow_up_continues_from_it(tiny_model, tokenizer, images):
    conversation = InProcessBackend(tiny_model, tokenizer).new_conversation()
    settings = Settings(max_tiles=6, max_new_tokens=64)
    answers = conversation.ask("What colour is it?", [str(images["red"])], settings)
    next(answer for answer in answers if answer)  # the first token has been shown
    conversation.stop()
    stopped = list(answers)[-1]
    (full,) = chat_answers(tiny_model, tokenizer, images["red"], ["What colour is it?"], settings.generation_config())
    assert full.startswith(stopped.rstrip("\ufffd").rstrip()) and len(stopped) < len(full)  # may end mid-character
    assert conversation.stats.new_tokens < 64 and conversation.turns[-1].answer == stopped
    follow_up = list(conversation.ask("Go on.", [], SETTINGS_OBJECT))[-1]
    history = [(conversation.turns[0].text, stopped)]
    pixel_values = load_image(str(images["red"]), max_num=6)
    assert follow_up == tiny_model.chat(tokenizer, pixel_values, "Go on.", GREEDY, history=history)


def test_seeded_sampling_answers_as_chat_under_the_same_seed(tiny_model, tokenizer, images):
    import torch

    settings = Settings(max_tiles=6, max_new_tokens=MAX_NEW_TOKENS, do_sample=True, temperature=0.9, top_p=0.8, seed=7)
    conversation = InProcessBackend(tiny_model, tokenizer).new_conversation()
    answer = list(conversation.ask("What colour is it?", [str(images["red"])], settings))[-1]
    torch.manual_seed(7)
    (expected,) = chat_answers(
        tiny_model, tokenizer, images["red"], ["What colour is it?"], settings.generation_config()
    )
    assert answer == expected
    assert list(conversation.regenerate(settings))[-1] == expected  # the same seed, the same answer


def test_a_conversation_past_the_context_offers_to_start_over(tiny_model, tokenizer, images):
    conversation = InProcessBackend(tiny_model, tokenizer, max_tokens=300).new_conversation()
    list(conversation.ask("What colour is it?", [str(images["red"])], SETTINGS_OBJECT))
    with pytest.raises(UserFacingError, match="past the model's context.*Press Clear"):
        list(conversation.ask("Image-2: <image>\nAnd this one?", [str(images["blue"])], SETTINGS_OBJECT))
    assert len(conversation.turns) == 1  # the refused turn left the conversation as it was
    conversation.clear()
    assert list(conversation.ask("Describe it.", [str(images["blue"])], SETTINGS_OBJECT))


def test_a_decompression_bomb_is_refused_before_it_is_decoded(tiny_model, tokenizer, images, monkeypatch):
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 // 4)  # the 64x64 image is over twice the limit
    conversation = InProcessBackend(tiny_model, tokenizer).new_conversation()
    with pytest.raises(UserFacingError, match="red.png is too large.*decompression bomb"):
        conversation.ask("What is it?", [str(images["red"])], SETTINGS_OBJECT)


def test_out_of_range_settings_are_refused_with_their_name():
    with pytest.raises(UserFacingError, match="max tiles must be an integer from 1 to 12"):
        Settings(max_tiles=13)
    with pytest.raises(UserFacingError, match="temperature must be > 0"):
        Settings(do_sample=True, temperature=0.0)


class _Conversation:
    def __init__(self) -> None:
        self.last_used, self.busy, self.closed = 0.0, False, False

    def close(self) -> None:
        self.closed = True


def test_idle_conversations_are_dropped_and_busy_ones_kept():
    now = [0.0]
    store = SessionStore(_Conversation, idle_timeout=100, clock=lambda: now[0])
    idle, busy, recent = store.get("idle"), store.get("busy"), None
    busy.busy = True
    now[0] = 150.0
    recent = store.get("recent")
    store.touch("busy")  # its answer ended now
    assert store.expire_idle() == 1 and idle.closed and not busy.closed and not recent.closed
    assert store.find("idle") is None and store.find("busy") is busy and len(store) == 2
    busy.busy = False
    now[0] = 240.0  # 90 s after both were last used
    assert store.expire_idle() == 0 and store.expire_idle(now=260.0) == 2 and len(store) == 0


def test_an_expired_conversation_frees_its_chat_session(tiny_model, tokenizer, images):
    store = SessionStore(InProcessBackend(tiny_model, tokenizer).new_conversation, idle_timeout=60)
    conversation = store.get("a")
    list(conversation.ask("What colour is it?", [str(images["red"])], SETTINGS_OBJECT))
    session = weakref.ref(conversation.session)
    assert conversation.session.num_cached_tokens > 0
    del conversation
    store.expire_idle(now=time.monotonic() + 61)
    gc.collect()
    assert len(store) == 0 and session() is None


# ---------------------------------------------------------------------------------------------------------
# --openai-url: against a loopback server that records what the page sends
# ---------------------------------------------------------------------------------------------------------


class FakeOpenAIServer:
    """An OpenAI-compatible server on 127.0.0.1 that records each request and streams back a fixed answer."""

    answer_pieces = ["A red ", "square."]

    def __init__(self, hang: bool = False) -> None:
        self.requests: list[dict] = []
        self.release = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                body = json.dumps({"object": "list", "data": [{"id": "nvidia/NVLM-D-72B", "object": "model"}]})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body.encode())

            def do_POST(self) -> None:
                length = int(self.headers["Content-Length"])
                server.requests.append(
                    {
                        "path": self.path,
                        "auth": self.headers.get("Authorization"),
                        **json.loads(self.rfile.read(length)),
                    }
                )
                if hang:
                    server.release.wait(600)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                for piece in server.answer_pieces:
                    chunk = {"choices": [{"index": 0, "delta": {"content": piece}}]}
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                usage = {"choices": [], "usage": {"prompt_tokens": 300, "completion_tokens": 2}}
                self.wfile.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def test_openai_mode_sends_nvlm_system_message_and_images_as_content(images):
    with FakeOpenAIServer() as server:
        conversation = OpenAIBackend(server.url, api_key="secret").new_conversation()
        first = list(conversation.ask("What colour is it?", [str(images["red"])], SETTINGS_OBJECT))
        second = list(conversation.ask("Are you sure?", [], SETTINGS_OBJECT))
    assert first[-1] == second[-1] == "A red square."
    request, follow_up = server.requests
    assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer secret"
    assert request["model"] == "nvidia/NVLM-D-72B" and request["stream"] is True
    assert request["messages"][0] == {"role": "system", "content": "Answer the questions."}
    image_part, text_part = request["messages"][1]["content"]
    encoded = base64.b64encode(images["red"].read_bytes()).decode()
    assert image_part == {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{encoded}"}}
    assert text_part == {"type": "text", "text": "What colour is it?"}
    assert request["max_tokens"] == MAX_NEW_TOKENS and "mm_processor_kwargs" not in request  # the server's 6 tiles
    assert [m["role"] for m in follow_up["messages"]] == ["system", "user", "assistant", "user"]
    assert follow_up["messages"][2]["content"] == "A red square."
    assert follow_up["messages"][1] == request["messages"][1]  # the image stays in the turn that added it
    assert conversation.stats.prompt_tokens == 300 and conversation.stats.new_tokens == 2


def test_openai_mode_asks_for_a_tile_limit_only_when_it_differs_from_the_servers(images):
    with FakeOpenAIServer() as server:
        backend = OpenAIBackend(server.url, server_max_tiles=12)
        list(backend.new_conversation().ask("What colour is it?", [str(images["red"])], SETTINGS_OBJECT))
    assert server.requests[0]["mm_processor_kwargs"] == {"max_dynamic_patch": 6}


def test_openai_mode_says_when_the_server_is_down(images):
    with FakeOpenAIServer() as server:
        url = server.url
    conversation = OpenAIBackend(url).new_conversation()  # nothing listens there any more
    with pytest.raises(UserFacingError, match="Cannot reach the server"):
        list(conversation.ask("Hello?", [], SETTINGS_OBJECT))


def test_openai_mode_says_when_the_server_does_not_answer(images):
    with FakeOpenAIServer(hang=True) as server:
        conversation = OpenAIBackend(server.url, model="nvlm", timeout=1).new_conversation()
        with pytest.raises(UserFacingError, match="did not answer within 1 s"):
            list(conversation.ask("Hello?", [], SETTINGS_OBJECT))


def test_the_page_in_front_of_a_server_streams_its_answer_and_says_when_it_is_down(images):
    with FakeOpenAIServer() as server, launched(build_app(OpenAIBackend(server.url), concurrency=8)) as url:
        messages, _, status, stats = ask(Client(url, verbose=False), "What colour is it?", images["red"])
        assert last_answer(messages) == "A red square." and status == "" and "prompt 300 tokens" in stats
        assert server.requests[0]["messages"][1]["content"][0]["type"] == "image_url"
    with launched(build_app(OpenAIBackend(server.url))) as url:  # the server has stopped
        _, _, status, _ = ask(Client(url, verbose=False), "Hello?")
        assert "Cannot reach the server" in status
