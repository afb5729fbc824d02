"""Command-line entry points for training (`python training/train.py`)."""
