"""A CLIP processor built locally (no hub), for the demo's model and the tests' tiny ones.

The tokenizer is OpenAI CLIP's BPE vocabulary as shipped inside the `open-clip-torch` wheel
(installed without its dependencies); vocab.json and merges.txt are rebuilt from it exactly as
CLIP's own simple tokenizer does, so token ids match `openai/clip-vit-base-patch32`.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path
from typing import Any

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"


def _bytes_to_unicode() -> dict[int, str]:
    chars = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    chars += list(range(ord("®"), ord("ÿ") + 1))
    codes = chars[:]
    extra = 0
    for b in range(256):
        if b not in chars:
            chars.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(chars, (chr(c) for c in codes), strict=True))


def find_bpe_file() -> Path:
    """CLIP's BPE merges file from the installed open-clip-torch package (not imported)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "CLIP's BPE vocabulary was not found: `pip install --no-deps open-clip-torch`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / BPE_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the open-clip-torch install")
    return path


def write_clip_tokenizer(out: Path) -> None:
    """Write vocab.json and merges.txt of OpenAI CLIP's tokenizer into `out`."""
    with gzip.open(find_bpe_file()) as fh:
        lines = fh.read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(_bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (out / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n"
    )


def build_processor(out: Path, *, image_size: int) -> Any:
    """A CLIPProcessor (real CLIP tokenizer, CLIP image processor at `image_size`)."""
    from transformers import CLIPImageProcessor, CLIPProcessor, CLIPTokenizer

    write_clip_tokenizer(out)
    try:  # transformers 5: one tokenizers-backed class taking the files' paths
        tokenizer = CLIPTokenizer(vocab=str(out / "vocab.json"), merges=str(out / "merges.txt"))
    except TypeError:  # transformers 4
        tokenizer = CLIPTokenizer(
            vocab_file=str(out / "vocab.json"), merges_file=str(out / "merges.txt")
        )
    images = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return CLIPProcessor(image_processor=images, tokenizer=tokenizer)  # type: ignore[no-untyped-call]
