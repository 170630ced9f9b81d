"""Post-training quantization algorithms (RTN, calibrators, SmoothQuant, FP8, AWQ, GPTQ) as pure tensor functions."""
