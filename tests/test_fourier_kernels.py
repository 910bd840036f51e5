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
