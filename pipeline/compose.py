"""Compose conf/ (+ Hydra overrides) into params.yaml exactly as `dvc exp run` does.

`dvc repro` never composes: it trusts params.yaml. `make params` runs this so the two
stay in sync (a test fails if they drift).

    python -m pipeline.compose                     # defaults
    python -m pipeline.compose model=gpt2-small    # same override syntax as `dvc exp run -S`
"""

from __future__ import annotations

import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from minigpt.io import write_text_atomic
from pipeline import paths

CONF_DIR = Path("conf")


def compose_params(overrides: list[str] | None = None, conf_dir: Path = CONF_DIR) -> str:
    """params.yaml text for these overrides (DVC dumps the resolved config with OmegaConf)."""
    with initialize_config_dir(str(conf_dir.resolve()), version_base=None):
        cfg = compose(config_name="config", overrides=overrides or [])
    OmegaConf.resolve(cfg)
    return OmegaConf.to_yaml(cfg)


def main() -> None:
    write_text_atomic(paths.PARAMS, compose_params(sys.argv[1:]))
    print(f"compose: wrote {paths.PARAMS}")


if __name__ == "__main__":
    main()
