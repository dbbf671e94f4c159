"""Registers NVLM-D with transformers' Auto classes, without importing transformers before the user does.

`AutoConfig.register` and `AutoModel.register` need transformers' auto modules, and those import torch: about 4 s
at `import nvlm_d`, paid also by `nvlm-d --help`. Instead, `import nvlm_d` puts a finder on `sys.meta_path` that
watches transformers' own imports and registers NVLM-D as soon as the auto module an entry needs is loaded:
`from transformers import AutoModel` (or anything that loads it) is enough, whether it comes before or after
`import nvlm_d`.

A registration imports this package's modeling code, which imports transformers modules in turn. Done in the
middle of a transformers import (modules such as `modeling_layers` import `AutoModel` halfway through their own
code), it would meet those modules half-initialized. So the finder counts the transformers (and nvlm_d) modules
being executed and registers only when none is: when the outermost import that loaded the auto module returns.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from importlib.machinery import ModuleSpec
from types import ModuleType


def _register_configs() -> None:
    from transformers import AutoConfig

    from .configuration_nvlm_d import InternVisionConfig, NVLM_D_Config

    AutoConfig.register(NVLM_D_Config.model_type, NVLM_D_Config, exist_ok=True)
    AutoConfig.register(InternVisionConfig.model_type, InternVisionConfig, exist_ok=True)


def _register_models() -> None:
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText

    from .configuration_nvlm_d import InternVisionConfig, NVLM_D_Config
    from .modeling_intern_vit import InternVisionModel
    from .modeling_nvlm_d import NVLM_D_Model

    AutoModel.register(NVLM_D_Config, NVLM_D_Model, exist_ok=True)
    AutoModelForCausalLM.register(NVLM_D_Config, NVLM_D_Model, exist_ok=True)
    AutoModelForImageTextToText.register(NVLM_D_Config, NVLM_D_Model, exist_ok=True)
    AutoModel.register(InternVisionConfig, InternVisionModel, exist_ok=True)


def _register_image_processor() -> None:
    from transformers import AutoImageProcessor

    from .configuration_nvlm_d import NVLM_D_Config
    from .image_processing_nvlm_d import NVLM_D_ImageProcessor

    # One class whatever backend is asked for: the tiles must be PIL's bicubic resize to equal the card's, bit for bit.
    backends = {"pil": NVLM_D_ImageProcessor, "torchvision": NVLM_D_ImageProcessor}
    AutoImageProcessor.register(NVLM_D_Config, image_processor_classes=backends, exist_ok=True)


def _register_processor() -> None:
    from transformers import AutoProcessor

    from .configuration_nvlm_d import NVLM_D_Config
    from .processing_nvlm_d import NVLM_D_Processor

    AutoProcessor.register(NVLM_D_Config, NVLM_D_Processor, exist_ok=True)


def _register_tokenizer_template() -> None:
    from transformers import AutoTokenizer

    from .tokenizer_template import wrap_auto_tokenizer

    # Not a registration: the released snapshot's tokenizer_config.json names its class, so transformers never asks
    # the Auto mapping; the wrapper gives NVLM-D's tokenizer NVLM's chat template (see `tokenizer_template`).
    wrap_auto_tokenizer(AutoTokenizer)


# The transformers module that defines an Auto class -> what to register once it is loaded. A new Auto class
# (AutoProcessor, AutoImageProcessor, ...) is one entry more.
REGISTRATIONS: dict[str, Callable[[], None]] = {
    "transformers.models.auto.configuration_auto": _register_configs,
    "transformers.models.auto.modeling_auto": _register_models,
    "transformers.models.auto.image_processing_auto": _register_image_processor,
    "transformers.models.auto.processing_auto": _register_processor,
    "transformers.models.auto.tokenization_auto": _register_tokenizer_template,
}


class _RegisterAfterTransformersImports:
    """A meta path finder that finds nothing itself: it wraps the loader of every transformers and nvlm_d module,
    so that it knows when a thread is no longer executing any of them, and then runs the registrations whose
    transformers module is loaded.

    nvlm_d's modules count too: `from nvlm_d.modeling_nvlm_d import NVLM_D_Model` loads transformers' auto
    modules halfway through `modeling_nvlm_d`, which the registration imports. The count is per thread: a module
    another thread is executing is never seen half-initialized (the import system makes this thread wait for
    it), only one on this thread's own import stack is.
    """

    WATCHED = ("transformers", "nvlm_d")

    def __init__(self, registrations: dict[str, Callable[[], None]]) -> None:
        self.pending = dict(registrations)
        self.lock = threading.Lock()  # guards `pending`; never held while importing
        self.local = threading.local()

    def find_spec(self, fullname: str, path=None, target: ModuleType | None = None) -> ModuleSpec | None:
        if fullname.partition(".")[0] not in self.WATCHED:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _CountingLoader(spec.loader, self)
        return spec

    def enter(self) -> None:
        self.local.executing = getattr(self.local, "executing", 0) + 1

    def leave(self) -> None:
        self.local.executing -= 1
        if self.local.executing == 0:
            self.run_ready()

    def run_ready(self) -> None:
        """Run (once) every registration whose transformers module is loaded; retire the finder when none is left.

        The registrations count as executing, so that the imports they make do not start the next one halfway."""
        while True:
            with self.lock:
                registrations = [self.pending.pop(name) for name in list(self.pending) if name in sys.modules]
                if not self.pending and self in sys.meta_path:
                    sys.meta_path.remove(self)
            if not registrations:
                return
            self.enter()
            try:
                for register in registrations:
                    _register_or_warn(register)
            finally:
                self.local.executing -= 1


def _register_or_warn(register: Callable[[], None]) -> None:
    try:
        register()
    except Exception as exc:  # never break the user's own transformers import
        from transformers.utils import logging

        logging.get_logger(__name__).warning(
            f"nvlm_d could not register NVLM-D with transformers' Auto classes ({type(exc).__name__}: {exc}); "
            "load model directories with trust_remote_code=True"
        )


class _CountingLoader:
    """A watched module's own loader, counting the module as executing while its code runs."""

    def __init__(self, loader, finder: _RegisterAfterTransformersImports) -> None:
        self._loader = loader
        self._finder = finder

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._finder.enter()
        try:
            self._loader.exec_module(module)
        finally:
            self._finder.leave()

    def __getattr__(self, name: str):  # get_source, get_resource_reader, ...: the real loader's
        return getattr(self._loader, name)


def install() -> None:
    """Register NVLM-D with the Auto classes already loaded, and as soon as the others are."""
    finder = _RegisterAfterTransformersImports(REGISTRATIONS)
    sys.meta_path.insert(0, finder)
    finder.run_ready()
