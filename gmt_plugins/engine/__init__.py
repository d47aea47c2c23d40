"""The selection engine: key sources, ranking and masking, on CPU and CUDA."""
