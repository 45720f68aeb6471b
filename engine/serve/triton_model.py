"""The model.py of t2f's static Triton model repository: Triton's Python backend runs this file, one process per instance.

repository.py copies it unchanged into `REPOSITORY/t2f/1/model.py` and
`REPOSITORY/t2f_image/1/model.py`; config.pbtxt's parameter `t2f` (JSON) says which pipeline to
load (t2f.engine.load_pipeline's arguments), and the instance group which device. It needs only
an interpreter where `t2f` is installed: t2f-serve's embedded tritonserver, or NVIDIA's Triton
container with `pip install t2f` (docs/serving.md).

Each request of a batch is answered on its own: a bad one gets an INVALID_ARG error response that
names its problem (HTTP 400, gRPC INVALID_ARGUMENT), and the requests merged with it are answered
as if it had not been sent. An unexpected error answers the batch with one line; its traceback goes
to Triton's log, never to a client.
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import traceback

import numpy as np
import triton_python_backend_utils as pb_utils

from t2f.engine.serve.protocol import IMAGE_MODEL, INPUTS, BadRequest, parse_request


def _error(message: str, code: str = "INVALID_ARG"):
    error_code = getattr(pb_utils.TritonError, code, None)
    error = pb_utils.TritonError(message) if error_code is None else pb_utils.TritonError(message, error_code)
    return pb_utils.InferenceResponse(error=error)


class _Counters:
    """Triton custom metrics t2f_requests (answered / refused) and t2f_rows per model instance; a no-op where unsupported."""

    def __init__(self, model: str, instance: str):
        self.metrics = {}
        family = getattr(pb_utils, "MetricFamily", None)
        if family is None:
            return
        try:
            requests = family(name="t2f_requests", description="requests a t2f model instance answered", kind=family.COUNTER)
            rows = family(name="t2f_rows", description="rows a t2f model instance generated", kind=family.COUNTER)
            self.families = (requests, rows)           # a Metric needs its family alive
            labels = dict(model=model, instance=instance)
            self.metrics = dict(answered=requests.Metric(labels={**labels, "outcome": "answered"}),
                                refused=requests.Metric(labels={**labels, "outcome": "refused"}),
                                rows=rows.Metric(labels=labels))
        except Exception:                              # a backend without custom metrics: counting is optional
            self.metrics = {}

    def add(self, name: str, value: int) -> None:
        if value and name in self.metrics:
            with contextlib.suppress(Exception):
                self.metrics[name].increment(value)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.model = args["model_name"]
        self.image_mode = self.model == IMAGE_MODEL
        self.names = [t.name for t in INPUTS[self.model]]
        options = json.loads(config["parameters"]["t2f"]["string_value"])
        device = "cpu" if args["model_instance_kind"] == "CPU" else f"cuda:{args['model_instance_device_id']}"
        try:
            import torch

            from t2f.engine import load_pipeline

            torch.set_num_threads(int(options.pop("threads", 0)) or torch.get_num_threads())
            self.pipe = load_pipeline(device=device, progress=False, **options)
            self.pipe._generate_rows([0], [0], [1.0], prompts=["a warm-up prompt"])   # kernels, graph capture
        except Exception as e:                         # one line in Triton's log ("failed to load ...: <this>")
            raise RuntimeError(f"t2f model {self.model} on {device}: {' '.join(str(e).split())}") from None
        self.lock = threading.Lock()
        self.counters = _Counters(self.model, args["model_instance_name"])

    def _check_prompt(self, prompt: str) -> None:
        from t2f.engine.prompts import is_blank

        if is_blank(prompt):
            raise BadRequest("prompt is empty")
        tokens = self.pipe.clip.token_count(prompt)
        if tokens > self.pipe.clip.context_length:
            raise BadRequest(f"prompt is too long: {tokens} tokens, CLIP takes {self.pipe.clip.context_length} tokens")

    def execute(self, requests):
        try:
            return self._execute(requests)
        except Exception as e:                         # a bug or a device failure: one line to the clients, the traceback to the log
            traceback.print_exc(file=sys.stderr)
            return [_error(f"t2f model {self.model} failed: {type(e).__name__}", "INTERNAL") for _ in requests]

    def _execute(self, requests):
        responses = [None] * len(requests)
        parsed = []
        for k, request in enumerate(requests):
            try:
                data = {}
                for name in self.names:
                    tensor = pb_utils.get_input_tensor_by_name(request, name)
                    data[name] = None if tensor is None else tensor.as_numpy()
                parsed.append((k, parse_request(data, self.image_mode, self.pipe.backend.noise_modes, self._check_prompt)))
            except BadRequest as e:
                responses[k] = _error(f"bad request: {e}")
        self.counters.add("refused", len(requests) - len(parsed))
        for noise_mode in sorted({rows.noise_mode for _, rows in parsed}):
            group = [(k, rows) for k, rows in parsed if rows.noise_mode == noise_mode]
            flat = {key: [v for _, rows in group for v in getattr(rows, key)] for key in ("seeds", "samples", "truncations")}
            with self.lock:
                if self.image_mode:
                    import torch

                    from t2f.engine.pipeline import face_tensor

                    faces = torch.stack([face_tensor(face) for _, rows in group for face in rows.faces])
                    result = self.pipe._generate_rows(**flat, images=faces, noise_mode=noise_mode)
                else:
                    prompts = [p for _, rows in group for p in rows.prompts]
                    result = self.pipe._generate_rows(**flat, prompts=prompts, noise_mode=noise_mode)
            images, ws = result.images.numpy(), result.ws.numpy()
            start = 0
            for k, rows in group:
                end = start + len(rows.seeds)
                responses[k] = pb_utils.InferenceResponse([pb_utils.Tensor("image", np.ascontiguousarray(images[start:end])),
                                                           pb_utils.Tensor("ws", np.ascontiguousarray(ws[start:end]))])
                start = end
            self.counters.add("answered", len(group))
            self.counters.add("rows", len(flat["seeds"]))
        return responses
