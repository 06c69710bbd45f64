"""Named model sizes, one YAML file each in `model/`: the one table of them.

The library reads them (`minigpt.config.PRESETS`, `GPTModel.from_preset`) and the
pipeline's Hydra config finds the same files as its `model` group (`conf/config.yaml`
adds `pkg://minigpt.presets` to the search path), so a size is written down once.
"""
