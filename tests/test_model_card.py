"""The model card's inference snippet runs as written, on the CPU, against a tiny checkpoint.

The script is the card's "Inference" code (its helpers in model_card_code.py, then the usage lines below) changed
only where this
machine differs from the card's: the path is the tiny checkpoint instead of "nvidia/NVLM-D-72B", the image is a
generated file instead of 'path/to/your/example/image.jpg', and with no GPU the model is loaded without
`device_map=split_model()` (the card's split_model maps everything to GPU 0) and `max_new_tokens` is 32
instead of 1024, to keep the test quick.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import model_card_code
import numpy as np
from PIL import Image

CARD_USAGE = """
path = __PATH__
model = AutoModel.from_pretrained(
    path,
    torch_dtype=torch.bfloat16,
    low_cpu_mem_usage=True,
    use_flash_attn=False,
    trust_remote_code=True).eval()
print(model)

tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True, use_fast=False)
generation_config = dict(max_new_tokens=32, do_sample=False)

# pure-text conversation
question = 'Hello, who are you?'
response, history = model.chat(tokenizer, None, question, generation_config, history=None, return_history=True)
print(f'User: {question}\\nAssistant: {response}')

# single-image single-round conversation
pixel_values = load_image(__IMAGE__, max_num=6).to(
    torch.bfloat16)
question = '\\nPlease describe the image shortly.'
response = model.chat(tokenizer, pixel_values, question, generation_config)
print(f'User: {question}\\nAssistant: {response}')
"""


def test_model_card_inference_snippet_runs_as_written_on_the_cpu(tiny_checkpoint, tmp_path):
    image = tmp_path / "example.jpg"
    pixels = np.random.default_rng(0).integers(0, 256, size=(600, 1000, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(image)
    script = tmp_path / "card.py"
    usage = CARD_USAGE.replace("__PATH__", repr(str(tiny_checkpoint))).replace("__IMAGE__", repr(str(image)))
    script.write_text(Path(model_card_code.__file__).read_text() + usage)

    # an outer limit only a hung script reaches: the card's code loads a model, slowly on a busy machine
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=1800, cwd=tmp_path)

    assert result.returncode == 0, result.stderr[-3000:]
    assert "NVLM_D_Model(" in result.stdout  # print(model)
    assert "User: Hello, who are you?\nAssistant: " in result.stdout
    assert "User: \nPlease describe the image shortly.\nAssistant: " in result.stdout
    assert "Traceback" not in result.stderr, textwrap.shorten(result.stderr, 2000)
