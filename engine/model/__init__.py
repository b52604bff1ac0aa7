"""The model room: loading (directory or GGUF), the device, the runner that steps a batch, the owned decode
step of each family (``families/``), the linear-layer kernel choice (``linear``) and the C kernels (``kernels/``)."""
