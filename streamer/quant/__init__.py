"""The math: scheme specs, quantization kernels, codecs and dequantizers. No I/O."""
