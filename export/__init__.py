"""t2f.export: ONNX and TensorRT artifacts of the text encoder, mapper and synthesis.

Not built yet: this package is empty until `t2f-export` lands (issue 4).
"""
