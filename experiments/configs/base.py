"""Shared defaults of the experiment configs, nested by concern.

Each section holds every field of the typed config it is unpacked into
(`experiments/wiring.py`), so any field can be set with `--config.<section>.<field>`.
"""

from ml_collections import ConfigDict

from experiments import wiring


def base_config() -> ConfigDict:
    from jaxalign.sharding import MeshConfig
    from jaxalign.training import OptimConfig

    c = ConfigDict()
    c.seed = 0
    c.workdir = "runs/experiment"
    c.model = wiring.section(wiring.ModelSection)
    c.data = wiring.section(wiring.DataSection)
    c.optim = wiring.section(OptimConfig, lr=1e-4, schedule="cosine", warmup_steps=10, total_steps=1000)
    c.algorithm = wiring.offline_section("sft")
    c.mesh = wiring.section(MeshConfig)
    c.checkpoint = wiring.section(wiring.CheckpointSection)
    c.train = wiring.section(wiring.TrainSection)
    return c
