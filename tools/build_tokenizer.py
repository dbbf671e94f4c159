"""Build NVLM-D-72B's tokenizer files offline, from the Qwen BPE ranks that ship with `dashscope`.

NVLM-D-72B uses Qwen2.5's tokenizer: Qwen2's byte-level BPE (151,643 tokens, 151,387 merges) plus 22 added
tokens at ids 151643..151664. This script rebuilds it without the Hub, from `dashscope/resources/qwen.tiktoken`
(Apache-2.0; the same ranks as Qwen2's `vocab.json`), and writes four files:

    vocab.json             token -> id, byte-identical to the checkpoint's vocab.json
    merges.txt             the BPE merges, byte-identical to the checkpoint's merges.txt
    tokenizer.json         the `tokenizers` pipeline: NFC, Qwen2's split regex, byte-level BPE, added tokens
    tokenizer_config.json  Qwen2.5's tokenizer settings, with NVLM's chat template instead of Qwen's

Regenerate them (dashscope and tiktoken are build-time tools, in the `test` extra; the `nvlm_d` package never
imports them):

    pip install dashscope tiktoken          # or: pip install -e .[test]
    python tools/build_tokenizer.py         # writes into nvlm_d/tokenizer/ (the repository root links to them)
    python tools/build_tokenizer.py --output DIR

How the files are derived:

1. vocab: transformers' `TikTokenConverter` reads the ranks (with tiktoken's loader) and spells each token's
   bytes with GPT-2's byte-to-unicode table; the rank is the id.
2. merges: a token of rank r is made by exactly one merge, the last step of BPE over its own bytes using only
   tokens of rank < r. Listing those merges in rank order gives one merge per multi-byte token (151,387) and
   reproduces Qwen2's merges.txt line for line. `TikTokenConverter`'s own merge list is not used: it keeps every
   split of a token whose two halves are tokens (294,166 merges), a superset that a `tokenizers` BPE model
   only agrees with when `ignore_merges` is set.
3. tokenizer.json: the pipeline transformers' `Qwen2Tokenizer` builds (NFC normalizer, Qwen2's
   pre-tokenization regex, byte-level pre-tokenizer/decoder/post-processor, BPE without `ignore_merges`), with
   the 22 added tokens and their flags. transformers 5 takes only the vocab, merges and post-processor from
   this file and rebuilds the rest itself; the full pipeline is there for readers that use the `tokenizers`
   library directly.
4. tokenizer_config.json: the checkpoint's settings (eos `<|im_end|>`, pad `<|endoftext|>`, no bos/unk,
   131072 max length, the 22 added tokens), except `chat_template`, which is `nvlm_d.conversation.CHAT_TEMPLATE`:
   NVLM's chatml without a newline after `<|im_end|>` and with the default system message
   "Answer the questions.", plus `padding_side: "left"` (the checkpoint names none, so right), where batched
   generation needs the padding.

The output is reproducible: two runs give byte-identical files (ordering by id, fixed JSON formatting).
tests/test_tokenizer.py checks the files against the checkpoint's and against a rebuild.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import sys
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# The files ship inside the package (the demo and tests need them after `pip install`); the repository root, a
# model directory, holds links to them.
DEFAULT_OUTPUT = REPO_ROOT / "nvlm_d" / "tokenizer"

# Qwen2's pre-tokenization regex (as in transformers' Qwen2Tokenizer): unlike GPT-4's cl100k pattern, digits are
# split one by one (`\p{N}` rather than `\p{N}{1,3}`).
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

NUM_RANKS = 151_643
NUM_MERGES = 151_387

# Qwen2.5's added tokens, in id order from NUM_RANKS, with their `special` flag. `<|endoftext|>` is the pad token;
# the next 13 are the additional special tokens; the last 8 (tool calls and fill-in-the-middle) are not special.
ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)

OUTPUT_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json")


def qwen_tiktoken_path() -> Path:
    """Where the installed `dashscope` keeps Qwen's BPE ranks."""
    spec = importlib.util.find_spec("dashscope")  # located, not imported: only its data file is needed
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "dashscope is needed to build the tokenizer (it ships Qwen's BPE ranks): pip install dashscope tiktoken"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise SystemExit(f"{path} not found: this dashscope version does not ship qwen.tiktoken")
    return path


def load_ranks(tiktoken_file: Path) -> tuple[dict[bytes, int], dict[str, int]]:
    """The BPE ranks (token bytes -> rank) and the byte-level vocabulary (token text -> id) from a tiktoken file."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    converter = TikTokenConverter(vocab_file=str(tiktoken_file), pattern=QWEN2_PATTERN)
    ranks = converter.load_tiktoken_bpe(str(tiktoken_file))
    vocab, _ = converter.extract_vocab_merges_from_model(str(tiktoken_file))
    if sorted(ranks.values()) != list(range(NUM_RANKS)):
        raise ValueError(f"{tiktoken_file}: expected the dense ranks 0..{NUM_RANKS - 1} of Qwen2's vocabulary")
    if any(bytes([byte]) not in ranks for byte in range(256)):
        raise ValueError(f"{tiktoken_file}: some single bytes have no rank; not a byte-level BPE vocabulary")
    if len(vocab) != NUM_RANKS:
        raise ValueError(f"{tiktoken_file}: {len(vocab)} distinct byte-level tokens, expected {NUM_RANKS}")
    return ranks, vocab


def _last_merge(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The pair whose merge makes `token`: BPE over its bytes, merging only into tokens of lower rank.

    Like tiktoken, each step merges the adjacent pair whose concatenation has the lowest rank (leftmost on ties).
    What is left when no such pair remains must be two pieces; their merge is the one that makes `token`.
    """
    limit = ranks[token]
    parts = [token[index : index + 1] for index in range(len(token))]
    while True:
        best_rank, best_index = limit, -1
        for index in range(len(parts) - 1):
            rank = ranks.get(parts[index] + parts[index + 1])
            if rank is not None and rank < best_rank:
                best_rank, best_index = rank, index
        if best_index < 0:
            break
        parts[best_index : best_index + 2] = [parts[best_index] + parts[best_index + 1]]
    if len(parts) != 2:
        raise ValueError(f"token {token!r} (rank {limit}) is not made by one merge of lower-ranked tokens: {parts}")
    return parts[0], parts[1]


def derive_merges(ranks: dict[bytes, int]) -> list[tuple[str, str]]:
    """One merge per multi-byte token, in rank order, spelled in byte-level unicode."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_encoder = bytes_to_unicode()

    def spell(piece: bytes) -> str:
        return "".join(byte_encoder[byte] for byte in piece)

    merges = []
    for token in sorted(ranks, key=ranks.__getitem__):
        if len(token) > 1:
            left, right = _last_merge(token, ranks)
            merges.append((spell(left), spell(right)))
    if len(merges) != NUM_MERGES:
        raise ValueError(f"derived {len(merges)} merges, expected {NUM_MERGES}")
    return merges


def build_backend(vocab: dict[str, int], merges: list[tuple[str, str]]):
    """The `tokenizers.Tokenizer` that transformers' Qwen2Tokenizer builds, with the 22 added tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    backend = Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
            ignore_merges=False,
        )
    )
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    backend.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()  # decoding only maps the byte-level characters back to bytes
    for offset, (content, special) in enumerate(ADDED_TOKENS):
        added = AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=special)
        if special:
            backend.add_special_tokens([added])
        else:
            backend.add_tokens([added])
        if backend.token_to_id(content) != NUM_RANKS + offset:
            raise ValueError(f"{content} got id {backend.token_to_id(content)}, expected {NUM_RANKS + offset}")
    return backend


def load_chat_template() -> str:
    """`CHAT_TEMPLATE` from nvlm_d/conversation.py, loaded by path (the package need not be installed)."""
    path = REPO_ROOT / "nvlm_d" / "conversation.py"
    spec = importlib.util.spec_from_file_location("_nvlm_d_conversation", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is being created
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module.CHAT_TEMPLATE


def tokenizer_config(chat_template: str) -> dict:
    """tokenizer_config.json: the checkpoint's settings, NVLM's chat template, and left padding (a decoder-only
    model generates after each row's last token; batched `tokenizer(..., padding=True)` and pipelines then pad where
    generation expects it)."""
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(NUM_RANKS + offset): {
                "content": content,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": special,
            }
            for offset, (content, special) in enumerate(ADDED_TOKENS)
        },
        "additional_special_tokens": [content for content, special in ADDED_TOKENS[1:] if special],
        "bos_token": None,
        "chat_template": chat_template,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "padding_side": "left",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def render_files(tiktoken_file: Path) -> dict[str, bytes]:
    """The four files' contents, by file name."""
    ranks, vocab = load_ranks(tiktoken_file)
    merges = derive_merges(ranks)
    backend = build_backend(vocab, merges)
    by_id = dict(sorted(vocab.items(), key=lambda item: item[1]))
    serialized = json.loads(backend.to_str())
    # Merges as "left right" strings, one per line, like the tokenizer.json of Qwen's own checkpoints (`tokenizers`
    # reads both this and its newer [left, right] form; byte-level tokens never contain a space).
    serialized["model"]["merges"] = [f"{left} {right}" for left, right in merges]
    return {
        # Same bytes as the checkpoint's files: compact JSON in id order without a final newline, and
        # merges one per line without a `#version` header.
        "vocab.json": json.dumps(by_id, ensure_ascii=False, separators=(",", ":")).encode("utf-8"),
        "merges.txt": "".join(f"{left} {right}\n" for left, right in merges).encode("utf-8"),
        # `tokenizers` serializes in a fixed order (vocab by id, merges by rank, added tokens by id).
        "tokenizer.json": (json.dumps(serialized, ensure_ascii=False, indent=2) + "\n").encode("utf-8"),
        "tokenizer_config.json": (
            json.dumps(tokenizer_config(load_chat_template()), ensure_ascii=False, indent=2, sort_keys=True) + "\n"
        ).encode("utf-8"),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--output",
        type=Path,
        default=DEFAULT_OUTPUT,
        help="directory to write the four files into (default: nvlm_d/tokenizer)",
    )
    parser.add_argument(
        "--tiktoken-file",
        type=Path,
        default=None,
        help="Qwen's BPE ranks (default: qwen.tiktoken from the installed dashscope)",
    )
    args = parser.parse_args(argv)
    tiktoken_file = args.tiktoken_file or qwen_tiktoken_path()
    digest = hashlib.sha256(tiktoken_file.read_bytes()).hexdigest()
    print(f"ranks: {tiktoken_file} (sha256 {digest})")
    files = render_files(tiktoken_file)
    args.output.mkdir(parents=True, exist_ok=True)
    for name in OUTPUT_FILES:
        (args.output / name).write_bytes(files[name])
        print(f"wrote {args.output / name} ({len(files[name]):,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
