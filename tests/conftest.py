import os

# Two logical CPU devices for tf.distribute tests; quiet TensorFlow's start-up chatter.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
import torch_trees  # noqa: E402

_cpus = tf.config.list_physical_devices("CPU")
if _cpus and not tf.config.get_logical_device_configuration(_cpus[0]):
    tf.config.set_logical_device_configuration(
        _cpus[0], [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
    )


# The reference's DeepMask and SharpMask trees (tests/torch_trees.py) for the converter tests; a
# module that asks for them says its batch with a module-level BATCH.
@pytest.fixture(scope="module")
def deepmask_file(request):
    return torch_trees.deepmask(np.random.default_rng(0), batch=request.module.BATCH)


@pytest.fixture(scope="module")
def sharpmask_file(deepmask_file):
    return torch_trees.sharpmask(np.random.default_rng(1), deepmask_file)
