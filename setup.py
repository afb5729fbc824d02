from setuptools import find_packages, setup

setup(
    name="sharpmask-tf",
    version="0.1.0",
    description="SharpMask object proposals (DeepMask + top-down refinement) in TensorFlow 2 / Keras 3",
    packages=find_packages(include=["sharpmask_tf", "sharpmask_tf.*", "training", "serving"]),
    python_requires=">=3.10",
    install_requires=[
        "tensorflow>=2.21,<2.22",
        "keras>=3.15,<3.16",
        "tensorflow-serving-api>=2.21,<2.22",
        "tensorboard>=2.21,<2.22",
        "prometheus-client>=0.26,<0.27",
        "pycocotools>=2.0.8",
        "numpy",
        "pillow",
        "opencv-python-headless>=5.1",
        "matplotlib",
        "tqdm",
    ],
    entry_points={
        "console_scripts": [
            "sharpmask-demo=sharpmask_tf.demo:main",
            "sharpmask-train=training.train:main",
            "sharpmask-propose=sharpmask_tf.inference:main",
            "sharpmask-evaluate=sharpmask_tf.evaluation:main",
            "sharpmask-serve=serving.server:main",
            "sharpmask-client=serving.client:main",
            "sharpmask-convert=sharpmask_tf.convert.__main__:main",
        ]
    },
)
