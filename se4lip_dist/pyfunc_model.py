"""The registered model's pyfunc, logged as code (MLflow's "models from code").

MLflow runs this file when it loads the model (``mlflow.pyfunc.load_model``) instead of
unpickling a class, and the weights are plain tensors read with ``weights_only=True``: the
documented load path executes no pickle. Not imported by se4lip-dist itself.
"""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc
import numpy as np
from mlflow.models import set_model

from se4lip_dist.weights import embed_waveforms, load_files


class SpeechEmbedder(mlflow.pyfunc.PythonModel):
    """``{"waveform_16k": float32 [batch, samples]}`` -> embeddings ``float32 [batch, D]``."""

    def load_context(self, context: Any) -> None:
        self.encoder, self.cfg = load_files(context.artifacts["weights"],
                                            context.artifacts["config"])

    # MLflow hands the named-tensor dict of the logged signature; the ndarray hint only stops
    # MLflow from inferring a second signature from type hints (the logged one is authoritative).
    def predict(self, context: Any, model_input: np.ndarray, params: Any = None) -> np.ndarray:
        return embed_waveforms(self.encoder, model_input, self.cfg)


set_model(SpeechEmbedder())
