"""MLflow "models from code" script: MLflow executes this file when it loads a logged advtrain model.

Never imported by the library. It rebuilds the network from the logged safetensors weights and
architecture JSON (no pickle). predict() takes pixels in [0,1] shaped (N,C,H,W) or flat (N,C*H*W)
and returns the class logits as a float32 numpy array.
"""

from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.pyfunc import PythonModel

from pipeline.model_folder import load_folder


class AdvtrainModel(PythonModel):
    def load_context(self, context):
        # The two artifacts sit side by side in the model's artifacts folder: the same checks as every
        # other load (strict architecture record, the weights' sha256, names and shapes).
        self.model, _digest, self.arch = load_folder(Path(context.artifacts["weights"]).parent)

    def predict(self, context, model_input, params=None):
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32)).reshape(-1, *self.arch["shape"])
        with torch.no_grad():
            return self.model(x).numpy()


mlflow.models.set_model(AdvtrainModel())
