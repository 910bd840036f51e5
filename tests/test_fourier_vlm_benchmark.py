"""benchmarks/fourier_vlm_ttft.py without a GPU: its config, arguments, engine kwargs and FLOPs.

The FLOPs formula is checked term by term against torch's FlopCounterMode running transformers'
own LLaVA modules (eager attention, so every product is an explicit matmul).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `benchmarks` is a folder of the repository, not an installed package
    sys.path.insert(0, str(REPO))
ttft = importlib.import_module("benchmarks.fourier_vlm_ttft")
flops = importlib.import_module("benchmarks.vlm_flops")
model_dirs = importlib.import_module("benchmarks.model_dirs")


def test_llava_config_has_the_llava_1_5_7b_shape() -> None:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dirs.MODELS_DIR / "llava-1.5-7b")
    assert type(cfg).__name__ == "LlavaConfig"
    t, v = cfg.text_config, cfg.vision_config
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads,
            t.intermediate_size, t.vocab_size, t.max_position_embeddings) == (
                4096, 32, 32, 32, 11008, 32064, 4096)
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.intermediate_size,
            v.image_size, v.patch_size) == (1024, 24, 16, 4096, 336, 14)
    assert (cfg.vision_feature_layer, cfg.vision_feature_select_strategy,
            cfg.projector_hidden_act, cfg.image_token_index) == (-2, "default", "gelu", 32000)


def test_arguments_and_variants() -> None:
    args = ttft.parse_args([])
    assert (args.model, args.variants, args.batch_sizes, args.dtype) == (
        "llava-1.5-7b", [576, 144, 64], [1, 32], "bfloat16")
    assert args.out.name == "fourier-vlm-ttft-llava-1.5-7b.json" and not args.enforce_eager
    tiny = ttft.parse_args(["--tiny", "--variants", "576,144", "--repeats", "2"])
    assert (tiny.dtype, tiny.enforce_eager, tiny.repeats, tiny.variants) == (
        "float32", True, 2, [576, 144])
    assert ttft.variant_overrides(576, 24) == {}
    assert ttft.variant_overrides(144, 24) == {
        "architectures": ["FourierLlavaForConditionalGeneration"], "fourier_vlm": {"reserve": 12}}
    assert ttft.variant_overrides(64, 24)["fourier_vlm"] == {"reserve": 8}
    for bad in (100 + 1, 625, 0):
        with pytest.raises(ValueError, match="576 \\(stock\\) or a square"):
            ttft.variant_overrides(bad, 24)
    with pytest.raises(SystemExit):
        ttft.parse_args(["--tiny", "--model-dir", "x"])


def test_engine_kwargs_are_vllm_engine_args(tmp_path) -> None:
    from vllm.engine.arg_utils import EngineArgs

    args = ttft.parse_args(["--max-num-batched-tokens", "8192"])
    fields = {f.name for f in dataclasses.fields(EngineArgs)}
    for tokens in (576, 144):
        kwargs = ttft.engine_kwargs(args, tmp_path, True, tokens, 24)
        assert set(kwargs) <= fields, set(kwargs) - fields
        engine_args = EngineArgs(**kwargs)  # vLLM's own type checks of each value
        assert engine_args.load_format == "dummy" and engine_args.enable_prefix_caching is False
        assert engine_args.mm_processor_cache_gb == 0
    assert "hf_overrides" not in ttft.engine_kwargs(args, tmp_path, True, 576, 24)


def test_prepared_7b_directory_loads_with_its_processor(tmp_path) -> None:
    from transformers import AutoConfig, AutoProcessor

    args = ttft.parse_args(["--work-dir", str(tmp_path)])
    model_dir, dummy = ttft.prepare_model_dir(args)
    assert dummy
    config = AutoConfig.from_pretrained(model_dir)
    processor = AutoProcessor.from_pretrained(model_dir)
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == config.image_token_index
    assert config.text_config.hidden_size == 4096  # the shape is untouched
    out = processor(text=["USER: <image>\nhi ASSISTANT:"], images=[ttft.random_image(0)],
                    return_tensors="pt")
    assert out["pixel_values"].shape == (1, 3, 336, 336)
    assert (out["input_ids"][0] == config.image_token_index).sum() == 576  # HF's own expansion


# ------------------------------------------------------------------------------------------------
# FLOPs


def counted(fn, *args) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn(*args)
    return counter.get_total_flops()


@pytest.fixture(scope="module")
def tiny_llava():
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    config = {
        "model_type": "llava", "vision_feature_layer": -1,
        "vision_feature_select_strategy": "default", "projector_hidden_act": "gelu",
        "image_token_index": 5,
        "vision_config": {"model_type": "clip_vision_model", "hidden_size": 32,
                          "intermediate_size": 48, "num_hidden_layers": 2,
                          "num_attention_heads": 2, "image_size": 56, "patch_size": 14},
        "text_config": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 96,
                        "num_hidden_layers": 2, "num_attention_heads": 4,
                        "num_key_value_heads": 2, "vocab_size": 100},
    }
    hf = LlavaConfig.from_dict(config)
    hf._attn_implementation = "eager"
    hf.text_config._attn_implementation = "eager"
    hf.vision_config._attn_implementation = "eager"
    return config, LlavaForConditionalGeneration(hf).eval()


def test_flops_terms_match_flop_counter(tiny_llava) -> None:
    config, model = tiny_llava
    s = flops.LlavaShape.from_config(config)
    assert (s.grid, s.vision_layers, s.head_dim, s.kv_heads) == (4, 2, 16, 2)
    pixels = torch.randn(1, 3, 56, 56)
    assert counted(model.model.vision_tower, pixels) == flops.vision_tower_flops(s)
    feats = torch.randn(1, 16, 32)
    assert counted(model.model.multi_modal_projector, feats) == flops.projector_flops(s, 16)
    tokens = 37
    ids = torch.randint(0, 100, (1, tokens))

    def language_model(ids):
        hidden = model.model.language_model(input_ids=ids).last_hidden_state
        return model.lm_head(hidden)

    want = (flops.llm_linear_flops(s, tokens) + flops.llm_attention_flops(s, tokens, causal=False)
            + flops.lm_head_flops(s, positions=tokens))
    assert counted(language_model, ids) == want
    assert flops.llm_attention_flops(s, tokens, causal=True) == (
        flops.llm_attention_flops(s, tokens, causal=False) * (tokens + 1) // (2 * tokens))


def test_compression_flops_match_flop_counter() -> None:
    from kvfold.models.fourier_vlm.spectral_resize import compress_tokens

    x = torch.randn(1, 24 * 24, 1024)
    compress_tokens(x, (24, 24), (12, 12))  # the cached basis matrices are built once, not counted
    assert counted(compress_tokens, x, (24, 24), (12, 12)) == flops.compression_flops(
        (24, 24), (12, 12), 1024)
    assert flops.compression_flops((24, 24), (24, 24), 1024) == 0


def test_7b_request_flops() -> None:
    s = flops.LlavaShape.from_config(model_dirs.load_config("llava-1.5-7b"))
    assert s.vision_layers == 23  # vision_feature_layer -2: vLLM builds 23 of CLIP's 24 layers
    # Linear FLOPs per prompt token = 2 x the decoder's linear parameters (6.48e9 for Llama-2-7B).
    params = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    assert flops.llm_linear_flops(s, 1) == 2 * params
    full, small = (flops.request_flops(s, 69, kept) for kept in ((24, 24), (12, 12)))
    assert full["compression"] == 0 and small["compression"] > 0
    assert full["vision_tower"] == small["vision_tower"]
    assert small["projector"] * 4 == full["projector"]
    assert small["total"] < 0.4 * full["total"]
    assert full["total"] == sum(v for k, v in full.items() if k != "total")


def test_summary_ratios() -> None:
    def variant(tokens, wall, req):
        return {"vision_tokens": tokens, "status": "ok",
                "batches": {"1": {"wall_median_s": wall, "request_ttft_mean_s": req,
                                  "prompt_tokens": [tokens + 69]}}}

    run = {"batch_sizes": [1], "variants": [variant(576, 0.10, 0.09), variant(144, 0.06, 0.045)],
           "flops": {"576": {"total": 8.0e12}, "144": {"total": 2.0e12}}}
    summary = ttft.summarize(run)["1"]
    assert summary["144"]["ttft_change_pct"] == pytest.approx(-40.0)
    assert summary["144"]["request_ttft_change_pct"] == pytest.approx(-50.0)
    assert summary["144"]["flops_change_pct"] == pytest.approx(-75.0)
    assert summary["576"]["ttft_change_pct"] == 0


def test_tiny_result_in_docs_is_consistent() -> None:
    path = REPO / "docs" / "benchmarks" / "fourier-vlm-ttft-tiny-cpu.json"
    run = json.loads(path.read_text())
    assert run["kind"] == "fourier_vlm_ttft" and not run["dummy_weights"]
    tokens = {v["vision_tokens"]: v for v in run["variants"]}
    assert set(tokens) == {576, 144, 64} and all(v["status"] == "ok" for v in tokens.values())
    for n, v in tokens.items():
        for batch in v["batches"].values():
            assert batch["prompt_tokens"] == [run["text_tokens"] + n]
    assert tokens[576]["resolved_architecture"] == "LlavaForConditionalGeneration"
    assert tokens[144]["resolved_architecture"] == "FourierLlavaForConditionalGeneration"


def test_merge_combines_runs_of_single_variants(tmp_path) -> None:
    def run(tokens, wall):
        return {"kind": "fourier_vlm_ttft", "model": "m", "env": {}, "batch_sizes": [1],
                "flops": {str(tokens): {"total": tokens * 1e10}},
                "variants": [{"vision_tokens": tokens, "status": "ok",
                              "batches": {"1": {"wall_median_s": wall, "request_ttft_mean_s": wall,
                                                "prompt_tokens": [tokens + 69]}}}]}

    paths = []
    for tokens, wall in ((576, 0.1), (144, 0.06), (64, 0.05)):
        paths.append(tmp_path / f"{tokens}.json")
        paths[-1].write_text(json.dumps(run(tokens, wall)))
    out = tmp_path / "merged.json"
    assert ttft.main(["--merge", *map(str, paths), "--out", str(out)]) == 0
    merged = json.loads(out.read_text())
    assert [v["vision_tokens"] for v in merged["variants"]] == [576, 144, 64]
    assert merged["summary"]["1"]["144"]["ttft_change_pct"] == pytest.approx(-40.0)
    assert out.with_suffix(".png").is_file()
