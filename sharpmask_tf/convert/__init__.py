"""Converters from the authors' released models (Torch7 `.t7`, the PyTorch port's `.pth`).

Reading and recording is framework-neutral (`ir`); building Keras models from a record is the
model code's job.
"""
