"""The input side: image sources, decoding and EXIF, the patch geometry, augmentation and the shortcut fixes, the
tf.data pipeline that packs patch pairs into batches, and the labelled sets of the evaluations."""
