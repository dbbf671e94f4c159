"""`save_pretrained` (of the model and of the processor) writes a self-contained model directory that loads through
`trust_remote_code` alone, as the Hub repo does, in a process where the `nvlm_d` package cannot be imported; and the
repository root, the layout of that Hub repo, is such a directory too (with a copy of its files beside weights)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from nvlm_d.remote_code import PACKAGE_DIR, remote_code_files
from nvlm_d.tiny import build_tiny_model, save_tiny_checkpoint

# Makes `import nvlm_d` fail, so the subprocess can only use the code inside the model directory.
BLOCK_NVLM_D = textwrap.dedent(
    """
    import sys

    class _BlockNvlmD:
        def find_spec(self, name, path=None, target=None):
            if name == "nvlm_d" or name.startswith("nvlm_d."):
                raise ImportError("nvlm_d is blocked in this process")

    sys.meta_path.insert(0, _BlockNvlmD())
    try:
        import nvlm_d
    except ImportError:
        pass
    else:
        raise SystemExit("nvlm_d is importable")
    """
)


OUTER_LIMIT_S = 1800  # for a subprocess that loads a tiny model: only a hung interpreter gets near it


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny_saved"), seed=11)


def run_isolated(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", BLOCK_NVLM_D + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=OUTER_LIMIT_S,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def test_saved_directory_is_self_contained(saved_dir):
    config = json.loads((saved_dir / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_nvlm_d.NVLM_D_Config",
        "AutoModel": "modeling_nvlm_d.NVLM_D_Model",
        "AutoModelForCausalLM": "modeling_nvlm_d.NVLM_D_Model",
        "AutoModelForImageTextToText": "modeling_nvlm_d.NVLM_D_Model",
    }
    assert json.loads((saved_dir / "processor_config.json").read_text())["auto_map"] == {
        "AutoProcessor": "processing_nvlm_d.NVLM_D_Processor"
    }
    for name in remote_code_files():
        assert (saved_dir / name).is_file(), name
    assert (saved_dir / "model.safetensors").is_file()
    assert not list(saved_dir.glob("*.bin"))


def test_checkpoint_loads_with_the_model_card_arguments_without_the_package(saved_dir):
    output = run_isolated(
        f"""
        import torch
        from safetensors.torch import load_file
        from transformers import AutoModel

        model = AutoModel.from_pretrained(
            {str(saved_dir)!r}, torch_dtype=torch.bfloat16, low_cpu_mem_usage=True, use_flash_attn=False,
            trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
        saved = load_file({str(saved_dir / "model.safetensors")!r})
        state = model.state_dict()
        assert sorted(state) == sorted(saved), set(state) ^ set(saved)
        for name, tensor in saved.items():
            assert state[name].dtype == torch.bfloat16, (name, state[name].dtype)
            assert torch.equal(state[name], tensor.to(torch.bfloat16)), name
        print("loaded", len(saved), "tensors")
        """
    )
    assert "loaded" in output


def test_remote_model_gives_the_logits_of_the_package_model(saved_dir, tmp_path):
    import torch

    model = build_tiny_model(seed=11)
    input_ids = torch.tensor([[151644, 872, 198] + [151654] * 256 + [9707, 1879]])
    pixel_values = torch.randn(1, 3, 448, 448, generator=torch.Generator().manual_seed(2))
    torch.save({"input_ids": input_ids, "pixel_values": pixel_values}, tmp_path / "inputs.pt")
    with torch.no_grad():
        expected = model(pixel_values=pixel_values, input_ids=input_ids).logits
    run_isolated(
        f"""
        import torch
        from transformers import AutoModel

        model = AutoModel.from_pretrained({str(saved_dir)!r}, trust_remote_code=True).eval()
        inputs = torch.load({str(tmp_path / "inputs.pt")!r})
        with torch.no_grad():
            logits = model(pixel_values=inputs["pixel_values"], input_ids=inputs["input_ids"]).logits
        torch.save(logits, {str(tmp_path / "logits.pt")!r})
        """
    )
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected)


def test_with_the_package_imported_a_model_directory_loads_without_remote_code(saved_dir):
    from transformers import AutoModel

    import nvlm_d

    model = AutoModel.from_pretrained(saved_dir)
    assert type(model) is nvlm_d.NVLM_D_Model


def test_processor_and_model_answer_through_remote_code_without_the_package(saved_dir, tmp_path):
    from PIL import Image
    from transformers import AutoTokenizer

    from nvlm_d.image_processing_nvlm_d import load_image

    Image.effect_mandelbrot((900, 500), (-2.0, -1.2, 1.0, 1.2), 100).convert("RGB").save(tmp_path / "image.png")
    model = build_tiny_model(seed=11)
    tokenizer = AutoTokenizer.from_pretrained(saved_dir)
    pixel_values = load_image(tmp_path / "image.png", max_num=6)
    expected = model.chat(tokenizer, pixel_values, "Describe.", {"max_new_tokens": 6, "do_sample": False})
    output = run_isolated(
        f"""
        from transformers import AutoModel, AutoProcessor

        processor = AutoProcessor.from_pretrained({str(saved_dir)!r}, trust_remote_code=True)
        model = AutoModel.from_pretrained({str(saved_dir)!r}, trust_remote_code=True).eval()
        messages = [{{"role": "user", "content": [
            {{"type": "image", "image": {str(tmp_path / "image.png")!r}}}, {{"type": "text", "text": "Describe."}}]}}]
        inputs = processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
        new_tokens = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        print("ANSWER:" + processor.batch_decode(new_tokens, skip_special_tokens=True)[0].strip())
        """
    )
    assert output.split("ANSWER:", 1)[1].strip() == expected


# --------------------------------------------------------------------------------------------------------
# The repository root is a model directory (the Hub repo's layout)
# --------------------------------------------------------------------------------------------------------


def test_every_remote_code_module_stands_at_the_repository_root_as_a_link_into_the_package(repo_root):
    linked = sorted(path.name for path in repo_root.glob("*.py") if path.is_symlink())
    assert linked == remote_code_files()
    for name in linked:
        assert (repo_root / name).resolve() == PACKAGE_DIR / name
    # The only other Python file at the root is the model card's evaluation command, a script and no remote code.
    assert sorted(path.name for path in repo_root.glob("*.py") if not path.is_symlink()) == ["run_eval.py"]


def test_no_remote_code_module_imports_one_that_imports_it_back():
    from transformers.dynamic_module_utils import get_relative_imports

    imports = {
        name: {f"{module}.py" for module in get_relative_imports(PACKAGE_DIR / name)} for name in remote_code_files()
    }

    def reaches(start: str, target: str, seen: set[str]) -> bool:
        return any(n == target or (n not in seen and reaches(n, target, seen | {n})) for n in imports[start])

    assert [name for name in imports if reaches(name, name, {name})] == []


def root_files(repo_root: Path) -> list[Path]:
    """What a model directory takes from the root: its modules, tokenizer and processor files (not the 72B config)."""
    names = [*remote_code_files(), "processor_config.json", "tokenizer_config.json", "tokenizer.json"]
    return [repo_root / name for name in [*names, "vocab.json", "merges.txt"]]


@pytest.fixture(scope="module")
def root_copy(repo_root, saved_dir, tmp_path_factory) -> Path:
    """The root's files copied (links followed) beside tiny weights: the tiny checkpoint's config and safetensors."""
    directory = tmp_path_factory.mktemp("root_copy")
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        os.link(saved_dir / name, directory / name)
    for path in root_files(repo_root):
        shutil.copyfile(path, directory / path.name)
    return directory


def test_the_repository_root_and_a_copy_of_its_files_beside_weights_load_and_chat_without_the_package(
    repo_root, root_copy, tmp_path
):
    from PIL import Image
    from transformers import AutoTokenizer

    from nvlm_d.image_processing_nvlm_d import load_image

    Image.effect_mandelbrot((900, 500), (-2.0, -1.2, 1.0, 1.2), 100).convert("RGB").save(tmp_path / "image.png")
    model = build_tiny_model(seed=11)
    tokenizer = AutoTokenizer.from_pretrained(root_copy)
    settings = {"max_new_tokens": 6, "do_sample": False}
    expected = {
        "image": model.chat(tokenizer, load_image(tmp_path / "image.png", max_num=6), "Describe.", settings),
        "text": model.chat(tokenizer, None, "Hello, who are you?", settings),
    }
    output = run_isolated(
        f"""
        import json
        import torch
        from transformers import AutoConfig, AutoModel, AutoProcessor, AutoTokenizer

        root, copy, image = {str(repo_root)!r}, {str(root_copy)!r}, {str(tmp_path / "image.png")!r}
        config = AutoConfig.from_pretrained(root, trust_remote_code=True)
        with torch.device("meta"):  # the root holds NVLM-D-72B's config, no weights: its modules build the model
            full_size = AutoModel.from_config(config, trust_remote_code=True)
        AutoTokenizer.from_pretrained(root, trust_remote_code=True)
        root_processor = AutoProcessor.from_pretrained(root, trust_remote_code=True)
        assert type(full_size).__module__.startswith("transformers_modules."), type(full_size).__module__
        assert type(root_processor).__module__.startswith("transformers_modules."), type(root_processor).__module__

        model = AutoModel.from_pretrained(copy, trust_remote_code=True).eval()
        tokenizer = AutoTokenizer.from_pretrained(copy, trust_remote_code=True, use_fast=False)
        processor = AutoProcessor.from_pretrained(copy, trust_remote_code=True)
        pixel_values = processor(text="<image>", images=[image], return_tensors="pt").pixel_values
        settings = {{"max_new_tokens": 6, "do_sample": False}}
        answers = {{
            "image": model.chat(tokenizer, pixel_values, "Describe.", settings),
            "text": model.chat(tokenizer, None, "Hello, who are you?", settings),
        }}
        print("ANSWERS:" + json.dumps(answers))
        """
    )
    assert json.loads(output.split("ANSWERS:", 1)[1]) == expected
