"""The student: RF-DETR (transformers) trained on human + teacher labels, evaluated, exported to ONNX."""
