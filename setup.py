"""context_keras: self-supervised learning by context prediction (Doersch, Gupta & Efros, ICCV 2015) in TF2/Keras 3."""
import os
import re

from setuptools import find_packages
from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
DESCRIPTION = "Context prediction (relative patch location) pre-training with tf.data, Keras 3 and tf.distribute"


def read(*parts):
  """A file beside setup.py, whatever the working directory (pip builds from a copy or a temporary folder)."""
  with open(os.path.join(HERE, *parts), encoding="utf-8") as f:
    return f.read()


def version():
  """context_keras.__version__, parsed from the package's __init__.py: importing the package imports TensorFlow,
  which building or installing it must not need."""
  found = re.search(r'^__version__ = "([^"]+)"$', read("context_keras", "__init__.py"), re.MULTILINE)
  if not found:
    raise RuntimeError("context_keras/__init__.py has no line __version__ = \"...\"")
  return found.group(1)


def long_description():
  """README.md, or the one-line description where a source tree without it is built."""
  try:
    return read("README.md")
  except OSError:
    return DESCRIPTION


ONNX = ["tf2onnx>=1.17.0,<1.18", "onnx>=1.23.2,<1.24", "onnxruntime>=1.32.0,<1.33"]
LITERT = ["ai-edge-litert>=2.3.0,<2.4"]
PLOT = ["matplotlib>=3.7"]
TFDS = ["tensorflow-datasets>=4.9"]
# keras-hub 0.32 brings tensorflow-text; verified to leave TensorFlow 2.21, Keras 3.15 and protobuf as they are.
DETECTION = ["keras-hub>=0.32,<0.33"]

setup(
    name="context_keras",
    version=version(),
    description=DESCRIPTION,
    long_description=long_description(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    license_files=["LICENSE"],
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
        # The ablation's plot (OUT/ablation.png); without it the ablation writes its table and JSON and says so.
        "plot": PLOT,
        # Labelled sets read through TensorFlow Datasets.
        "tfds": TFDS,
        # The detection evaluation's detectors (keras-hub).
        "detection": DETECTION,
        # The deployment tests run the exports in these runtimes, so CI installs them, and every optional feature.
        "test": (["pytest", "pytest-timeout", "pytest-xdist", "scikit-image", "pillow"] + ONNX + LITERT + PLOT + TFDS +
                 DETECTION),
    },
)
