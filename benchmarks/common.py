"""What the benchmarks share: the machine's float32 matmul rate, measured in the same process."""

from __future__ import annotations

import time

import numpy as np


def matmul_gflops(n: int = 2048, repeats: int = 10, dtype: str = "float32") -> float:
    """Median GFLOP/s of a compiled n x n tf.matmul in `dtype`, the reference rate of this machine."""
    import tensorflow as tf

    a = tf.cast(tf.random.uniform((n, n)), dtype)
    b = tf.cast(tf.random.uniform((n, n)), dtype)
    f = tf.function(lambda x, y: tf.matmul(x, y))
    f(a, b).numpy()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        f(a, b).numpy()
        times.append(time.perf_counter() - start)
    return 2 * n**3 / float(np.median(times)) / 1e9
