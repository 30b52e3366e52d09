"""The networks: the patch towers and the pair head, Caffe's layers that Keras lacks, and batch-norm folding."""
