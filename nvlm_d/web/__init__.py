"""`nvlm-d web`: a chat page (Gradio) in front of NVLM-D in this process or of an OpenAI-compatible server.

    from nvlm_d.web import InProcessBackend, build_app
    build_app(InProcessBackend(model, tokenizer)).launch()          # 127.0.0.1:7860

Gradio is the `[web]` extra; it is imported by `build_app` only, so the backends work without it.
"""

from .app import build_app
from .backends import (
    Conversation,
    InProcessBackend,
    OpenAIBackend,
    Settings,
    TurnStats,
    UserFacingError,
)
from .sessions import SessionStore
from .uploads import TiledUpload, UploadError, tile_upload

__all__ = [
    "Conversation",
    "InProcessBackend",
    "OpenAIBackend",
    "SessionStore",
    "Settings",
    "TiledUpload",
    "TurnStats",
    "UploadError",
    "UserFacingError",
    "build_app",
    "tile_upload",
]
