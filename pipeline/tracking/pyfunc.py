"""MLflow "models from code" script: MLflow executes this file when it loads a logged advtrain model.

Never imported by the library. It rebuilds the network from the logged safetensors weights and
architecture JSON (no pickle). predict() takes pixels in [0,1] shaped (N,C,H,W) or flat (N,C*H*W)
and returns the class logits as a float32 numpy array.
"""

import json

import mlflow
import numpy as np
import torch
from mlflow.pyfunc import PythonModel
from safetensors.torch import load_file

from pipeline.models import build_model


class AdvtrainModel(PythonModel):
    def load_context(self, context):
        with open(context.artifacts["architecture"]) as f:
            self.arch = json.load(f)
        self.model = build_model(self.arch)
        self.model.load_state_dict(load_file(context.artifacts["weights"]))
        self.model.eval()

    def predict(self, context, model_input, params=None):
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32)).reshape(-1, *self.arch["shape"])
        with torch.no_grad():
            return self.model(x).numpy()


mlflow.models.set_model(AdvtrainModel())
