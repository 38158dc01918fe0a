"""How close does VQ-VAE training come to what this CPU can do?

    python benchmarks/throughput.py [--size 256] [--batch-size 8] [--steps 30] [--set norm=group ...] [--json out.json]

Prints, all measured in this one process (so on the same machine, at the same moment):

1. training images/s of the default VQ-VAE (`driver.Config` defaults) at SIZE x SIZE: its
   compiled training step on an in-memory batch, timed over --steps steps after a warm-up;
2. FLOPs per image of one training step (forward, backward and the optimizer), counted by
   TensorFlow's profiler on the traced step's graph (not estimated), and of a forward pass;
3. the machine's measured peak for the same kind of work: a large float32 `tf.matmul` and a
   large 3x3 `tf.nn.conv2d` (the VQ-VAE is mostly 3x3 convolutions), best of several runs,
   in the training step's math mode (plain float32 by default; `--set cpu_math=bfloat16` for
   oneDNN's bfloat16 math mode, see cpu.py);
4. the ratio: achieved FLOP/s (images/s x FLOPs per image) over each peak;
5. where a step's time goes: each part of the step timed on its own (encoder, quantizer and
   decoder forward; forward and backward, and the loss's SSIM term within it; the optimizer
   update; the metrics computed beside the loss).
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import cpu  # noqa: E402
import driver  # noqa: E402
import table  # noqa: E402
import train  # noqa: E402
import vqvae  # noqa: E402


def best_seconds(function, repeats=5, warmup=2):
    """The fastest of `repeats` timed calls of `function` (after `warmup` untimed ones)."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def counted_flops(function, *specs):
    """Floating-point operations of one call of a tf.function, counted by TensorFlow's
    profiler over its traced graph (multiply-adds count as 2)."""
    from tensorflow.python.profiler import model_analyzer, option_builder

    graph = function.get_concrete_function(*specs).graph
    options = option_builder.ProfileOptionBuilder(option_builder.ProfileOptionBuilder.float_operation())
    options = options.with_empty_output().build()
    return model_analyzer.profile(graph, options=options).total_float_ops


def matmul_peak(n=2048):
    """FLOP/s of an n x n float32 matrix product (2 n^3 operations)."""
    a, b = tf.random.normal((n, n)), tf.random.normal((n, n))
    product = tf.function(lambda: tf.matmul(a, b))
    return 2 * n ** 3 / best_seconds(lambda: product().numpy())


def conv_peak(batch=8, size=128, channels=64):
    """FLOP/s of a 3x3, stride-1 float32 convolution of `channels` to `channels` over
    batch x size x size (2 x 9 x C_in x C_out operations per output pixel)."""
    images = tf.random.normal((batch, size, size, channels))
    kernel = tf.random.normal((3, 3, channels, channels))
    conv = tf.function(lambda: tf.nn.conv2d(images, kernel, 1, "SAME"))
    return 2 * 9 * channels * channels * batch * size * size / best_seconds(lambda: conv().numpy())


def training_images_per_second(model, batch, steps):
    """Images/s of the model's training step (forward, backward, optimizer, metrics) on
    one in-memory batch, compiled as `model.fit` compiles it, timed over `steps` steps
    after a warm-up (the input pipeline is benchmarks/pipeline.py's subject)."""
    model.optimizer.build(model.trainable_variables)
    step = tf.function(model.train_step)
    for _ in range(3):
        step(batch)
    start = time.perf_counter()
    for _ in range(steps):
        results = step(batch)
    float(results["loss"])  # wait for the last step
    return steps * len(batch) / (time.perf_counter() - start)


def step_parts(model, batch):
    """Seconds of each part of a training step, each timed on its own as a tf.function."""
    latents = model.encoder(batch)
    quantized, indices = model.quantizer.quantize_inputs(latents)
    reconstructions = model.decoder(quantized)

    def forward_backward():
        with tf.GradientTape() as tape:
            reconstructions, indices, reconstruction_loss, vq_loss, _ = model._step(batch, training=True)
            loss = reconstruction_loss + vq_loss
        return tape.gradient(loss, model.trainable_variables)

    def ssim_term():  # the loss's SSIM term and its gradient, part of "forward + backward"
        with tf.GradientTape() as tape:
            tape.watch(reconstructions)
            term, _ = vqvae.ssim_loss_and_score(batch, reconstructions, model.shift)
        return term, tape.gradient(term, reconstructions)

    gradients = tf.function(forward_backward)()
    parts = {
        "encoder forward": lambda: model.encoder(batch, training=True),
        "quantizer forward": lambda: model.quantizer.quantize_inputs(latents, training=False),
        "decoder forward": lambda: model.decoder(quantized, training=True),
        "forward + backward": forward_backward,
        **({"of which the SSIM loss term": ssim_term} if model.ssim_weight else {}),
        "optimizer update": lambda: model.optimizer.apply_gradients(zip(gradients, model.trainable_variables)),
        # With the SSIM loss term the SSIM metric is read off its map, so only PSNR is extra.
        ("PSNR metric" if model.ssim_weight else "SSIM + PSNR metrics"): lambda: (
            vqvae.image_psnr(batch, reconstructions, model.shift),
            *([] if model.ssim_weight else [vqvae.mean_ssim(batch, reconstructions, model.shift)])),
    }
    seconds = {}
    for name, part in parts.items():
        compiled = tf.function(part)
        seconds[name] = best_seconds(lambda: tf.nest.map_structure(lambda t: t.numpy(), compiled()))
    return seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256, help="slice side in pixels")
    parser.add_argument("--batch-size", type=int, default=driver.Config.batch_size, help="slices per step")
    parser.add_argument("--steps", type=int, default=30, help="timed training steps")
    parser.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE",
                        help="change driver.Config settings, e.g. norm=group ssim_weight=0.5")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    import dataclasses
    import json

    changes = dict(item.split("=", 1) for item in args.set)
    config = dataclasses.replace(driver.Config(), **{key: value if key in ("norm", "cpu_math") else json.loads(value)
                                                    for key, value in changes.items()})
    # Before the first convolution: TensorFlow reads the math mode when it builds its first oneDNN kernel.
    math = cpu.use_cpu_math(config.cpu_math)
    model = train.build_vqvae(config)
    rng = np.random.default_rng(0)
    images = (rng.uniform(0, 1, (64, args.size, args.size, 1)) + config.shift).astype(np.float32)
    batch = tf.constant(images[: args.batch_size])
    print(f"VQ-VAE (K {config.K}, D {config.D}, filters {list(config.filters)}, {config.res_blocks} residual "
          f"blocks, {changes or 'default settings'}) at {args.size}x{args.size}, batch {args.batch_size}, "
          f"convolutions and matrix products in {math}; TensorFlow threads: intra "
          f"{tf.config.threading.get_intra_op_parallelism_threads() or 'default'}, inter "
          f"{tf.config.threading.get_inter_op_parallelism_threads() or 'default'}; {os.cpu_count()} CPUs", flush=True)

    per_second = training_images_per_second(model, batch, args.steps)
    spec = tf.TensorSpec((args.batch_size, args.size, args.size, 1), tf.float32)
    step_flops = counted_flops(tf.function(model.train_step), spec) / args.batch_size
    forward_flops = counted_flops(tf.function(lambda x: model(x, training=False)), spec) / args.batch_size
    peaks = {"matmul 2048x2048": matmul_peak(), "conv2d 3x3, 64->64, 8x128x128": conv_peak()}
    achieved = per_second * step_flops

    print(f"\ntraining: {per_second:.1f} images/s; {step_flops / 1e9:.2f} GFLOPs per image per training step "
          f"({forward_flops / 1e9:.2f} forward); achieved {achieved / 1e9:.1f} GFLOP/s", flush=True)
    rows = [[name, peak / 1e9, achieved / peak] for name, peak in peaks.items()]
    table.print_table([("machine peak, measured", 34, "{}"), ("GFLOP/s", 9, "{:.1f}"),
                       ("training share", 14, "{:.1%}")], rows)

    parts = step_parts(model, batch)
    step = args.batch_size / per_second
    print(f"\nwhere a step's time goes (each part timed on its own; a whole step takes {step * 1000:.0f} ms):")
    table.print_table([("part", 28, "{}"), ("ms", 8, "{:.1f}"), ("of a step", 10, "{:.0%}")],
                      [[name, seconds * 1000, seconds / step] for name, seconds in parts.items()])
    table.save(args.json, {"settings": changes, "size": args.size, "batch_size": args.batch_size, "images_per_second": per_second,
                           "train_step_flops_per_image": step_flops, "forward_flops_per_image": forward_flops,
                           "peak_flops": peaks, "achieved_flops": achieved,
                           "share_of_peak": {name: achieved / peak for name, peak in peaks.items()},
                           "step_seconds": step, "part_seconds": parts})


if __name__ == "__main__":
    main()
