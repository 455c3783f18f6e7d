"""Where data comes from and how it is read: sources, the manifest, safe image decoding, the one TFRecord reader, the frozen test set's sizing."""
