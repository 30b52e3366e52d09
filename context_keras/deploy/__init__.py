"""What a trained network is shipped as: the serving SavedModels, the plain Keras file, LiteRT and ONNX conversion,
and the data-dependent rescaling applied before fine-tuning."""
