"""Runs one offline vLLM engine on image prompts in its own process; writes what it saw as JSON.

``python tests/fourier_vlm_driver.py SPEC.json OUT.json`` (like engine_driver.py, for multimodal
prompts). SPEC: {"llm": {LLM kwargs}, "max_tokens": N, "capture_token_id": id or null,
"requests": [{"prompt": text with the model's image placeholders, "images": [[w, h, seed], ...]}]}
Images are generated from (w, h, seed) by :func:`make_image`, here and in the tests.
OUT: {"model_class": "module:Class", "requests": [{"prompt_token_ids": [...], "tokens": [...],
"embeds": rows of the language model's input embeddings at the prompt positions holding
capture_token_id, "positions": the positions (M-RoPE: 3 rows) of those rows}]}.
The embeddings are read by a forward pre-hook on the model the worker built: exactly what reaches
the language model after vLLM merged the image embeddings into the prompt.
"""

from __future__ import annotations

import json
import sys


def make_image(width: int, height: int, seed: int):
    """A random RGB image: smooth colour gradients plus noise, so every frequency is present."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    base = np.stack([np.sin(2 * np.pi * (rng.uniform(0.5, 3) * x + rng.uniform(0.5, 3) * y + c))
                     for c in rng.uniform(0, 1, 3)], axis=-1)
    pixels = 127.5 * (1 + 0.7 * base) + rng.normal(0, 20, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype("uint8"), "RGB")


def install_capture(model) -> bool:
    """Record (inputs_embeds, positions) of every forward call on ``model._fvlm_seen``."""
    model._fvlm_seen = []

    def hook(module, args, kwargs):
        embeds = kwargs.get("inputs_embeds", args[3] if len(args) > 3 else None)
        positions = kwargs.get("positions", args[1] if len(args) > 1 else None)
        if embeds is not None:
            module._fvlm_seen.append((embeds.detach().float().cpu().clone(),
                                      positions.detach().cpu().clone()))

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return True


def pop_first_capture(model):
    """The first recorded forward call since the last pop (the prefill), as lists; clears."""
    seen, model._fvlm_seen = model._fvlm_seen, []
    if not seen:
        return None
    embeds, positions = seen[0]
    return embeds.tolist(), positions.tolist()


def model_class(model) -> str:
    return f"{type(model).__module__}:{type(model).__qualname__}"


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(open(spec_path).read())
    # Imported by module name (this file's folder is on sys.path), so the workers unpickle them.
    from fourier_vlm_driver import install_capture, make_image, model_class, pop_first_capture
    from vllm import LLM, SamplingParams

    llm = LLM(**spec["llm"])
    token = spec.get("capture_token_id")
    if token is not None:
        llm.apply_model(install_capture)
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True)
    results = []
    for request in spec["requests"]:
        images = [make_image(*img) for img in request["images"]]
        prompt = {"prompt": request["prompt"]}
        if images:
            prompt["multi_modal_data"] = {"image": images}
        out = llm.generate([prompt], params, use_tqdm=False)[0]
        result = {"prompt_token_ids": list(out.prompt_token_ids),
                  "tokens": list(out.outputs[0].token_ids)}
        if token is not None:
            embeds, positions = llm.apply_model(pop_first_capture)[0]
            rows = [i for i, t in enumerate(out.prompt_token_ids) if t == token]
            result["embeds"] = [embeds[i] for i in rows]
            result["positions"] = ([[p[i] for i in rows] for p in positions]
                                   if isinstance(positions[0], list) else [positions[i] for i in rows])
        results.append(result)
    out = {"model_class": llm.apply_model(model_class)[0], "requests": results}
    open(out_path, "w").write(json.dumps(out))


if __name__ == "__main__":
    main(*sys.argv[1:3])
