"""COCO-format data: validated loading, the paper's patch sampler, the tf.data pipeline and the
synthetic default dataset.

Names are imported on first use, so `python -m sharpmask_tf.data.synthetic` does not load
TensorFlow.
"""

import importlib

_EXPORTS = {
    "CocoDataset": "coco",
    "DatasetError": "coco",
    "PatchSampler": "sampler",
    "Window": "sampler",
    "PackedSplit": "packed",
    "load_packed": "packed",
    "load_split": "pipeline",
    "load_packed_split": "pipeline",
    "make_dataset": "pipeline",
    "make_validation_patches": "pipeline",
    "ensure_dataset": "synthetic",
    "generate_dataset": "synthetic",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
