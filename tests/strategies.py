"""One MirroredStrategy over the two logical CPU devices (tests/conftest.py) for the whole test
process: with a second one made in the same process, its first all-reduce can fail ("Shape
mismatch in the collective instance"), depending on which tests ran before."""

import functools

import tensorflow as tf


@functools.cache
def two_cpus() -> tf.distribute.MirroredStrategy:
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
