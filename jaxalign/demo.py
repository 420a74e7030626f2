"""`make demo`: the main job on the built-in default.

Until the algorithm comparison lands, the demo exercises the model layer end
to end: build a tiny Llama, save it in the Hugging Face format, load it back
through `load_hf`, check the logits, and decode greedily with the KV cache.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxalign.models import Transformer, load_hf, save_hf, tiny_config


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="runs/demo", help="where the Hugging Face checkpoint is written")
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    cfg = tiny_config("llama", vocab_size=64)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    path = save_hf(model, Path(args.out) / "tiny-llama")
    loaded, _ = load_hf(path)
    prompt = jnp.array([[5, 6, 7, 8], [9, 10, 11, 12]], jnp.int32)
    same = np.allclose(np.asarray(model(prompt)), np.asarray(loaded(prompt)), atol=0)
    print(f"saved and reloaded {path}: logits identical = {same}")

    @nnx.jit
    def step(m, tokens, cache):
        logits, cache = m(tokens, cache=cache)
        return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache

    cache = loaded.init_cache(batch=prompt.shape[0], max_len=prompt.shape[1] + args.new_tokens)
    token, cache = step(loaded, prompt, cache)
    out = [token]
    for _ in range(args.new_tokens - 1):
        token, cache = step(loaded, token[:, None], cache)
        out.append(token)
    tokens = np.stack([np.asarray(t) for t in out], axis=1)
    print("greedy continuation (random weights):")
    for row in tokens:
        print("  ", " ".join(map(str, row)))
    print(f"devices: {jax.devices()}; took {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
