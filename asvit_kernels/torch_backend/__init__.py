"""The ``torch`` backend: plain PyTorch calls on strided views, so it runs on any device and dtype
(float64 included) and still never copies a weight slice. Pure functions, no autograd."""
