"""The ``cuda`` backend: thin calls into the compiled ``asvit_kernels._C`` module.

``_C`` has a torch-free ABI: tensors travel as device pointers, sizes and strides, and the current
stream as an integer, so one compiled wheel serves every torch version."""
