"""OpenVINO on the CPU: the exported ONNX graphs, fp32 or bf16 (`INFERENCE_PRECISION_HINT`).

bf16 runs the fp32 graphs with OpenVINO lowering their matrix products and convolutions to bfloat16
(AVX512_BF16 / AMX); each graph does so only where its bf16 parity, measured once at export and
recorded in the manifest, is within bounds (`t2f.export.onnx_export.BF16_BOUNDS`); else it stays fp32.
Each graph is compiled once per block size with static shapes, with OpenVINO's model cache in
T2F_CACHE/openvino, so a second start loads compiled blobs instead of compiling again.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from t2f.errors import first_line
from t2f.private import directory_lock, private_dir
from t2f.precision import Precision
from t2f.specs import GraphSpec

from .base import ArtifactBackend, BackendUnavailable, cpu_threads
from .registry import register

OV_PRECISIONS = {Precision.FP32: "f32", Precision.BF16: "bf16"}
# The lines OpenVINO puts before its reason: where in its sources the exception passed ("Exception from
# src/inference/src/cpp/core.cpp:117:") or which check failed ("Check 'x' failed at src/...:12:").
OPENVINO_LOCATION = re.compile(r"(Exception from|Check .* failed at) \S+:\d+:$")


def openvino_cache() -> Path:
    """T2F_CACHE/openvino, created 0700 and refused where another user could change it (their blob would run here)."""
    from t2f.download import cache_dir

    return private_dir(cache_dir(), "openvino")


@register
class OpenVINOBackend(ArtifactBackend):
    """The exported ONNX graphs through OpenVINO's CPU plugin, fp32 or bf16, static shapes per block size."""

    name = "openvino"
    description = ("the same ONNX graphs through OpenVINO's CPU plugin, compiled once per block size with static shapes; "
                   "bf16 by `INFERENCE_PRECISION_HINT` on the fp32 graphs, per graph as its parity allows; compiled graphs "
                   "cached in `T2F_CACHE/openvino`, so a second start loads them instead of compiling")
    devices = ("cpu",)
    precisions = (Precision.FP32, Precision.BF16)
    auto_rank = {"cpu": {Precision.BF16: 10, Precision.FP32: 20}}
    modules = ("openvino",)
    install = 'pip install "t2f[openvino]"'
    exports_on_demand = True

    @classmethod
    def check_runtime(cls, device, precision):
        if precision is Precision.BF16:
            import openvino

            if "BF16" not in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
                raise BackendUnavailable("OpenVINO's CPU plugin does not offer bf16 on this CPU; use fp32")

    def __init__(self, models, device, precision, artifacts=None, memory_format="nchw"):
        import openvino

        super().__init__(models, device, precision, artifacts, memory_format)
        artifacts, manifest = self.artifacts, self.manifest
        self.core = openvino.Core()
        self.cache = openvino_cache()
        self.core.set_property({"CACHE_DIR": str(self.cache)})
        self.paths = {}                             # each file's checksum was checked against the manifest just now
        for graph, spec in self.specs.items():
            self.paths[graph] = artifacts / spec.file_name(precision.onnx)
            self.graph_precisions[graph] = Precision.parse(manifest.graph_precision(graph, precision))
        self.requests: dict[tuple[str, int], object] = {}
        self.outputs: dict[tuple[str, int], torch.Tensor] = {}

    def _request(self, spec: GraphSpec, batch: int):
        """An infer request of `spec`'s graph compiled for exactly `batch` rows (from OpenVINO's cache where it is there)."""
        key = (spec.name, batch)
        if key not in self.requests:
            model = self.core.read_model(str(self.paths[spec.name]))
            model.reshape({t.name: [batch, *t.shape] for t in spec.inputs})
            config = {"INFERENCE_PRECISION_HINT": OV_PRECISIONS[self.graph_precisions[spec.name]],
                      "INFERENCE_NUM_THREADS": cpu_threads(), "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
            try:
                # One process compiles into the cache at a time: two stubs of t2f-serve compiling the same graph into a
                # fresh cache race in OpenVINO's blob writer ("filesystem error: cannot set permissions: No such file or
                # directory [...blob]"); the second then loads the first's blob instead of compiling again.
                with directory_lock(self.cache, "t2f (OpenVINO compiling into its cache)", wait=True):
                    compiled = self.core.compile_model(model, "CPU", config)
            except RuntimeError as e:
                raise RuntimeError(f"OpenVINO cannot compile {spec.name}: {first_line(e, skip=OPENVINO_LOCATION)}") from None
            self.requests[key] = compiled.create_infer_request()
            self.outputs[key] = torch.empty(spec.output_shape(batch), dtype=spec.output.dtype)
        return self.requests[key], self.outputs[key]

    def _run(self, spec: GraphSpec, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = next(iter(feeds.values())).shape[0]
        request, out = self._request(spec, batch)
        inputs = {name: np.ascontiguousarray(t.detach().cpu().numpy()) for name, t in feeds.items()}
        request.infer(inputs, share_inputs=True)
        out.copy_(torch.from_numpy(request.get_output_tensor(0).data))     # the request's own buffer is reused too
        return out
