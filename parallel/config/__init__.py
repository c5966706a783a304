"""The config tree: schema, YAML + overrides, validation, the DeepSpeed mapping.

A leaf package: it imports nothing else of :mod:`parallel`."""
from parallel.config.errors import ConfigError
from parallel.config.load import import_object, load_config
from parallel.config.schema import (
                                    ActivationCheckpointingConfig,
                                    CheckpointConfig,
                                    Config,
                                    DataConfig,
                                    LossScaleConfig,
                                    ModelConfig,
                                    OffloadConfig,
                                    OptimizerConfig,
                                    ParallelConfig,
                                    SchedulerConfig,
                                    TrainConfig,
                                    ZeroConfig,
)
from parallel.config.validate import CHOICES

__all__ = ["ConfigError", "Config", "load_config", "import_object", "CHOICES", "ModelConfig", "DataConfig",
           "ParallelConfig", "OptimizerConfig", "SchedulerConfig", "LossScaleConfig", "CheckpointConfig", "TrainConfig",
           "OffloadConfig", "ZeroConfig", "ActivationCheckpointingConfig"]
