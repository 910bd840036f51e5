"""The fixture models' text: a deterministic recipe over files every machine here has offline.

Source: the CPython standard library's ``.py`` files (code, docstrings and comments; its own
tests included), read in sorted path order. A file goes to the held-out split when the SHA-1 of
its path relative to the library root is 0 mod 20 (about 5% of files), so the split does not
depend on which machine or Python patch release reads it. Documents are joined with one
``\\n\\n`` so a long context window spans several files, as concatenated pre-training data does.

Token ids are the byte tokenizer's (``kvfold.tiny_model``): the three specials, then the 256
bytes in the order of their GPT-2 byte-level characters' code points. ``byte_token_ids`` gives
that map without the tokenizers package, so the training machine needs plain torch only;
tests check it against the tokenizer itself.

    python -m benchmarks.quality.corpus --stdlib /usr/lib/python3.11 --out DIR
"""

from __future__ import annotations

import argparse
import hashlib
import lzma
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace

HELDOUT_MODULUS = 20
SEPARATOR = b"\n\n"
NUM_SPECIAL_TOKENS = 3  # <s>, </s>, <unk>: kvfold.tiny_model.SPECIAL_TOKENS


def gpt2_byte_chars() -> list[str]:
    """The printable character GPT-2's byte-level alphabet assigns to each byte 0..255."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def byte_token_ids() -> list[int]:
    """``ids[b]``: the byte tokenizer's token id of byte ``b``."""
    chars = gpt2_byte_chars()
    rank = {c: i for i, c in enumerate(sorted(chars))}
    return [NUM_SPECIAL_TOKENS + rank[c] for c in chars]


class ByteTokenizer:
    """The byte tokenizer's encoding as a callable with the transformers call signature the passkey
    prompt builder uses, without the tokenizers package (the training machine has plain torch)."""

    def __init__(self) -> None:
        self.ids = byte_token_ids()

    def __call__(self, text: str, add_special_tokens: bool = False) -> SimpleNamespace:
        return SimpleNamespace(input_ids=[self.ids[b] for b in text.encode()])


def is_heldout(relative_path: str) -> bool:
    digest = hashlib.sha1(relative_path.encode()).digest()
    return int.from_bytes(digest[:8], "big") % HELDOUT_MODULUS == 0


def stdlib_files(root: Path) -> Iterator[tuple[str, Path]]:
    """``(relative path, path)`` of every ``.py`` file under ``root`` but third-party packages."""
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(("site-packages/", "dist-packages/")):
            continue
        yield rel, path


def build(root: Path) -> tuple[bytes, bytes]:
    """``(train, heldout)`` bytes of the standard library under ``root``."""
    train, heldout = [], []
    for rel, path in stdlib_files(root):
        data = path.read_bytes()
        if data.strip():
            (heldout if is_heldout(rel) else train).append(data)
    return SEPARATOR.join(train), SEPARATOR.join(heldout)


def write(root: Path, out: Path) -> dict[str, int]:
    """Write ``train.txt.xz`` and ``heldout.txt.xz`` to ``out``; returns their sizes in bytes."""
    out.mkdir(parents=True, exist_ok=True)
    train, heldout = build(root)
    for name, data in (("train", train), ("heldout", heldout)):
        (out / f"{name}.txt.xz").write_bytes(lzma.compress(data, preset=9))
    return {"train_bytes": len(train), "heldout_bytes": len(heldout)}


def read(path: Path) -> bytes:
    return lzma.decompress(Path(path).read_bytes())


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stdlib", type=Path, required=True, help="a CPython Lib/ directory")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    print(write(args.stdlib, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
