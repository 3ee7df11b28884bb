"""Moving a CLIP between clipforge and other formats (transformers, open_clip, ONNX).

Each integration lives in one module and is imported only where used, so the core
service runs without transformers or onnx installed.
"""
