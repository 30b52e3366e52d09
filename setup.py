"""context_keras: self-supervised learning by context prediction (Doersch, Gupta & Efros, ICCV 2015) in TF2/Keras 3."""
from setuptools import find_packages
from setuptools import setup

ONNX = ["tf2onnx>=1.17.0,<1.18", "onnx>=1.23.2,<1.24", "onnxruntime>=1.32.0,<1.33"]
LITERT = ["ai-edge-litert>=2.3.0,<2.4"]

setup(
    name="context_keras",
    version="0.1.0",
    description="Context prediction (relative patch location) pre-training with tf.data, Keras 3 and tf.distribute",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    # The repository's flags/ (the flagfiles and the lists they name) and benchmarks/ (the PyTorch baseline) ship
    # inside the package as context_keras/flags and context_keras/benchmarks, where the programs find them from any
    # folder (storage/paths.py, shipped).
    packages=find_packages(include=["context_keras", "context_keras.*"]) + ["context_keras.flags",
                                                                            "context_keras.benchmarks"],
    package_dir={"context_keras.flags": "flags", "context_keras.benchmarks": "benchmarks"},
    package_data={"context_keras.flags": ["*.cfg", "*.txt"], "context_keras.benchmarks": ["*.py"]},
    entry_points={"console_scripts": ["context-keras=context_keras.cli.commands:main"]},
    python_requires=">=3.10",
    install_requires=[
        "tensorflow>=2.16",
        "keras>=3.3",
        "numpy",
        "absl-py",
        # tf.summary needs it to write any summary; it is also the viewer of the training logs.
        "tensorboard",
    ],
    extras_require={
        "cuda": ["tensorflow[and-cuda]>=2.16"],
        # scikit-image ships the sample photos of flags/demo.cfg.
        "demo": ["scikit-image"],
        # benchmarks/torch_baseline.py, the PyTorch baseline that `python -m context_keras.benchmark` runs.
        "bench": ["torch", "scikit-image"],
        # Deployment: ONNX conversion (export --onnx) and its runtime; the LiteRT interpreter (the converter is part
        # of TensorFlow). Verified with TensorFlow 2.21 and numpy 2.4; tf2onnx 1.16 pins protobuf 3.20, which breaks
        # TensorFlow >= 2.20.
        "onnx": ONNX,
        "litert": LITERT,
        # The deployment tests run the exports in these runtimes, so CI installs them.
        "test": ["pytest", "pytest-timeout", "pytest-xdist", "scikit-image", "pillow"] + ONNX + LITERT,
    },
)
