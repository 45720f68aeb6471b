"""t2f.export: ONNX graphs and TensorRT engines of the text encoder, mapper and synthesis (`t2f-export`), and StyleGAN2
weights converted into t2f's format (`t2f-convert`)."""
