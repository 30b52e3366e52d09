"""Files a program writes and reads back: atomic writes, folder checks (every path through tf.io.gfile)."""
