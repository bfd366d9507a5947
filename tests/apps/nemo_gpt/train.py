"""A training app shaped like NeMo 1.x's megatron_gpt_pretraining.py: a Hydra main over a
megatron_gpt_config-style config. The task records the config it received (what a NeMo
trainer and model would be built from) and stops there."""

import json
import os
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf


@hydra.main(config_path="conf", config_name="megatron_gpt_config", version_base=None)
def main(cfg) -> None:
    out = Path(HydraConfig.get().runtime.output_dir)
    received = OmegaConf.to_container(cfg, resolve=True)
    rank = os.environ.get("RANK", "0")
    (out / f"task_config.rank{rank}.json").write_text(json.dumps(received, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
