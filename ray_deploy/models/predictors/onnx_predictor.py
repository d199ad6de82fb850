"""Built-in predictor for ONNX models, run with onnxruntime."""

from __future__ import annotations

from typing import Any

import numpy as np

from ray_deploy.errors import PredictorError
from ray_deploy.models.predictors.base import Predictor, config_choice, visible_gpus

_PROBABILITY_OUTPUTS = ("probabilities", "output_probability", "probability")


class ONNXPredictor(Predictor):
    """Serves an ONNX model given as serialized bytes or an ``onnx.ModelProto``.

    Inputs are cast to float32 and fed to the model's first input.

    predictor_config:
        output: "label" (default; the model's first output) or "probability" (an output named
            probabilities, as onnxmltools and skl2onnx with ``zipmap=False`` produce).
        intra_op_num_threads: threads per inference (default 1: replicas scale out, not up).

    On a replica that holds a GPU, onnxruntime's CUDA provider is used when it is installed
    (``onnxruntime-gpu``), with the CPU provider as fallback; ``device`` says which path ran.
    """

    thread_safe = True  # onnxruntime's InferenceSession.run is thread-safe and releases the GIL

    def __init__(self, model: Any, config: dict[str, Any]):
        super().__init__(model, config)
        import onnxruntime

        data = model.SerializeToString() if hasattr(model, "SerializeToString") else model
        if not isinstance(data, (bytes, bytearray)):
            raise PredictorError(f"predictor 'onnx' needs ONNX bytes or an onnx.ModelProto, got {type(model).__name__}")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = int(self.config.get("intra_op_num_threads", 1))
        gpus = visible_gpus()
        cuda = gpus and "CUDAExecutionProvider" in onnxruntime.get_available_providers()
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
        try:
            self.session = onnxruntime.InferenceSession(bytes(data), options, providers=providers)
        except Exception as exc:
            raise PredictorError(f"predictor 'onnx': onnxruntime cannot load the model ({exc})") from exc
        if self.session.get_providers()[0] == "CUDAExecutionProvider":
            self.device = f"cuda (GPU {','.join(gpus)})"
        elif gpus:
            self.device = (
                f"cpu (GPU {','.join(gpus)} assigned; onnxruntime has no usable CUDA provider: install onnxruntime-gpu)"
            )
        else:
            self.device = "cpu"
        model_input = self.session.get_inputs()[0]
        self.input_name = model_input.name
        width = model_input.shape[-1] if len(model_input.shape) == 2 else None
        self.n_features = width if isinstance(width, int) else None
        output_names = [o.name for o in self.session.get_outputs()]
        self.output = config_choice(self.config, "output", ("label", "probability"), "label")
        if self.output == "probability":
            matches = [name for name in output_names if name in _PROBABILITY_OUTPUTS]
            if not matches:
                raise PredictorError(
                    f"predictor_config.output='probability': the model has no probability output "
                    f"(outputs: {', '.join(output_names)})"
                )
            self.output_name = matches[0]
        else:
            self.output_name = output_names[0]

    def predict(self, payload: np.ndarray) -> Any:
        return self.session.run([self.output_name], {self.input_name: payload.astype(np.float32, copy=False)})[0]
