"""Fourier-VLM's config key, the kept-size rules, and the Qwen2-VL token layout (no engine)."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from kvfold.models.fourier_vlm import dct as fft_op
from kvfold.models.fourier_vlm.config import (
    FourierVLMConfigError,
    llava_options,
    qwen2_vl_options,
)


def hf(**fourier_vlm) -> SimpleNamespace:
    return SimpleNamespace(fourier_vlm=fourier_vlm)


# ------------------------------------------------------------------------------------------------
# The fourier_vlm key


def test_defaults_are_the_authors() -> None:
    assert llava_options(SimpleNamespace()).kept() == (12, 12)  # apply_to_llava(reserve=12)
    assert llava_options(SimpleNamespace()).norm == "ortho"
    assert qwen2_vl_options(SimpleNamespace()).ratio == pytest.approx(2 / 3)


@pytest.mark.parametrize("raw,kept", [({"reserve": 8}, (8, 8)), ({"reserve": 16}, (16, 16)),
                                      ({"reserve": [12, 16]}, (12, 16)),
                                      ({"reserve": 12, "norm": "mean"}, (12, 12))])
def test_llava_reserve(raw, kept) -> None:
    assert llava_options(hf(**raw)).kept() == kept


@pytest.mark.parametrize("raw,message", [
    ({"reserve": 0}, "'reserve' must be a positive integer or a [rows, columns] pair"),
    ({"reserve": [12, 0]}, "(got [12, 0])"),
    ({"reserve": 12.5}, "'reserve' must be a positive integer"),
    ({"reserve": True}, "'reserve' must be a positive integer"),
    ({"ratio": 0.5}, "unknown key 'ratio' (allowed keys: norm, reserve)"),
    ({"norm": "l2"}, "'norm' must be 'ortho' or 'mean' (got 'l2')"),
])
def test_llava_bad_values_name_the_key(raw, message) -> None:
    with pytest.raises(FourierVLMConfigError) as err:
        llava_options(hf(**raw), "FourierLlavaForConditionalGeneration")
    assert message in str(err.value)
    assert str(err.value).startswith("FourierLlavaForConditionalGeneration: invalid 'fourier_vlm'")


def test_not_an_object() -> None:
    with pytest.raises(FourierVLMConfigError, match="must be a JSON object, got int"):
        qwen2_vl_options(SimpleNamespace(fourier_vlm=12))


@pytest.mark.parametrize("ratio", [0, -0.5, 1.01, 1.5])
def test_qwen_ratio_must_be_in_0_1(ratio) -> None:
    with pytest.raises(FourierVLMConfigError, match=r"'ratio' must be a number in \(0, 1\]"):
        qwen2_vl_options(hf(ratio=ratio))


@pytest.mark.parametrize("ratio,rows,cols,kept", [
    (2 / 3, 6, 8, (4, 5)),     # int(4.0), int(5.33)
    (2 / 3, 12, 12, (8, 8)),   # int(8.0): exact in floating point
    (2 / 3, 24, 18, (16, 12)),
    (2 / 3, 1, 2, (1, 1)),     # max(int(0.67), 1)
    (0.5, 7, 9, (3, 4)),
    (1.0, 7, 9, (7, 9)),
])
def test_qwen_kept_grid_uses_the_authors_rounding(ratio, rows, cols, kept) -> None:
    assert qwen2_vl_options(hf(ratio=ratio)).kept(rows, cols) == kept


# ------------------------------------------------------------------------------------------------
# LLaVA: the grid comes from the vision tower


def llava_config(**kw):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = kw.pop("vision", CLIPVisionConfig(image_size=336, patch_size=14))
    config = LlavaConfig(vision_config=vision, text_config=LlamaConfig(), **kw)
    return config


def test_llava_spec_reads_the_clip_grid() -> None:
    from kvfold.models.fourier_vlm.llava import llava_spec

    spec = llava_spec(llava_config(vision_feature_select_strategy="default"))
    assert (spec.grid, spec.kept, spec.num_tokens) == ((24, 24), (12, 12), 144)
    config = llava_config(vision_feature_select_strategy="default")
    config.fourier_vlm = {"reserve": 8}
    assert llava_spec(config).num_tokens == 64
    config.fourier_vlm = {"reserve": 24}
    assert llava_spec(config).num_tokens == 576  # the whole grid: the identity


def test_llava_refuses_a_reserve_larger_than_the_grid() -> None:
    from kvfold.models.fourier_vlm.llava import llava_spec

    config = llava_config(vision_feature_select_strategy="default")
    config.fourier_vlm = {"reserve": [12, 25]}
    with pytest.raises(FourierVLMConfigError) as err:
        llava_spec(config)
    assert ("asks for a 12x25 token grid, larger than the vision tower's 24x24 grid (576 tokens "
            "at 336x336 pixels, patch 14); reserve must be at most 24") in str(err.value)


def test_llava_refuses_features_that_are_not_a_grid() -> None:
    from kvfold.models.fourier_vlm.llava import llava_spec

    with pytest.raises(FourierVLMConfigError, match="'full' gives 577 tokens per image"):
        llava_spec(llava_config(vision_feature_select_strategy="full"))


def test_llava_refuses_pixtral_towers() -> None:
    from transformers import PixtralVisionConfig

    from kvfold.models.fourier_vlm.llava import llava_spec

    with pytest.raises(FourierVLMConfigError, match="PixtralVisionConfig"):
        llava_spec(llava_config(vision=PixtralVisionConfig()))


# ------------------------------------------------------------------------------------------------
# Qwen2-VL: placeholder counts, M-RoPE positions and the per-frame compression agree


def bare_qwen(ratio: float = 2 / 3):
    """A FourierQwen2VL without layers: just what its token-layout methods read."""
    from kvfold.models.fourier_vlm.qwen2_vl import FourierQwen2VLForConditionalGeneration as Cls

    model = Cls.__new__(Cls)
    torch.nn.Module.__init__(model)
    model.config = SimpleNamespace(vision_config=SimpleNamespace(spatial_merge_size=2,
                                                                 tokens_per_second=2.0))
    model.fourier = qwen2_vl_options(hf(ratio=ratio))
    return model


def feature(modality: str, offset: int, thw: tuple[int, int, int], **extra):
    from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange

    from kvfold.models.fourier_vlm.qwen2_vl import num_kept_tokens

    data = {f"{modality}_grid_thw": SimpleNamespace(data=torch.tensor(thw))}
    data.update({k: SimpleNamespace(data=torch.tensor(v)) for k, v in extra.items()})
    length = num_kept_tokens(qwen2_vl_options(SimpleNamespace()), thw, 2)
    return MultiModalFeatureSpec(data=data, modality=modality, identifier=f"{modality}{offset}",
                                 mm_position=PlaceholderRange(offset=offset, length=length))


def test_num_kept_tokens() -> None:
    from kvfold.models.fourier_vlm.qwen2_vl import kept_grid, num_kept_tokens

    options = qwen2_vl_options(SimpleNamespace())
    assert kept_grid(options, (1, 12, 16), 2) == (1, 4, 5)
    assert num_kept_tokens(options, (1, 12, 16), 2) == 20  # of 48
    assert num_kept_tokens(options, (3, 48, 36), 2) == 3 * 16 * 12  # per frame, of 3 * 432


def test_mrope_positions_walk_the_compressed_grid() -> None:
    model = bare_qwen()
    # 3 text tokens, an image of 12x16 patches (6x8 merged -> 4x5 kept), 2 text, a 2-frame video
    # of 8x12 patches (4x6 merged -> 2x4 kept per frame), 4 text.
    image = feature("image", 3, (1, 12, 16))
    video = feature("video", 25, (2, 8, 12), second_per_grid_ts=1.0)
    assert [f.mm_position.length for f in (image, video)] == [20, 16]
    assert list(model.iter_mm_grid_thw([video, image])) == [
        (3, 1, 4, 5, 1.0), (25, 2, 2, 4, 2.0)]
    tokens = list(range(3 + 20 + 2 + 16 + 4))
    positions, delta = model.get_mrope_input_positions(tokens, [image, video])
    assert positions.shape == (3, len(tokens))
    img = positions[:, 3:23]
    assert img[0].tolist() == [3] * 20
    assert img[1].tolist() == [3 + r for r in range(4) for _ in range(5)]
    assert img[2].tolist() == [3 + c for _ in range(4) for c in range(5)]
    vid = positions[:, 25:41]
    start = 3 + 5 + 2  # text after the image resumes at max position + 1
    assert vid[0].tolist() == [start + 2 * t for t in range(2) for _ in range(8)]  # t_factor 2
    assert vid[1].tolist() == [start + r for _ in range(2) for r in range(2) for _ in range(4)]
    assert vid[2].max() == start + 3  # 4 kept columns: the largest position of the video
    assert positions[:, 41:].tolist() == [[start + 4 + i for i in range(4)]] * 3
    assert delta == positions.max().item() + 1 - len(tokens)


def test_frames_are_compressed_one_by_one() -> None:
    model = bare_qwen()
    embeds = torch.randn(3 * 4 * 6, 16)  # 3 frames of a 4x6 merged grid, (t, row, col) order
    out = model._compress(embeds, (3, 8, 12))
    want = torch.cat([fft_op.compress_tokens(f.double(), (4, 6), (2, 4))
                      for f in embeds.reshape(3, 24, 16)])
    assert out.shape == (3 * 2 * 4, 16)
    assert torch.allclose(out.double(), want, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Importing vLLM's LLaVA / Qwen2-VL without torchvision


def test_vllm_vision_modules_import_without_torchvision() -> None:
    pytest.importorskip("vllm")
    from kvfold.models.fourier_vlm.torchvision_free import torchvision_installed

    if torchvision_installed():
        pytest.skip("torchvision is installed: no stand-ins are needed")
    code = (
        "from kvfold.models.fourier_vlm.torchvision_free import ensure_importable\n"
        "installed = ensure_importable()\n"
        "assert len(installed) == 2, installed\n"
        "import vllm.model_executor.models.llava, vllm.model_executor.models.qwen2_vl\n"
        "from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize\n"
        "import sys\n"
        "stand_in = sys.modules['transformers.models.qwen2_vl.image_processing_qwen2_vl']\n"
        "assert stand_in.smart_resize is smart_resize\n"
        "assert not hasattr(stand_in, 'Qwen2VLImageProcessor')\n"
        "try:\n"
        "    stand_in.Qwen2VLImageProcessor\n"
        "except AttributeError as e:\n"
        "    assert 'needs torchvision' in str(e), e\n"
        "assert ensure_importable() == []\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


# ------------------------------------------------------------------------------------------------
# Registration


def test_plugin_registers_both_architectures_with_their_processors() -> None:
    from vllm import ModelRegistry
    from vllm.model_executor.models.llava import LlavaForConditionalGeneration
    from vllm.model_executor.models.qwen2_vl import Qwen2VLForConditionalGeneration

    from kvfold.models import MODELS
    from kvfold.models.fourier_vlm import llava, qwen2_vl
    from kvfold.vllm_plugins.general import register

    register()
    for arch, cls, base, processor in [
        ("FourierLlavaForConditionalGeneration", llava.FourierLlavaForConditionalGeneration,
         LlavaForConditionalGeneration, llava.FourierLlavaMultiModalProcessor),
        ("FourierQwen2VLForConditionalGeneration", qwen2_vl.FourierQwen2VLForConditionalGeneration,
         Qwen2VLForConditionalGeneration, qwen2_vl.FourierQwen2VLMultiModalProcessor),
    ]:
        entry = ModelRegistry.models[arch]
        assert f"{entry.module_name}:{entry.class_name}" == MODELS[arch]
        assert MODELS[arch] == f"{cls.__module__}:{cls.__qualname__}"
        assert issubclass(cls, base)
        # Its own processor factories, not the stock model's (placeholder counts come from them).
        assert cls.__dict__["_processor_factory"].processor is processor
    # The stock names stay vLLM's own classes.
    assert "LlavaForConditionalGeneration" not in MODELS
    assert "Qwen2VLForConditionalGeneration" not in MODELS


# ------------------------------------------------------------------------------------------------
# What vLLM profiles with: the dummy inputs of the processor vLLM builds for the model


def processor_for(model_dir, **overrides):
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY

    from kvfold.vllm_plugins.general import register

    register()
    config = ModelConfig(model=str(model_dir), dtype="float32", max_model_len=1024,
                         hf_overrides=overrides, limit_mm_per_prompt={"image": 1})
    return MULTIMODAL_REGISTRY.create_processor(config)


def test_profiling_inputs_use_the_compressed_counts(tmp_path) -> None:
    from kvfold.tiny_vlm import write_tiny_llava, write_tiny_qwen2_vl

    llava = processor_for(write_tiny_llava(tmp_path / "llava"),
                          architectures=["FourierLlavaForConditionalGeneration"],
                          fourier_vlm={"reserve": [6, 10]})
    dummy = llava.get_dummy_mm_inputs({"image": 1})
    assert [p.length for p in dummy["mm_placeholders"]["image"]] == [60]
    assert dummy["prompt_token_ids"][:61].count(llava.info.get_hf_config().image_token_index) == 60

    qwen = processor_for(write_tiny_qwen2_vl(tmp_path / "qwen"),
                         architectures=["FourierQwen2VLForConditionalGeneration"])
    width, height = qwen.info.get_image_size_with_most_features()
    assert (width, height) == (448, 448)  # max_pixels 448 * 448: 16 x 16 merged tokens
    assert qwen.info.get_mm_max_tokens_per_item(1024, {"image": 1})["image"] == 100  # 10 x 10
    dummy = qwen.get_dummy_mm_inputs({"image": 1})
    assert [p.length for p in dummy["mm_placeholders"]["image"]] == [100]
    assert dummy["mm_kwargs"]["image"][0]["image_grid_thw"].data.tolist() == [1, 32, 32]
