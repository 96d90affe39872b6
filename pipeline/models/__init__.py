"""Models: built-in architectures by name, or the user's `package.module:function`; normalisation is the
first layer, so everything outside a model is pixel space [0,1].

- `builtin`: small_cnn, preact_resnet18, wide_resnet (the MODELS registry) and the Normalize layer.
- `user`: importing the user's function, picking logits from tuple/dict outputs, checking outputs, and
  where the user's code lives (shipped to Ray workers and logged with a registered version).
- `record`: the architecture record stored beside the weights (`architecture`), its strict check
  (`check_architecture`) and `build_model`, which rebuilds a network from it.
- `pretrained`: `model.init` weights loaded into a built network, every key matched.
"""

from pipeline.models.builtin import ACTIVATIONS, MODELS, Normalize
from pipeline.models.pretrained import load_pretrained, weights_fit_problems
from pipeline.models.record import (
    ARCH_KEYS,
    architecture,
    build_model,
    check_architecture,
    head_parameter_names,
    input_memory_format,
)
from pipeline.models.user import check_outputs, code_location, is_import_path

__all__ = [
    "ACTIVATIONS",
    "ARCH_KEYS",
    "MODELS",
    "Normalize",
    "architecture",
    "build_model",
    "check_architecture",
    "check_outputs",
    "code_location",
    "head_parameter_names",
    "input_memory_format",
    "is_import_path",
    "load_pretrained",
    "weights_fit_problems",
]
