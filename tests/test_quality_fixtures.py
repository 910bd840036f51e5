"""The quality fixtures: data recipe, token ids, training script, and the committed checkpoints.

The checkpoints (benchmarks/quality/fixtures/{rope,rope_pp}) were trained on a GPU by
benchmarks/quality/train_fixtures.py; here they must load in transformers / kvfold's RoPE++ model
and compute what the training module computes, and still model held-out text.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks.quality import corpus
from benchmarks.quality.fixture_model import FixtureConfig, FixtureLM, export, load
from benchmarks.quality.passkey import FILLER, QUESTION
from benchmarks.quality.train_fixtures import INTRO, Batches
from benchmarks.quality.train_fixtures import main as train_main

FIXTURES = Path(__file__).resolve().parent.parent / "benchmarks" / "quality" / "fixtures"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from kvfold.tiny_model import write_byte_tokenizer

    path = tmp_path_factory.mktemp("tok")
    write_byte_tokenizer(path)
    return AutoTokenizer.from_pretrained(path)


def test_byte_token_ids_are_the_tokenizers(tokenizer) -> None:
    ids = corpus.byte_token_ids()
    assert len(set(ids)) == 256 and min(ids) == corpus.NUM_SPECIAL_TOKENS
    # The tokenizer sees UTF-8 text; its byte-level pre-tokenizer maps every byte of it to one token.
    sample = "def f(x):\n    return 'é' + \"ü\" * 2  # ß\t\x00\x7f 日本"
    assert tokenizer(sample, add_special_tokens=False).input_ids == [ids[b] for b in sample.encode()]


def test_training_prompts_are_the_harness_prompts(tokenizer) -> None:
    batches = Batches(b"some held-out text " * 500, 512, 1.0, 0)
    for piece in (INTRO, "\n" + QUESTION, FILLER, " The pass key is 12345. Remember it. 12345 is the pass key. "):
        assert batches.ids(piece.encode()).tolist() == tokenizer(piece, add_special_tokens=False).input_ids
    ids, mask = batches.draw(3)
    assert ids.shape == (3, 513) and mask.shape == (3, 512)
    decode = {t: b for b, t in enumerate(corpus.byte_token_ids())}
    for row in range(3):
        targets = ids[row, 1:][mask[row]].tolist()
        assert len(targets) == 6
        answer = bytes(decode[t] for t in targets).decode()
        before = bytes(decode[t] for t in ids[row, :int(mask[row].nonzero()[0]) + 1].tolist()).decode()
        assert before.endswith(QUESTION) and answer[0] == " " and f"pass key is{answer}" in before


def test_heldout_split_is_by_path_and_stable(tmp_path) -> None:
    root = tmp_path / "Lib"
    for name in ("a.py", "pkg/b.py", "site-packages/c.py", "pkg/d.txt"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(f"# {name}\nx = 1\n")
    files = [rel for rel, _ in corpus.stdlib_files(root)]
    assert files == ["a.py", "pkg/b.py"]
    train, heldout = corpus.build(root)
    for f in files:  # every file lands in exactly one split, whole
        assert ((root / f).read_bytes() in train) != ((root / f).read_bytes() in heldout)
    assert corpus.is_heldout("json/decoder.py") == corpus.is_heldout("json/decoder.py")
    share = sum(corpus.is_heldout(f"m{i}.py") for i in range(4000)) / 4000
    assert 0.03 < share < 0.07


def test_training_script_runs_and_exports(tmp_path, tokenizer) -> None:
    data = tmp_path / "data"
    data.mkdir()
    text = (Path(corpus.__file__).read_bytes() + b"\n\n") * 20
    import lzma

    for name in ("train", "heldout"):
        (data / f"{name}.txt.xz").write_bytes(lzma.compress(text))
    assert train_main(["--data", str(data), "--out", str(tmp_path / "out"), "--seq-len", "384", "--batch", "2",
                       "--max-steps", "2", "--warmup", "1", "--eval-lengths", "384"]) == 0
    curves = json.loads((tmp_path / "out" / "curves.json").read_text())
    assert curves["trained_steps"] == 2 and {"rope", "rope_pp"} <= set(curves["steps"][0])
    evaluation = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert set(evaluation["rope"]["passkey"]) == {"384@0.1", "384@0.5", "384@0.9"}
    exported = export(tmp_path / "out" / "rope_pp" / "model.safetensors", FixtureConfig(rope_pp=True),
                      tmp_path / "rope_pp")
    config = json.loads((exported / "config.json").read_text())
    assert config["rope_config"] == {"imag": True, "imag_mode": "imag2"}
    assert config["architectures"] == ["LlamaForCausalLM"]


@pytest.mark.parametrize("name", ["rope", "rope_pp"])
def test_committed_fixture_matches_its_loaders(name) -> None:
    """transformers' Llama (RoPE) / kvfold's RoPE++ model compute what the training module computed."""
    from kvfold.attention_backends.vqkv.calibrate import load_model

    ours = load(FIXTURES / name)
    theirs = load_model(FIXTURES / name, torch.float32, "cpu")
    ids = torch.randint(3, 259, (1, 200), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(ids), theirs(ids, use_cache=False).logits
    assert ((a - b).abs().max() / b.abs().max()).item() < 1e-4


@pytest.mark.parametrize("name", ["rope", "rope_pp"])
def test_committed_fixture_models_heldout_text(name) -> None:
    """Trained, not random: held-out stdlib source at under 1.3 nats per byte (uniform: 5.56; the
    committed checkpoints: 0.90-0.93 on this window)."""
    model = load(FIXTURES / name)
    lut = torch.tensor(corpus.byte_token_ids())
    data = corpus.read(FIXTURES / "heldout.txt.xz")[700_000:702_049]
    ids = lut[torch.frombuffer(bytearray(data), dtype=torch.uint8).long()][None]
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(ids[:, :-1])[0], ids[0, 1:]).item()
    assert loss < 1.3
    fixture = json.loads((FIXTURES / name / "fixture.json").read_text())
    assert fixture["trained_context"] == 8192 and fixture["config"]["rope_pp"] == (name == "rope_pp")


def test_fixture_module_shapes() -> None:
    model = FixtureLM(FixtureConfig(num_layers=1, rope_pp=True))
    assert model.model.layers[0].self_attn.o_proj.in_features == 2 * 4 * 64
    assert model(torch.zeros(1, 5, dtype=torch.long)).shape == (1, 5, 259)
