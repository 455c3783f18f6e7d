"""Training and evaluation inputs from ``data/processed``, as fast tf.data pipelines.

Images come from the TFRecord shards of raw uint8 pixels that preprocess wrote: the shards are
read in parallel, parsed and reshaped in a parallel map (no image decoding: the pixels are stored
raw) and cached in memory as uint8, so from the second epoch on an epoch is a shuffle of
in-memory tensors. For training, batches are augmented with Keras' own random image layers
(small rotations, zoom and contrast; a left-right flip only when asked, as anatomy is not
symmetric) and prefetched so the accelerator never waits.

Reproducible augmentation that stays parallel: the Keras layers draw their randomness from a
per-layer ``SeedGenerator`` variable, a stateful op. Under ``enable_op_determinism`` tf.data runs
any pipeline with such an op serially and drops prefetching, several times slower. Here every
batch instead gets its own seed from ``tf.data.Dataset.random(train.seed)`` (new, but
reproducible, numbers every epoch), and the layers' ``get_random_transformation`` is called
with it: the same Keras random transforms, stateless, so the map runs in parallel and two
trainings see the same augmented batches. `Augmenter` then applies them in as few passes as it
can (one resampling for rotation and zoom together; one channel for gray radiographs).

Labels are float32: ``(n, 1)`` for two classes (P(``classes[1]``)), one-hot otherwise.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipelines.config import AugmentationSpec, Params
from pipelines.errors import MedloopError
from pipelines.workspace import Layout, read_json

SPLITS = ("train", "validation", "test")
MAX_SHUFFLE_BUFFER = 16384  # a full shuffle up to this many items (uint8 tensors, shared with the cache)


def processed_summary(layout: Layout) -> dict:
    """``data/processed/preprocess.json``.

    Raises:
        MedloopError: preprocess has not run.
    """
    return read_json(layout.processed / "preprocess.json", "run the preprocess stage first")


def image_dataset(layout: Layout, split: str, params: Params, *, training: bool) -> Any:
    """The images and labels of one split as a batched ``tf.data.Dataset``.

    Args:
        layout: the workspace.
        split: ``train``, ``validation`` or ``test``.
        params: batch size, classes, seed and augmentation.
        training: shuffle (seeded, reshuffled every epoch) and augment; otherwise the order is
            fixed (the same on every iteration) and pixels are left as they are.

    Returns:
        Batches of ``(float32 images (b, H, W, C) with values 0..255, float32 labels)``.

    Raises:
        MedloopError: the split has no shards or no items.
    """
    import tensorflow as tf

    summary = processed_summary(layout)
    files = [str(layout.processed / name) for name in summary.get("shards", {}).get(split, [])]
    count = int(summary.get("counts", {}).get(split, 0))
    if not files or count == 0:
        raise MedloopError(f"{layout.processed}: the {split} split has no images; collect more data")
    shape = (summary["image"]["height"], summary["image"]["width"], summary["image"]["channels"])
    n_classes = len(summary["classes"])
    features = {
        "image": tf.io.FixedLenFeature([], tf.string),
        "label": tf.io.FixedLenFeature([], tf.int64),
    }

    def parse(serialized):
        example = tf.io.parse_single_example(serialized, features)
        pixels = tf.reshape(tf.io.decode_raw(example["image"], tf.uint8), shape)
        return pixels, _encode_label(example["label"], n_classes)

    autotune = tf.data.AUTOTUNE
    dataset = tf.data.TFRecordDataset(files, num_parallel_reads=autotune)
    # Cached as uint8: a quarter of the memory of float32, and the cast is nearly free later.
    # The count is known (preprocess.json), so Keras knows the epoch's length from the start.
    dataset = dataset.map(parse, num_parallel_calls=autotune).apply(tf.data.experimental.assert_cardinality(count))
    dataset = dataset.cache()
    batch_size = params.train.batch_size
    if training:
        seed = params.train.seed
        dataset = dataset.shuffle(min(count, MAX_SHUFFLE_BUFFER), seed=seed, reshuffle_each_iteration=True)
        dataset = dataset.batch(batch_size)
        augmentation = params.train.augmentation
        if augmentation is not None:
            augment = Augmenter(augmentation, seed)
            batch_seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
            dataset = tf.data.Dataset.zip((dataset, batch_seeds)).map(
                lambda batch, batch_seed: (augment(batch[0], batch_seed), batch[1]),
                num_parallel_calls=autotune,
            )
        else:
            dataset = dataset.map(lambda x, y: (tf.cast(x, tf.float32), y), num_parallel_calls=autotune)
    else:
        dataset = dataset.batch(batch_size).map(
            lambda x, y: (tf.cast(x, tf.float32), y), num_parallel_calls=autotune
        )
    return dataset.prefetch(autotune)


def augmentation_layers(spec: AugmentationSpec, seed: int) -> list:
    """The Keras random image layers of ``train.augmentation``, in the order they apply.

    Rotation by up to ``rotation_degrees`` either way, zoom in or out by up to ``zoom``,
    contrast by up to ``contrast``, and a horizontal flip only when ``horizontal_flip`` is set.
    Areas a rotation or zoom-out uncovers are filled black, as on a rotated detector (the Keras
    default, reflection, would mirror ribs and lung edges into the corners). The layers compute in
    float32 whatever the global mixed-precision policy, since they run in the input pipeline.
    """
    from keras import layers

    chosen = []
    if spec.rotation_degrees > 0:
        chosen.append(layers.RandomRotation(spec.rotation_degrees / 360.0, fill_mode="constant",
                                            fill_value=0.0, seed=seed, dtype="float32"))
    if spec.zoom > 0:
        chosen.append(layers.RandomZoom((-spec.zoom, spec.zoom), fill_mode="constant", fill_value=0.0,
                                        seed=seed + 1, dtype="float32"))
    if spec.contrast > 0:
        chosen.append(layers.RandomContrast(spec.contrast, value_range=(0, 255), seed=seed + 2, dtype="float32"))
    if spec.horizontal_flip:
        chosen.append(layers.RandomFlip("horizontal", seed=seed + 3, dtype="float32"))
    return chosen


class Augmenter:
    """Applies `augmentation_layers` to a batch, with a seed given per batch (stateless).

    The layers draw the random parameters (their own distributions, seeded per batch); the
    pixels are then transformed in as few passes as possible, which is what makes augmentation
    cheap enough to keep up with an accelerator:

    - rotation and zoom are both resamplings, so their matrices are composed and the image is
      resampled once (one bilinear interpolation instead of two: half the work, less blur);
    - radiographs are gray, even when stored with 3 channels (clean replicates the gray
      channel), and every step acts on each channel alike, so when a batch's channels are equal
      one channel is augmented and replicated (the same result up to float rounding, a third of
      the work).

    Args:
        spec: ``train.augmentation``.
        seed: the layers' own seed (used only if they are called directly).
    """

    def __init__(self, spec: AugmentationSpec, seed: int):
        self.layers = augmentation_layers(spec, seed)

    def __call__(self, images: Any, batch_seed: Any) -> Any:
        """Augment ``images`` (a batch, any numeric dtype) with the int64 scalar ``batch_seed``;
        returns float32 images in 0..255."""
        import tensorflow as tf

        drawn = []
        for index, layer in enumerate(self.layers):
            with _tensorflow_backend(layer):
                seed = _batch_seed_class()(batch_seed, index)
                drawn.append((layer, layer.get_random_transformation(images, training=True, seed=seed)))
        channels = images.shape[-1]
        if channels == 1:
            return self._apply(tf.cast(images, tf.float32), drawn)
        # Checked and sliced before the cast to float32: a quarter of the bytes to touch.
        gray = tf.reduce_all(tf.equal(images, images[..., :1]))
        return tf.cond(
            gray,
            lambda: tf.tile(self._apply(tf.cast(images[..., :1], tf.float32), drawn), [1, 1, 1, channels]),
            lambda: self._apply(tf.cast(images, tf.float32), drawn),
        )

    @staticmethod
    def _apply(images: Any, drawn: list) -> Any:
        import keras
        import tensorflow as tf

        resampling = [(layer, t) for layer, t in drawn if isinstance(layer, _RESAMPLING_LAYERS())]
        if resampling:
            # Each matrix maps output pixel coordinates to input ones; applying A then B reads
            # output p from input A(B(p)), so the combined matrix is A @ B.
            height, width = tf.shape(images)[1], tf.shape(images)[2]
            combined = None
            for layer, transformation in resampling:
                matrix = _as_3x3(_resampling_matrix(layer, transformation, height, width))
                combined = matrix if combined is None else tf.matmul(combined, matrix)
            flat = tf.reshape(combined, (-1, 9))
            transform = flat[:, :8] / flat[:, 8:9]
            first = resampling[0][0]
            images = keras.ops.image.affine_transform(
                images, transform, interpolation="bilinear", fill_mode=first.fill_mode,
                fill_value=first.fill_value,
            )
        for layer, transformation in drawn:
            if not isinstance(layer, _RESAMPLING_LAYERS()):
                with _tensorflow_backend(layer):
                    images = layer.transform_images(images, transformation, training=True)
        return images


def _RESAMPLING_LAYERS() -> tuple:  # noqa: N802 (a constant, made on use: Keras imported late)
    from keras import layers

    return (layers.RandomRotation, layers.RandomZoom)


def _resampling_matrix(layer: Any, transformation: dict, height: Any, width: Any) -> Any:
    """The (b, 8) projective matrix of a rotation or zoom transformation drawn by its layer."""
    import tensorflow as tf

    if "rotation_matrix" in transformation:
        return tf.cast(transformation["rotation_matrix"], tf.float32)
    # RandomZoom: scale about the image centre (the layer's own matrix, written out).
    zoom_x = tf.cast(tf.reshape(transformation["width_zoom"], (-1, 1)), tf.float32)
    zoom_y = tf.cast(tf.reshape(transformation["height_zoom"], (-1, 1)), tf.float32)
    offset_x = (tf.cast(width, tf.float32) - 1.0) / 2.0 * (1.0 - zoom_x)
    offset_y = (tf.cast(height, tf.float32) - 1.0) / 2.0 * (1.0 - zoom_y)
    zeros = tf.zeros_like(zoom_x)
    return tf.concat([zoom_x, zeros, offset_x, zeros, zoom_y, offset_y, zeros, zeros], axis=1)


def _as_3x3(transform: Any) -> Any:
    import tensorflow as tf

    ones = tf.ones_like(transform[:, :1])
    return tf.reshape(tf.concat([transform, ones], axis=1), (-1, 3, 3))


@contextlib.contextmanager
def _tensorflow_backend(layer: Any):
    """What a Keras data layer's own ``__call__`` does inside tf.data: compute with TensorFlow."""
    layer.backend.set_backend("tensorflow")
    try:
        yield
    finally:
        layer.backend.reset()


@functools.lru_cache(maxsize=1)
def _batch_seed_class() -> type:
    """``BatchSeed``, made on first use so that importing this module does not import Keras."""
    import keras

    class BatchSeed(keras.random.SeedGenerator):
        """A stand-in seed generator for one batch and one layer: draw k is the stateless seed
        ``(batch_seed, layer_index * 1000 + k)``, so no variable is read or written."""

        def __init__(self, batch_seed, layer_index: int):  # no SeedGenerator state on purpose
            self._batch_seed = batch_seed
            self._next_draw = layer_index * 1000

        def next(self, ordered=True):
            import tensorflow as tf

            draw = self._next_draw
            self._next_draw += 1  # at trace time: each draw of a layer gets its own constant
            return tf.stack([tf.cast(self._batch_seed, tf.int64), tf.constant(draw, tf.int64)])

    return BatchSeed


def _encode_label(label_index: Any, n_classes: int) -> Any:
    import tensorflow as tf

    if n_classes == 2:
        return tf.reshape(tf.cast(label_index, tf.float32), (1,))
    return tf.one_hot(label_index, n_classes, dtype=tf.float32)


# ---------------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------------


def tabular_arrays(layout: Layout, split: str, params: Params) -> tuple[np.ndarray, np.ndarray]:
    """The scaled features and encoded labels of one split.

    Returns:
        ``(x, y)``: float32 ``(n, n_features)`` in the order of preprocess.json ``features``, and
        float32 labels (``(n, 1)`` for two classes, one-hot otherwise).

    Raises:
        MedloopError: the split's table is missing or empty.
    """
    summary = processed_summary(layout)
    name = summary.get("tables", {}).get(split)
    if name is None or not (layout.processed / name).is_file():
        raise MedloopError(f"{layout.processed}: no table for the {split} split; run preprocess first")
    table = pd.read_parquet(layout.processed / name)
    if table.empty:
        raise MedloopError(f"{layout.processed / name}: the {split} split is empty; collect more data")
    x = table[summary["features"]].to_numpy(dtype=np.float32)
    return x, encode_labels(table["label_index"].to_numpy(), len(params.model.classes))


def tabular_dataset(layout: Layout, split: str, params: Params, *, training: bool) -> Any:
    """`tabular_arrays` as a batched ``tf.data.Dataset`` (shuffled, seeded, when training)."""
    import tensorflow as tf

    x, y = tabular_arrays(layout, split, params)
    dataset = tf.data.Dataset.from_tensor_slices((x, y))
    if training:
        dataset = dataset.shuffle(len(x), seed=params.train.seed, reshuffle_each_iteration=True)
    return dataset.batch(params.train.batch_size).prefetch(tf.data.AUTOTUNE)


def split_labels(layout: Layout, split: str) -> np.ndarray:
    """The label indices (into ``model.classes``) of one split, from ``index.parquet``."""
    index = pd.read_parquet(layout.processed / "index.parquet", columns=["label_index", "split"])
    return index.loc[index["split"] == split, "label_index"].to_numpy(dtype=np.int64)


def split_index(layout: Layout, split: str) -> pd.DataFrame:
    """The rows of ``index.parquet`` of one split (what MLflow records as the dataset)."""
    index = pd.read_parquet(layout.processed / "index.parquet")
    return index[index["split"] == split].reset_index(drop=True)


def encode_labels(label_index: np.ndarray, n_classes: int) -> np.ndarray:
    """Label indices as the model's targets: float32 ``(n, 1)`` for two classes, one-hot else."""
    label_index = np.asarray(label_index, dtype=np.int64)
    if n_classes == 2:
        return label_index.astype(np.float32)[:, None]
    return np.eye(n_classes, dtype=np.float32)[label_index]


def class_weights(labels: np.ndarray, n_classes: int) -> dict[int, float]:
    """Balanced class weights (``n / (n_classes_present * count)``, scikit-learn's "balanced")
    from the TRAINING split's label indices; a class absent from training gets 1.0."""
    from sklearn.utils.class_weight import compute_class_weight

    labels = np.asarray(labels, dtype=np.int64)
    present = np.unique(labels)
    weights = compute_class_weight("balanced", classes=present, y=labels)
    chosen = {int(c): 1.0 for c in range(n_classes)}
    chosen.update({int(c): float(w) for c, w in zip(present, weights)})
    return chosen


def input_shape(layout: Layout) -> tuple[int, int, int]:
    """``(height, width, channels)`` of the processed images."""
    image = processed_summary(layout)["image"]
    return int(image["height"]), int(image["width"]), int(image["channels"])


def shard_paths(layout: Layout, split: str) -> list[Path]:
    """The TFRecord shards of one split."""
    return [layout.processed / name for name in processed_summary(layout)["shards"].get(split, [])]
