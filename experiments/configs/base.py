"""Shared defaults of the experiment configs, nested by concern."""

from ml_collections import ConfigDict


def base_config() -> ConfigDict:
    c = ConfigDict()
    c.seed = 0
    c.workdir = "runs/experiment"
    # A local Hugging Face directory (`path`), or a tiny random model of
    # `family` sized by `overrides` (Hugging Face config fields) when empty.
    c.model = ConfigDict(dict(path="", tokenizer="", family="llama", dtype="float32", seed=0,
                              overrides=ConfigDict(dict(hidden_size=64, intermediate_size=128,
                                                        num_hidden_layers=2, num_attention_heads=4,
                                                        num_key_value_heads=2, head_dim=16,
                                                        max_position_embeddings=256))))
    c.data = ConfigDict(dict(train="", test="", data_dir="runs/tfds", max_length=256, overlong="truncate",
                             batch_size=8, buckets=32))
    c.optim = ConfigDict(dict(lr=1e-4, schedule="cosine", warmup_steps=10, total_steps=1000,
                              weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8, grad_clip_norm=1.0))
    c.algorithm = ConfigDict(dict(name="sft"))
    c.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.checkpoint = ConfigDict(dict(every=100, keep=3))
    c.train = ConfigDict(dict(steps=1000, micro_batches=1, nan_policy="skip", log_every=10, eval_every=100))
    return c
