"""context_keras: self-supervised learning by context prediction (Doersch, Gupta & Efros, ICCV 2015) in TF2/Keras 3."""
import os

# TensorFlow's C++ INFO and WARNING lines (CUDA probing on CPU hosts, libpng's colour-profile notes on every
# sample photo) drown the training log; errors still show. TF_CPP_MIN_LOG_LEVEL=0 brings them back.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
