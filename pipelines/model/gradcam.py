"""Grad-CAM (Selvaraju et al. 2017): where in an image the model found its evidence for a class.

Shared by the evaluate stage (heat maps of frozen-test-set images in ``reports/plots/gradcam/``)
and the prediction service (``POST /predict?explain=gradcam``), so both show the same map for
the same model and pixels. The images are what the Keras model takes: float32
``(n, H, W, C)`` pixels with values 0..255, as preprocess writes them and the served pyfunc
prepares them. TensorFlow, Keras and Matplotlib are imported inside the functions.
"""

from __future__ import annotations

import io

import numpy as np

OVERLAY_WEIGHT = 0.45  # of the heat map's colours over the image


def gradcam(model, images: np.ndarray, class_index: np.ndarray, n_classes: int) -> np.ndarray | None:
    """Grad-CAM of the last Conv2D layer for each image's target class.

    Args:
        model: a Keras image model built by `pipelines.model.architectures` (or any chain of layers).
        images: float32 ``(n, H, W, C)``, the model's input.
        class_index: ``(n,)`` the class to explain for each image.
        n_classes: the number of classes (a binary model has one sigmoid output).

    Returns:
        (n, H, W) heat maps in [0, 1] at the input's size, or None without a Conv2D layer.
    """
    import tensorflow as tf

    path = last_conv_path(model)
    if path is None:
        return None
    x = tf.convert_to_tensor(images, dtype=tf.float32)
    with tf.GradientTape() as tape:
        conv_output, output = _forward_capturing(model, path, x)
        output = tf.cast(output, tf.float32)
        if output.shape[-1] == 1 and n_classes == 2:
            p = output[:, 0]
            target = tf.where(tf.constant(class_index) == 1, p, 1.0 - p)
        else:
            target = tf.gather(output, tf.constant(class_index), axis=1, batch_dims=1)
        total = tf.reduce_sum(target)
    gradients = tape.gradient(total, conv_output)
    if gradients is None:  # the conv output is not on the path to the output (a branch)
        return None
    gradients = tf.cast(gradients, tf.float32)
    conv_output = tf.cast(conv_output, tf.float32)
    weights = tf.reduce_mean(gradients, axis=(1, 2), keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(weights * conv_output, axis=-1))[..., None]
    cam = tf.image.resize(cam, images.shape[1:3], method="bilinear")[..., 0].numpy()
    peak = cam.reshape(len(cam), -1).max(axis=1).reshape(-1, 1, 1)
    return np.where(peak > 0, cam / np.where(peak > 0, peak, 1.0), 0.0)


def overlay(image: np.ndarray, cam: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The image as the model saw it, and the heat map laid over it (jet colours).

    Args:
        image: ``(H, W, C)`` pixels 0..255 (one or three channels).
        cam: ``(H, W)`` heat map in [0, 1] (`gradcam`).

    Returns:
        (image, overlay), both RGB float ``(H, W, 3)`` in [0, 1].
    """
    from matplotlib import colormaps

    rgb = np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image[..., :3]
    rgb = np.clip(rgb / 255.0, 0.0, 1.0)
    blended = (1.0 - OVERLAY_WEIGHT) * rgb + OVERLAY_WEIGHT * colormaps["jet"](cam)[..., :3]
    return rgb, np.clip(blended, 0.0, 1.0)


def overlay_png(image: np.ndarray, cam: np.ndarray) -> bytes:
    """`overlay` as PNG bytes, at the model's input size."""
    from PIL import Image

    _, blended = overlay(image, cam)
    buffer = io.BytesIO()
    Image.fromarray(np.round(blended * 255.0).astype(np.uint8), mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def last_conv_path(model) -> list | None:
    """The last Conv2D layer, walking ``model.layers`` (and nested models) in order, as the path
    of layers leading to it (``[conv]`` when it is a top-level layer).

    For medloop's own architectures the layer named by `pipelines.model.architectures.GRADCAM_LAYERS` is
    used instead: the last feature map after its batch norm and activation, the usual target.
    """
    import keras

    from pipelines.model.architectures import GRADCAM_LAYERS

    designed = GRADCAM_LAYERS.get(getattr(model, "name", ""))
    if designed and designed in {layer.name for layer in model.layers}:
        return [model.get_layer(designed)]
    found = None
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            found = [layer]
        elif hasattr(layer, "layers"):
            inner = last_conv_path(layer)
            if inner is not None:
                found = [layer, *inner]
    return found


def _forward_capturing(model, path: list, x):
    """(output of path[-1], model output), differentiable inside a GradientTape.

    A functional model with the conv layer at its top level: a functional sub-model from the
    model's inputs to both outputs. A Sequential model, or a conv inside a nested block: the
    top-level layers are applied one after the other (the model must be a chain, as Sequential
    stacks and the reference CNNs are), recursing into the block. (A Sequential model loaded
    from a file has layer outputs from an earlier trace, so no sub-model can be cut from it.)
    """
    import keras

    if len(path) == 1 and not isinstance(model, keras.Sequential):
        inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
        sub_model = keras.Model(inputs, [path[0].output, model.outputs[0]])
        return sub_model(x, training=False)
    captured, h = None, x
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        if layer is path[0] and len(path) == 1:
            captured = h = layer(h, training=False)
        elif layer is path[0]:
            captured, h = _forward_capturing(layer, path[1:], h)
        else:
            h = layer(h, training=False)
    return captured, h
