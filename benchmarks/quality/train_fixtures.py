"""Train the quality fixtures: two byte-level Llama decoders, standard RoPE and RoPE++ (EC), on the
same batches for the same number of steps, at 8,192-token context with a passkey-retrieval mix.

Plain torch on one GPU; both models live in one process and take turns on every batch, so "identical
data and budget" holds by construction even when the run is stopped by its deadline. The step count
is fixed after a short warm-up from the measured step time (``--minutes``), and the learning-rate
schedule (linear warm-up, constant, cosine decay over the last ``--decay`` of the steps) follows it.

Data (``benchmarks/quality/corpus.py``): CPython standard-library source, 5% of files held out.
Each sequence is either plain text (language modelling) or a passkey sample in exactly the prompt
format of ``benchmarks/quality/passkey.py`` (intro, filler with a five-digit key at a random depth,
question), followed by the answer " KEY." and then plain text up to the sequence length. Half the
passkey samples use that harness's "grass is green" filler, half use corpus text, so retrieval is
learnt over real text too. The loss is the mean next-token loss plus the mean loss of the answer
digits (a separate term: 5 tokens among 8,192 would otherwise barely move the weights).

Output (``--out``): ``rope/model.safetensors``, ``rope_pp/model.safetensors`` (bf16, transformers'
Llama names), ``curves.json`` (losses per logged step), ``eval.json`` (held-out loss by position
bucket at 2k-16k, passkey accuracy by length and depth, in torch), ``train.log``.

    python -m benchmarks.quality.train_fixtures --data DIR --out OUT --minutes 8
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.quality import corpus
from benchmarks.quality.fixture_model import FixtureConfig, FixtureLM
from benchmarks.quality.passkey import FILLER, INTRO, QUESTION, build_prompt, needle

VARIANTS = {"rope": False, "rope_pp": True}


class Batches:
    """Token batches from the training bytes; every draw is from one seeded ``random.Random``."""

    def __init__(self, data: bytes, seq_len: int, passkey_fraction: float, seed: int) -> None:
        self.lut = torch.tensor(corpus.byte_token_ids(), dtype=torch.int16)
        self.data = data
        self.tokens = self.lut[torch.frombuffer(bytearray(data), dtype=torch.uint8).long()]
        self.seq_len, self.passkey_fraction = seq_len, passkey_fraction
        if passkey_fraction > 0 and seq_len < 320:
            raise ValueError(f"--seq-len {seq_len}: a passkey sample needs at least 320 tokens")
        self.rng = random.Random(seed)

    def ids(self, text: bytes) -> torch.Tensor:
        return self.lut[torch.frombuffer(bytearray(text), dtype=torch.uint8).long()]

    def text(self, n: int) -> torch.Tensor:
        start = self.rng.randrange(0, len(self.tokens) - n - 1)
        return self.tokens[start:start + n]

    def passkey(self, n: int) -> tuple[torch.Tensor, int]:
        """A prompt of the harness's format of about ``length`` tokens + answer, and the answer's start.

        The same pieces as ``passkey.build_prompt`` (tested equal), assembled here in the order of
        random draws the committed fixtures were trained with (the haystack text before the depth).
        """
        length = self.rng.randint(256, n - 64)
        key = self.rng.randint(10000, 99999)
        intro, question = self.ids(INTRO.encode()), self.ids(("\n" + QUESTION).encode())
        pin = self.ids(needle(key).encode())
        answer = self.ids(f" {key}.".encode())
        room = length - len(intro) - len(pin) - len(question)
        if self.rng.random() < 0.5:
            filler = self.ids(FILLER.encode())
            hay = filler.repeat(room // len(filler) + 1)[:room]
        else:
            hay = self.text(room)
        at = round(self.rng.random() * room)
        prompt = torch.cat((intro, hay[:at], pin, hay[at:], question))
        return torch.cat((prompt, answer)), len(prompt)

    def draw(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids [batch, seq_len + 1] int64, answer mask [batch, seq_len] bool)`` (mask on targets)."""
        n = self.seq_len + 1
        rows, masks = [], []
        for _ in range(batch):
            mask = torch.zeros(self.seq_len, dtype=torch.bool)
            if self.rng.random() < self.passkey_fraction:
                sample, answer_at = self.passkey(n)
                row = torch.cat((sample, self.text(n - len(sample))))
                mask[answer_at - 1:answer_at - 1 + 6] = True  # targets " " and the 5 digits
            else:
                row = self.text(n)
            rows.append(row)
            masks.append(mask)
        return torch.stack(rows).long(), torch.stack(masks)


def losses(model: FixtureLM, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(next-token loss, answer loss, answer-token accuracy) of one batch."""
    logits = model(ids[:, :-1]).float()
    per_token = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    lm = per_token.mean()
    if not mask.any():
        zero = per_token.new_zeros(())
        return lm, zero, zero
    answer = per_token[mask].mean()
    accuracy = (logits.argmax(-1)[mask] == ids[:, 1:][mask]).float().mean()
    return lm, answer, accuracy


def learning_rate(step: int, total: int, peak: float, warmup: int, decay: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    start = int(total * (1 - decay))
    if step < start:
        return peak
    frac = min(1.0, (step - start) / max(1, total - start))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


@torch.no_grad()
def evaluate(models: dict[str, FixtureLM], heldout: bytes, batches: Batches, lengths: Sequence[int],
             depths: Sequence[float], trials: int, device: torch.device) -> dict:
    """Held-out loss by position bucket and passkey accuracy, per model, in bf16 torch."""
    tokens = batches.ids(heldout)
    result: dict = {name: {"heldout_loss": {}, "passkey": {}} for name in models}
    rng = random.Random(1234)
    for n in lengths:
        windows = max(1, min(8, len(tokens) // (n + 1)))
        starts = [rng.randrange(0, len(tokens) - n - 1) for _ in range(windows)]
        ids = torch.stack([tokens[s:s + n + 1] for s in starts]).long().to(device)
        for name, model in models.items():
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                per = torch.cat([F.cross_entropy(model(ids[i:i + 1, :-1]).float().transpose(1, 2),
                                                 ids[i:i + 1, 1:], reduction="none") for i in range(windows)])
            buckets = 4
            result[name]["heldout_loss"][str(n)] = {
                "mean": per.mean().item(),
                "by_quarter": [chunk.mean().item() for chunk in per.chunk(buckets, dim=1)],
            }
    keys = random.Random(99)
    tokenizer = corpus.ByteTokenizer()
    decode = {t: b for b, t in enumerate(tokenizer.ids)}
    for n in lengths:
        for depth in depths:
            prompts = []
            for _ in range(trials):
                key = keys.randint(10000, 99999)
                prompts.append((torch.tensor(build_prompt(tokenizer, n, depth, key)), key))
            for name, model in models.items():
                correct = 0
                for prompt, key in prompts:
                    ids = prompt.long().to(device)[None]
                    out = []
                    for _ in range(7):  # greedy, recomputing the prefix: a handful of tokens
                        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                            nxt = model(ids)[0, -1].argmax()
                        out.append(int(nxt))
                        ids = torch.cat((ids, nxt.view(1, 1)), dim=1)
                    text = bytes(decode.get(t, 63) for t in out).decode("latin-1")
                    correct += str(key) in text
                result[name]["passkey"][f"{n}@{depth}"] = correct / trials
    return result


def save_weights(model: FixtureLM, path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to(torch.bfloat16).contiguous().cpu() for k, v in model.state_dict().items()}, str(path))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="directory with train.txt.xz and heldout.txt.xz")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--minutes", type=float, default=8.0, help="training time for both models together")
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--decay", type=float, default=0.3)
    p.add_argument("--passkey-fraction", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--eval-lengths", default="2048,4096,8192,16384")
    p.add_argument("--max-steps", type=int, default=None, help="a cap (CPU smoke runs)")
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    log = open(args.out / "train.log", "a")

    def say(msg: str) -> None:
        print(msg, flush=True)
        log.write(msg + "\n")
        log.flush()

    torch.manual_seed(args.seed)
    models, optimizers, steppers = {}, {}, {}
    for name, rope_pp in VARIANTS.items():
        model = FixtureLM(FixtureConfig(rope_pp=rope_pp)).to(device)
        models[name] = model
        decay = [p_ for n, p_ in model.named_parameters() if p_.dim() >= 2]
        other = [p_ for n, p_ in model.named_parameters() if p_.dim() < 2]
        optimizers[name] = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                              {"params": other, "weight_decay": 0.0}],
                                             lr=args.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
        steppers[name] = torch.compile(model) if args.compile else model
        say(f"{name}: {sum(p_.numel() for p_ in model.parameters()):,} parameters")
    batches = Batches(corpus.read(args.data / "train.txt.xz"), args.seq_len, args.passkey_fraction, args.seed)
    say(f"train tokens {len(batches.tokens):,}; device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}")

    curves: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "steps": []}
    budget = args.minutes * 60
    total = args.max_steps or 10**9
    started = time.perf_counter()
    step = 0
    while step < total:
        ids, mask = batches.draw(args.batch)
        ids, mask = ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)
        row = {"step": step, "tokens": (step + 1) * args.batch * args.seq_len}
        for name, model in steppers.items():
            lr = learning_rate(step, total, args.lr, args.warmup, args.decay)
            for group in optimizers[name].param_groups:
                group["lr"] = lr
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                lm, answer, accuracy = losses(model, ids, mask)
            (lm + answer).backward()
            torch.nn.utils.clip_grad_norm_(models[name].parameters(), 1.0)
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            row[name] = (lm, answer, accuracy)
            row["lr"] = lr
        if step % 10 == 0 or step == total - 1:
            for name in VARIANTS:
                row[name] = [v.item() for v in row[name]]
            row["seconds"] = time.perf_counter() - started
            curves["steps"].append(row)
            say(json.dumps(row))
        if step == args.warmup and args.max_steps is None:
            # Fix the schedule's length from the measured pace (the warm-up includes compilation,
            # so pace the remainder from the last 20 steps).
            if device.type == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter() - started
            pace = (now - curves["steps"][-3]["seconds"]) / 20 if len(curves["steps"]) >= 3 else now / (step + 1)
            total = step + max(1, int((budget - now) / pace))
            say(f"step {step}: {pace:.3f} s per step for both models; total steps {total}")
        step += 1
    curves["trained_steps"] = step
    curves["trained_tokens_per_model"] = step * args.batch * args.seq_len
    curves["seconds"] = time.perf_counter() - started
    for name, model in models.items():
        save_weights(model, args.out / name / "model.safetensors")
        (args.out / name / "fixture_config.json").write_text(json.dumps(asdict(model.config)) + "\n")
    (args.out / "curves.json").write_text(json.dumps(curves) + "\n")
    say(f"trained {step} steps in {curves['seconds']:.0f} s; evaluating")
    for model in models.values():
        model.eval()
    lengths = [int(n) for n in args.eval_lengths.split(",")]
    result = evaluate(models, corpus.read(args.data / "heldout.txt.xz"), batches, lengths,
                      [0.1, 0.5, 0.9], 4, device)
    (args.out / "eval.json").write_text(json.dumps(result, indent=1) + "\n")
    say(json.dumps(result))
    say("done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
