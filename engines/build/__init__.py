"""`kiln build`: turn a model into an engine directory (calibrate, quantize, evaluate, write)."""
