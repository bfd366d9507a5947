"""A training app shaped like a Megatron-Bridge script driven by Hydra: the config mirrors
a ConfigContainer (model with megatron-core names, train, ddp, optimizer, dataset). The
task records the config it received and stops there."""

import json
import os
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf


@hydra.main(config_path="conf", config_name="config", version_base=None)
def main(cfg) -> None:
    out = Path(HydraConfig.get().runtime.output_dir)
    received = OmegaConf.to_container(cfg, resolve=True)
    rank = os.environ.get("RANK", "0")
    (out / f"task_config.rank{rank}.json").write_text(json.dumps(received, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
