"""Quantized weights: the portable quantized linear layer (linear.py), quantize-at-load
(methods.py) and the checkpoint formats that arrive already quantized (formats.py, gguf.py).

The loaders call `install` to put QuantizedLinear modules in a model before its weights are read;
the device platform later swaps each for its own kernel (devices/cpu_quant.py on CPU).
"""
