"""t2f.engine: runs text -> faces. The PyTorch backend and `t2f-infer`."""

from t2f.mapper import MissingMapperError

from .pipeline import Faces, TextToFace, load_pipeline, resolve_device, sample_z

__all__ = ["Faces", "MissingMapperError", "TextToFace", "load_pipeline", "resolve_device", "sample_z"]
