"""Edge deployment of trained backbones: the timm export, ONNX (fp32 and int8) and latency figures."""
