"""TensorRT: the exported engines, execute_async_v3 on torch tensors, one stream, one shared scratch buffer, the
three engines captured as one CUDA graph per batch size.

Not run by us: TensorRT cannot be installed on our machines. Written against TensorRT's documented Python API.
"""

from __future__ import annotations

import torch

from t2f.artifacts import load_engine, tensorrt_module
from t2f.errors import UsageError
from t2f.files import sha256_file
from t2f.graphs import GRAPHS, ExportError
from t2f.precision import Precision
from t2f.specs import GraphSpec

from .base import ArtifactBackend, BackendUnavailable, pad_rows, runnable_batch
from .registry import register


def enqueue(context, stream: int, graph: str) -> None:
    """execute_async_v3, raising when TensorRT refuses to enqueue (it returns False, it does not raise)."""
    if not context.execute_async_v3(stream):
        raise RuntimeError(f"TensorRT could not enqueue the {graph} engine")


@register
class TensorRTBackend(ArtifactBackend):
    """The exported TensorRT engines: execute_async_v3 with set_tensor_address on torch tensors, one stream.

    All execution contexts share one device scratch buffer (user-managed context memory): they run one
    after another on one stream, so one buffer of the largest engine's size serves them all.
    """

    name = "tensorrt"
    description = ("the exported engines (`--artifacts`), `execute_async_v3` on torch tensors, one stream, one shared "
                   "scratch buffer, the three engines captured as one CUDA graph per batch size")
    devices = ("cuda",)
    auto_rank = {"cuda": {Precision.FP16: 10, Precision.FP32: 50}}
    modules = ("tensorrt",)
    install = "TensorRT >= 10 from NVIDIA's package index"
    cuda_graph = True                   # capture the three engines as one CUDA graph per batch size (False: launch them)

    def __init__(self, models, device, precision, artifacts=None, memory_format="nchw"):
        super().__init__(models, device, precision, artifacts, memory_format)
        artifacts, manifest = self.artifacts, self.manifest
        records = manifest.tensorrt.get("engines", {})
        self.engines, self.min_batch = {}, 1
        with torch.cuda.device(device):
            for graph, spec in self.specs.items():
                plan, onnx = artifacts / spec.file_name(self.precision, "plan"), spec.file_name(self.precision)
                record = records.get(plan.name)
                if (not record or not plan.is_file() or record.get("sha256") != sha256_file(plan)
                        or record["record"].get("onnx_sha256") != manifest.sha256(onnx)):
                    raise BackendUnavailable(f"{plan} is missing, changed, or built from another {onnx}; run t2f-export --out {artifacts} again")
                try:
                    self.engines[graph] = load_engine(plan, manifest, device)
                except (ExportError, OSError) as e:
                    raise BackendUnavailable(str(e)) from None
                profiles = record["record"]["profiles"].values()
                self.max_batch = min(self.max_batch, *(shapes[2][0] for shapes in profiles))
                self.min_batch = max(self.min_batch, *(shapes[0][0] for shapes in profiles))
            self.trt = tensorrt_module()
            sizes = [getattr(e, "device_memory_size_v2", None) or e.device_memory_size for e in self.engines.values()]
            self.scratch = torch.empty([max(sizes + [1])], dtype=torch.uint8, device=device)   # 512-byte aligned
            self.stream = torch.cuda.Stream(device)
            self.contexts = self._contexts()
        self.outputs: dict[tuple, torch.Tensor] = {}
        self.graphs: dict[int, tuple] = {}

    def _contexts(self) -> dict:
        """One execution context per engine, on the shared scratch buffer."""
        strategy = getattr(self.trt, "ExecutionContextAllocationStrategy", None)
        contexts = {}
        for graph, engine in self.engines.items():
            if strategy is None:                                    # TensorRT before 10.0: contexts own their memory
                contexts[graph] = engine.create_execution_context()
                continue
            context = engine.create_execution_context(strategy.USER_MANAGED)
            if hasattr(context, "set_device_memory"):               # TensorRT >= 10.1
                context.set_device_memory(self.scratch.data_ptr(), self.scratch.numel())
            else:
                context.device_memory = self.scratch.data_ptr()
            contexts[graph] = context
        return contexts

    def full(self, tokens, z, psi):
        """The three engines in a row; with cuda_graph, their launches are captured once per batch size and replayed,
        each batch size with execution contexts of its own (a captured graph keeps its context's shapes)."""
        if not self.cuda_graph:
            return super().full(tokens, z, psi)
        batch = tokens.shape[0]
        rows = runnable_batch(batch, self.min_batch, self.max_batch)
        if rows not in self.graphs:
            self.graphs[rows] = self._capture(pad_rows(tokens, rows), pad_rows(z, rows), pad_rows(psi, rows))
        graph, static, ws, image = self.graphs[rows]
        for buffer, value in zip(static, (tokens, z, psi)):
            buffer[:batch].copy_(value, non_blocking=True)
        with torch.cuda.device(self.device):
            graph.replay()                                       # on the current stream, after the copies
        return ws[:batch], image[:batch]

    @torch.no_grad()
    def _capture(self, tokens, z, psi) -> tuple:
        """Run the three engines once un-captured, capture their launches, and check the first replay against that run."""
        with torch.cuda.device(self.device):
            contexts = self._contexts()
            static = (tokens.to(self.device, torch.int32).clone(), z.to(self.device).float().clone(), psi.to(self.device).float().clone())
            e = self._run(self.specs["text_encoder"], {"tokens": static[0]}, contexts)
            ws = self._run(self.specs["mapper"], {"embedding": e, "z": static[1], "psi": static[2]}, contexts)
            image = self._run(self.specs["synthesis"], {"ws": ws}, contexts)
            expected = (ws.clone(), image.clone())
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            # The un-captured run bound every tensor address (static inputs, this batch's outputs); capture the launches.
            with torch.cuda.graph(graph, stream=self.stream):
                for name in GRAPHS:
                    enqueue(contexts[name], self.stream.cuda_stream, name)
            graph.replay()
            torch.cuda.synchronize(self.device)
            if not (torch.equal(ws, expected[0]) and torch.equal(image, expected[1])):
                raise RuntimeError("the captured TensorRT engines do not reproduce their un-captured run; "
                                   "use the tensorrt backend without CUDA graphs (its cuda_graph = False)")
        self._graph_contexts = getattr(self, "_graph_contexts", []) + [contexts]      # keep them alive with the graph
        return graph, static, ws, image

    def _run(self, spec: GraphSpec, feeds: dict[str, torch.Tensor], contexts=None) -> torch.Tensor:
        context = (contexts or self.contexts)[spec.name]
        batch = next(iter(feeds.values())).shape[0]
        rows = runnable_batch(batch, self.min_batch, self.max_batch)
        with torch.cuda.device(self.device):
            for name, tensor in feeds.items():
                tensor = pad_rows(tensor.to(self.device), rows).contiguous()
                feeds[name] = tensor
                if not context.set_input_shape(name, tuple(tensor.shape)):
                    raise UsageError(f"{name} {tuple(tensor.shape)} is outside the {spec.name} engine's profile "
                                     f"(batch {self.min_batch} to {self.max_batch}); re-export with another --batch")
                context.set_tensor_address(name, tensor.data_ptr())
            key = (spec.name, rows, id(context))
            if key not in self.outputs:
                self.outputs[key] = torch.empty(spec.output_shape(rows), dtype=spec.output.dtype, device=self.device)
            out = self.outputs[key]
            context.set_tensor_address(spec.output.name, out.data_ptr())
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            enqueue(context, self.stream.cuda_stream, spec.name)
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
        return out[:batch]
