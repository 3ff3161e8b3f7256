"""Data: chunking, training tasks and prompt templates, RULER generators, TFDS builders, the pipeline.

Submodules are imported on use (TFDS and Grain load only when a pipeline or builder needs them).
"""
