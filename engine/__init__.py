"""t2f.engine: runs text -> faces: the pipeline, its backends (eager PyTorch, CUDA graph, ONNX Runtime, TensorRT), `t2f-infer` and `t2f-bench`."""

from t2f.mapper import MissingMapperError

from .pipeline import Faces, TextToFace, load_pipeline, resolve_device, sample_z

__all__ = ["Faces", "MissingMapperError", "TextToFace", "load_pipeline", "resolve_device", "sample_z"]
