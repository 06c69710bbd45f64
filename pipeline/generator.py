"""The code of the `generator` model that `pipeline.tracking.log_generator` logs: MLflow's
"models from code", so this file is copied into the model and run when it is loaded, and
nothing is unpickled (the weights are a safetensors checkpoint, the model's `checkpoint`
artifact). Loading needs the installed minigpt package, not this repository.

Input: a DataFrame with a `prompt` column. Params: `minigpt.serving.GENERATION_DEFAULTS`
(MLflow passes them all, defaults filled in). Output: one string per prompt, the prompt
followed by its continuation, like the pipeline's samples and `minigpt generate`.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel, PythonModelContext

from minigpt.model import GPTModel
from minigpt.serving import GENERATION_DEFAULTS, load_language_model, stream_text
from minigpt.utils import pick_device


class TextGenerator(PythonModel):
    """Continues text prompts with the model of the `checkpoint` artifact, on a GPU if there is one."""

    model: GPTModel

    def load_context(self, context: PythonModelContext) -> None:
        self.model, _ = load_language_model(context.artifacts["checkpoint"], pick_device("auto"))

    def predict(self, context: PythonModelContext, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> list[str]:
        settings = {**GENERATION_DEFAULTS, **(params or {})}
        try:
            return [prompt + "".join(stream_text(self.model, prompt, **settings)) for prompt in model_input["prompt"]]
        except ValueError as err:  # a bad setting: a 400 that names it, not a 500 with a traceback
            raise MlflowException.invalid_parameter_value(str(err)) from None


set_model(TextGenerator())
