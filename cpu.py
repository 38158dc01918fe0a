"""What this CPU multiplies fast, and the process-wide setting that puts it to work.

Some CPUs (Intel's with AMX or AVX512-BF16) multiply bfloat16 numbers in hardware, several
times faster than float32. TensorFlow uses them in two ways:

* a Keras dtype policy: the PixelCNNs train as bfloat16 twins of themselves
  (`train.prior_twin`, `--pcnn-precision`);
* oneDNN's bfloat16 math mode (`--cpu-math`, this module): a float32 model stays float32
  (weights, activations, losses, statistics), but each convolution and matrix product rounds
  its float32 inputs to bfloat16 as it reads them and sums the products in float32. The
  VQ-VAE trains about 9% faster this way at the same reconstructions (README, "oneDNN's
  bfloat16 math mode"), where the bfloat16 dtype policy cost it as much as it gained.

The math mode is an environment variable TensorFlow reads once per process, when it builds its
first oneDNN kernel, and then applies to every convolution and matrix product in that process.
So `use_cpu_math` must run before the process's first convolution (the driver calls it before
it imports TensorFlow), and only in a process of its own: the driver's command line, never a
test session or a notebook that imported the package. It is not the default: in that mode the
PixelCNNs' cached sampler agrees with a full pass of the network only to bfloat16's precision
(logits within 1e-2 instead of 1e-5), so the samples a run draws at its end are no longer
the very ones `driver.py sample` (plain float32) draws with the same seed.
"""

import os

MATH_MODE = "TF_SET_ONEDNN_FPMATH_MODE"  # oneDNN's "fpmath mode", as TensorFlow exposes it
CPU_MATHS = ("float32", "bfloat16")


def native_bfloat16():
    """The CPU flag that says this CPU multiplies bfloat16 in hardware (AMX or AVX512-BF16,
    which oneDNN uses), or None (elsewhere bfloat16 is emulated, and slower than float32)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), [])
    except OSError:  # not Linux
        return None
    return next((flag for flag in ("amx_bf16", "avx512_bf16") if flag in flags), None)


def use_cpu_math(setting):
    """Set oneDNN's math mode for this process from `--cpu-math` and return what its
    convolutions and matrix products will multiply in, 'bfloat16' or 'float32':

    * 'bfloat16': the bfloat16 math mode (on a CPU without native bfloat16, oneDNN emulates
      it: slower, and no more exact);
    * 'float32': plain float32, even if the environment asked TensorFlow for the math mode.
    """
    if setting not in CPU_MATHS:
        raise ValueError(f"--cpu-math must be one of {', '.join(CPU_MATHS)}, got {setting!r}")
    if setting == "bfloat16":
        os.environ[MATH_MODE] = "BF16"
    else:
        os.environ.pop(MATH_MODE, None)
    return current_math()


def current_math():
    """What this process's convolutions and matrix products multiply in, by its environment
    ('bfloat16' or 'float32'; TensorFlow reads it at its first oneDNN kernel)."""
    return "bfloat16" if os.environ.get(MATH_MODE, "").upper() == "BF16" else "float32"
