"""TreeKV reference (dense cache): schedule, budget, equivalence to dense attention, positions."""

from collections import Counter

import pytest
import torch

from kvfold.attention_backends.paged.attention import causal_gqa_attention
from kvfold.attention_backends.treekv.options import TreeKVOptions
from kvfold.attention_backends.treekv.reference import TreeKV, TreeSchedule, evict_one, rope_rotate
from kvfold.options import KvfoldConfigError, parse_options

HQ, HK, D = 4, 2, 16
INV_FREQ = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
SCALE = D**-0.5


def rope(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotate pre-RoPE ``x`` ``[L, H, D]`` to absolute ``positions`` ``[L]`` (what a model does)."""
    return rope_rotate(x.transpose(0, 1), positions.expand(x.shape[1], -1), INV_FREQ).transpose(0, 1)


def sequence(length: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(length, h, D, generator=g) for h in (HQ, HK, HK))
    pos = torch.arange(length)
    return rope(q, pos), rope(k, pos), v, q, k  # post-RoPE q, k (as vLLM gives), v, pre-RoPE q, k


def test_defaults_are_the_papers() -> None:
    o = TreeKVOptions()
    assert (o.budget, o.sink, o.recent, o.tree, o.positions) == (1024, 4, 508, 512, "rank")


def test_options_that_leave_no_tree_are_refused() -> None:
    with pytest.raises(KvfoldConfigError, match="leaves 8 tree slots"):
        parse_options("KVFOLD_TREEKV", TreeKVOptions, {"budget": 520, "recent": 508})
    with pytest.raises(KvfoldConfigError, match="option 'positions'"):
        parse_options("KVFOLD_TREEKV", TreeKVOptions, {"positions": "relative"})


def test_pair_rule_drops_the_lower_average_and_the_left_one_on_ties() -> None:
    avg = torch.tensor([[0.5, 0.1, 0.9], [0.1, 0.5, 0.9], [0.3, 0.3, 0.9]])
    assert evict_one(avg, 0).tolist() == [1, 0, 0]


def test_cycle_keeps_recent_context_dense_and_old_context_sparse() -> None:
    # Equal scores everywhere: the pure tree structure. From the newest token back, the gaps
    # double every half sweep (the paper's Fig. 2): 32 gaps of 2, 16 of 4, ..., 1 of 64.
    schedule, kept = TreeSchedule(64), []
    for p in range(4096):
        kept.append(p)
        if len(kept) > 64:
            kept.pop(int(schedule.evict(torch.zeros(1, 65))[0]))
    gaps = Counter(b - a for a, b in zip(kept, kept[1:]))
    assert gaps == {2: 32, 4: 16, 8: 8, 16: 4, 32: 2, 64: 1}


@pytest.mark.parametrize("positions", ["rank", "original"])
def test_within_budget_it_is_exact_dense_attention(positions: str) -> None:
    q, k, v, _, _ = sequence(50)
    tree = TreeKV(TreeKVOptions(budget=64, sink=4, recent=20, prefill_block=8, positions=positions),
                  SCALE, INV_FREQ)
    out = [tree.prefill(q[:40], k[:40], v[:40])]
    out += [tree.decode(q[t], k[t], v[t], t)[None] for t in range(40, 50)]
    dense = causal_gqa_attention(q, k, v, SCALE, 0)
    torch.testing.assert_close(torch.cat(out), dense, atol=1e-5, rtol=1e-5)
    assert tree.cache.size == 50


def test_budget_holds_sink_and_recent_always_kept_heads_differ() -> None:
    o = TreeKVOptions(budget=64, sink=4, recent=20, prefill_block=8)
    q, k, v, _, _ = sequence(500, seed=1)
    tree = TreeKV(o, SCALE, INV_FREQ)
    tree.prefill(q[:300], k[:300], v[:300])
    assert tree.cache.size <= 64
    for t in range(300, 500):
        tree.decode(q[t], k[t], v[t], t)
        assert tree.cache.size == 64
        assert (tree.cache.positions[:, :4] == torch.arange(4)).all()
        assert (tree.cache.positions[:, -20:] == torch.arange(t - 19, t + 1)).all()
        assert (tree.cache.positions.diff(dim=1) > 0).all()  # each head's order is position order
    # Per-head eviction: heads keep different tokens.
    assert not torch.equal(tree.cache.positions[0], tree.cache.positions[1])


def test_prefill_keeps_the_block_the_observation_window_attends_to() -> None:
    o = TreeKVOptions(budget=64, sink=4, recent=20, prefill_block=8, positions="original")
    q, k, v, _, _ = sequence(400, seed=2)
    # The window's queries all point one way; the keys of positions 100..107 (one block, counted
    # from the middle's newest end) point the same way, so they get most of the window's attention.
    direction = torch.randn(D, generator=torch.Generator().manual_seed(9))
    q[-8:] = direction
    k[100:108] = 2 * direction
    tree = TreeKV(o, SCALE)
    tree.prefill(q, k, v)
    for head in range(HK):
        kept = tree.cache.positions[head].tolist()
        assert set(range(100, 108)) <= set(kept)
        middle = [p for p in kept if 4 <= p < 380]
        assert len(middle) == 40  # 40 tree slots = 5 whole blocks of 8
        assert all((p - 4) % 8 == i % 8 for i, p in enumerate(middle))  # block-aligned, whole


@pytest.mark.parametrize("positions", ["rank", "original"])
def test_decode_attends_over_kept_tokens_at_the_chosen_positions(positions: str) -> None:
    o = TreeKVOptions(budget=48, sink=4, recent=12, prefill_block=8, positions=positions)
    q_post, k_post, v, q_pre, k_pre = sequence(200, seed=3)
    tree = TreeKV(o, SCALE, INV_FREQ)
    tree.prefill(q_post[:120], k_post[:120], v[:120])
    for t in range(120, 200):
        before = torch.cat([tree.cache.positions, torch.full((HK, 1), t)], 1)  # attended set
        out = tree.decode(q_post[t], k_post[t], v[t], t)
        expected = []
        for head in range(HK):
            kept = before[head]
            if positions == "rank":  # rebuilt from pre-RoPE keys at rank positions, independently
                keys = rope(k_pre[kept, head : head + 1], torch.arange(len(kept)))
                query = rope(q_pre[t : t + 1, 2 * head : 2 * head + 2], torch.tensor([len(kept) - 1]))
            else:
                keys, query = k_post[kept, head : head + 1], q_post[t : t + 1, 2 * head : 2 * head + 2]
            expected.append(causal_gqa_attention(query, keys, v[kept, head : head + 1], SCALE,
                                                  len(kept) - 1)[0])
        torch.testing.assert_close(out, torch.cat(expected), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("positions", ["rank", "original"])
def test_prefill_chunks_within_budget_are_exact_dense_attention(positions: str) -> None:
    q, k, v, _, _ = sequence(60)
    tree = TreeKV(TreeKVOptions(budget=64, sink=4, recent=20, prefill_block=8, positions=positions),
                  SCALE, INV_FREQ)
    out = [tree.extend(q[a:b], k[a:b], v[a:b], a) for a, b in [(0, 17), (17, 40), (40, 41), (41, 60)]]
    torch.testing.assert_close(torch.cat(out), causal_gqa_attention(q, k, v, SCALE, 0),
                               atol=1e-5, rtol=1e-5)


def test_chunked_prefill_stays_within_budget() -> None:
    o = TreeKVOptions(budget=64, sink=4, recent=20, prefill_block=8)
    q, k, v, _, _ = sequence(400, seed=4)
    tree = TreeKV(o, SCALE, INV_FREQ)
    for a in range(0, 400, 50):
        tree.extend(q[a : a + 50], k[a : a + 50], v[a : a + 50], a)
        assert tree.cache.size <= 64
        assert (tree.cache.positions[:, :4] == torch.arange(4)).all()
        assert (tree.cache.positions[:, -20:] == torch.arange(a + 30, a + 50)).all()


def test_budget_alone_keeps_the_papers_split() -> None:
    o = parse_options("KVFOLD_TREEKV", TreeKVOptions, {"budget": 2048})
    assert (o.sink, o.tree, o.recent) == (4, 1024, 1020)
    o = parse_options("KVFOLD_TREEKV", TreeKVOptions, {"budget": 2048, "recent": 100})
    assert (o.tree, o.recent) == (1944, 100)
