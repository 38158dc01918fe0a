"""The callbacks of the training stages: what runs at each epoch besides the fit itself.

`train.py` puts them together (`fit_resumably` adds Keras' own: TensorBoard,
ModelCheckpoint, CSVLogger, TerminateOnNaN, BackupAndRestore).
"""

import os
import time

import keras
import numpy as np
import tensorflow as tf

import pixelcnn
import plots


class ValidationMetrics(keras.callbacks.Callback):
    """After each epoch, score the model on the whole validation split with `test_step`
    (tf.image.ssim per slice, averaged over every slice) and add the results to the epoch's
    logs as `val_*`, so `ModelCheckpoint(monitor="val_ssim")` can keep the best model."""

    def __init__(self, validation_data, verbose=1):
        super().__init__()
        self.validation_data = validation_data
        self.verbose = verbose

    def on_epoch_end(self, epoch, logs=None):
        results = self.model.evaluate(self.validation_data, verbose=0, return_dict=True)
        if logs is not None:
            logs.update({f"val_{name}": float(value) for name, value in results.items()})
        if self.verbose:
            print(f"epoch {epoch + 1}: val_ssim {results['ssim']:.4f}  val_psnr {results['psnr']:.2f} dB  "
                  f"val_perplexity {results['perplexity']:.1f}  val_codebook_usage {results['codebook_usage']:.1%}",
                  flush=True)


class TimeLimit(keras.callbacks.Callback):
    """Stop training when another epoch as long as the last one would overrun `minutes`
    (0 = no limit)."""

    def __init__(self, minutes):
        super().__init__()
        self.minutes = minutes

    def on_train_begin(self, logs=None):
        self.start = self.epoch_start = time.time()

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_start = time.time()

    def on_epoch_end(self, epoch, logs=None):
        now = time.time()
        if self.minutes and now - self.start + (now - self.epoch_start) > self.minutes * 60:
            print(f"time limit: another epoch would pass {self.minutes} minutes; stopping after epoch {epoch + 1}",
                  flush=True)
            self.model.stop_training = True


class CosineLearningRate(keras.callbacks.Callback):
    """Decay the learning rate from `base` to `floor * base` along a half cosine over the
    run's budget: `epochs`, or `minutes` of wall time when that comes first, so a run cut
    short by a time limit still ends with a small learning rate."""

    def __init__(self, base, epochs, minutes=0.0, floor=0.05):
        super().__init__()
        self.base, self.epochs, self.minutes, self.floor = base, epochs, minutes, floor

    def on_train_begin(self, logs=None):
        self.start = time.time()

    def on_epoch_begin(self, epoch, logs=None):
        progress = epoch / self.epochs
        if self.minutes:
            progress = max(progress, (time.time() - self.start) / (self.minutes * 60))
        scale = self.floor + (1 - self.floor) * 0.5 * (1 + np.cos(np.pi * min(progress, 1.0)))
        self.model.optimizer.learning_rate.assign(self.base * scale)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["learning_rate"] = float(self.model.optimizer.learning_rate.numpy())


class ReconstructionImages(keras.callbacks.Callback):
    """Every `every` epochs (0: never), show TensorBoard fixed slices beside their reconstructions."""

    def __init__(self, images, log_dir, shift, every=1):
        super().__init__()
        self.images, self.shift, self.every = images, shift, every
        self.writer = tf.summary.create_file_writer(log_dir)

    def on_epoch_end(self, epoch, logs=None):
        if self.every and (epoch + 1) % self.every == 0:
            reconstructions = self.model.reconstruct_images(self.images - self.shift)
            pairs = np.concatenate([np.clip(self.images - self.shift, 0, 1), reconstructions], axis=2)
            with self.writer.as_default():
                tf.summary.image("validation slices | reconstructions", pairs, step=epoch, max_outputs=len(pairs))
            self.writer.flush()


class BitsPerCode(keras.callbacks.Callback):
    """Add the prior's bits per code to the logs, print them and plot the whole history."""

    def __init__(self, history, path, title, log2_k):
        super().__init__()
        self.history, self.path, self.title, self.log2_k = history, path, title, log2_k

    def on_epoch_end(self, epoch, logs=None):
        logs["bits_per_code"] = pixelcnn.bits_per_code(logs["loss"])
        logs["val_bits_per_code"] = pixelcnn.bits_per_code(logs["val_loss"])
        for key, value in logs.items():
            self.history.setdefault(key, []).append(float(value))
        print(f"prior epoch {epoch + 1}: val bits per code {logs['val_bits_per_code']:.3f} "
              f"(log2 K = {self.log2_k:.2f})", flush=True)
        plots.plot_losses(self.history, self.path, keys=("bits_per_code", "val_bits_per_code"), title=self.title)


class PublishCheckpoint(keras.callbacks.Callback):
    """Move a checkpoint ModelCheckpoint has just written to `partial` over `final` in one
    step, so a kill mid-save never leaves a half-written model."""

    def __init__(self, partial, final):
        super().__init__()
        self.partial, self.final = partial, final

    def on_epoch_end(self, epoch, logs=None):
        if os.path.exists(self.partial):
            os.replace(self.partial, self.final)
