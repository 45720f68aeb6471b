"""t2f.export: ONNX graphs and TensorRT engines of the text encoder, mapper and synthesis (`t2f-export`)."""
