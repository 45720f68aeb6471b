"""t2f.engine: runs text -> faces: the pipeline, its backends (eager PyTorch, CUDA graph, ONNX Runtime, TensorRT), `t2f-infer` and `t2f-bench`.

    from t2f.engine import load_pipeline
    pipe = load_pipeline("runs/ffhq")                # or "hf-hub:ORG/NAME", or "tiny"
    faces = pipe("a smiling woman", n=4)
"""

from t2f.mapper import MissingMapperError

from .config import PipelineConfig, build_pipeline, load_pipeline
from .pipeline import Faces, TextToFace, resolve_device, sample_z

__all__ = ["Faces", "MissingMapperError", "PipelineConfig", "TextToFace", "build_pipeline", "load_pipeline", "resolve_device",
           "sample_z"]
