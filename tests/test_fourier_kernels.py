"""FlashFourierAttention's kernel bookkeeping that needs no GPU."""

from __future__ import annotations

from kvfold.attention_backends.fourier import kernels


def test_compiled_stats_reads_what_the_compiled_kernels_report(monkeypatch) -> None:
    from types import SimpleNamespace

    monkeypatch.setattr(kernels, "_launched", {
        "decode_pass": SimpleNamespace(n_regs=255, n_spills=96, metadata=SimpleNamespace(shared=1024)),
        "coef_pass_project": None,  # the interpreter's launch returns nothing
    })
    assert kernels.compiled_stats() == {"decode_pass": {"n_regs": 255, "n_spills": 96, "shared": 1024}}


def test_plan_step_pads_the_batch_and_rounds_its_sizes() -> None:
    import torch

    from kvfold.attention_backends.fourier.decode import COMPRESSED, LONGEST_STEP, UPDATE, plan_step
    from kvfold.attention_backends.fourier.layout import FourierLayout

    dims = [[torch.arange(40), torch.arange(8)]]
    layout = FourierLayout(dims, dims, head_size=64, head_size_v=64, dtype=torch.bfloat16, block_size=16,
                           sink=4, recent=60, freqs=16)
    # Lengths include the new token: 1 = a first token, 97 = compressed for the first time (middle 33
    # > 2k = 32), 3000 = compressed before, 50 = middle not compressed yet.
    seq_lens = [1, 97, 3000, 50]
    exact = plan_step(layout, seq_lens, window=5000)
    assert exact.alone == [0, 1]
    assert exact.static == {"longest": 3000, "exact": 50, "middle_end": 4 + 3000 - 64}
    assert exact.per_request.tolist() == [seq_lens, [0, 0, 1, 1], [0, 0, 1, 0], [0, COMPRESSED, UPDATE + COMPRESSED, 0]]

    padded = plan_step(layout, seq_lens, window=5000, padded=8)
    assert padded.static == {"longest": LONGEST_STEP * 3, "exact": 4 + 60 + 32,
                             "middle_end": 4 + LONGEST_STEP * 3 - 64}
    # Padding requests: one token, no write, nothing compressed.
    assert padded.per_request[:, 4:].tolist() == [[1] * 4, [0] * 4, [0] * 4, [0] * 4]
    # Rounded up, but never past what the window can hold.
    assert plan_step(layout, [3000], window=2500, padded=1).static["longest"] == 2500 + 64
    only_compressed = plan_step(layout, [3000, 2000], window=5000, padded=2).static
    assert only_compressed["exact"] == 64
    assert plan_step(layout, [40, 50], window=5000, padded=2).static["middle_end"] == 0
