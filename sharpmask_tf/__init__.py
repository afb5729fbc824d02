"""sharpmask-tf: DeepMask object proposals and SharpMask refinement in TensorFlow 2 / Keras 3."""

__version__ = "0.1.0"
