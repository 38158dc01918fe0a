"""Evaluate a trained run like a paper, on the whole test split, and write an HTML report.

    python driver.py evaluate --run RUN_DIR [--data DIR] [--samples 16]

(`evaluate_run` takes loaded models and datasets; `driver.py` does the loading.)

1. Reconstruction: SSIM per slice (mean, std, min, histogram), PSNR and MS-SSIM, and the
   worst reconstructions. `tf.image.ssim_multiscale` needs the coarsest of its 5 scales to
   hold an 11-pixel filter (176 pixels a side), so `ms_ssim_settings` drops scales for
   smaller images and renormalises the remaining weights; the settings used are recorded.
2. Codebook: code counts over the whole split, codes used, dead codes, perplexity.
3. Prior: test bits per code.
4. Samples, against real slices (FID needs a downloaded network; these need nothing):
   * nearest-neighbour SSIM of each sample against the train split, next to the same for
     real test slices: far above the real figure means memorised training slices, far below
     means unrealistic ones;
   * mean pairwise SSIM among samples, next to the same among real slices (diversity);
   * the Jensen-Shannon divergence (bits) between the code histograms of the samples and
     of the real test slices.
5. `metrics.json` (merged into the run's) and `report.html`, one self-contained page with
   every figure embedded, which opens offline.

This is its own module because none of the model files should know about reports, and
the metrics here serve every model the run holds.
"""

import base64
import html
import json
import math
import os
import time

import numpy as np
import tensorflow as tf

# tf.image.ssim's definition: an 11-tap Gaussian window of sigma 1.5, K1 = 0.01, K2 = 0.03.
SSIM_FILTER_SIZE, SSIM_FILTER_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03
MS_SSIM_POWER_FACTORS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # tf.image.ssim_multiscale's default


# ---------------------------------------------------------------------------
# Image similarity


def ms_ssim_settings(height, width, filter_size=SSIM_FILTER_SIZE, power_factors=MS_SSIM_POWER_FACTORS):
    """The scales and filter size with which `tf.image.ssim_multiscale` fits an image.

    Each scale halves the image (rounding up) and the coarsest must still hold the filter.
    Scales are dropped from the coarse end and the remaining weights renormalised to sum
    to 1; only if even one scale is too small does the filter shrink."""
    smallest = min(height, width)
    scales = len(power_factors)
    while scales > 1 and math.ceil(smallest / 2 ** (scales - 1)) < filter_size:
        scales -= 1
    filter_size = min(filter_size, smallest)
    weights = np.asarray(power_factors[:scales], np.float64)
    return {"scales": scales, "filter_size": int(filter_size),
            "power_factors": [float(w) for w in weights / weights.sum()]}


def ms_ssim(images, others, settings):
    """Per-image MS-SSIM of two (B, H, W, 1) batches in [0, 1]."""
    return tf.image.ssim_multiscale(images, others, max_val=1.0, power_factors=settings["power_factors"],
                                    filter_size=settings["filter_size"])


def _gaussian_window(size=SSIM_FILTER_SIZE, sigma=SSIM_FILTER_SIGMA):
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    window = np.exp(-0.5 * x**2 / sigma**2)
    return (window / window.sum()).astype(np.float32)


def _local_mean(x, window):
    """Gaussian-weighted local means of (1, H, W, C) maps, 'valid' padding, per channel.

    tf.image.ssim filters with the same (separable) Gaussian, as one 11x11 kernel."""
    channels = tf.shape(x)[-1]
    rows = tf.tile(window[:, None, None, None], [1, 1, channels, 1])
    columns = tf.tile(window[None, :, None, None], [1, 1, channels, 1])
    x = tf.nn.depthwise_conv2d(x, rows, [1, 1, 1, 1], "VALID")
    return tf.nn.depthwise_conv2d(x, columns, [1, 1, 1, 1], "VALID")


@tf.function(reduce_retracing=True)
def _ssim_against(query, references, window):
    """SSIM of one (H, W) image in [0, 1] against each of (H, W, R) references.

    The references sit on the channel axis, where the depthwise filters run far faster on
    CPU than over a batch of one-channel images; the formula is tf.image.ssim's."""
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    x = query[None, :, :, None]
    y = references[None]
    mu_x, mu_y = _local_mean(x, window), _local_mean(y, window)
    xx, yy = _local_mean(x * x, window), _local_mean(y * y, window)
    xy = _local_mean(x * y, window)
    luminance = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
    contrast_structure = (2 * (xy - mu_x * mu_y) + c2) / (xx - mu_x**2 + yy - mu_y**2 + c2)
    return tf.reduce_mean(luminance * contrast_structure, axis=(0, 1, 2))


def pairwise_ssim(queries, references, chunk=256):
    """(Q, R) SSIM of every query against every reference; both (N, H, W[, 1]) in [0, 1].

    Equal to tf.image.ssim on each pair (to float rounding), at a fraction of the cost of
    calling it pair by pair."""
    queries = np.asarray(queries, np.float32).reshape(len(queries), *np.shape(queries)[1:3])
    references = np.asarray(references, np.float32).reshape(len(references), *np.shape(references)[1:3])
    if queries.shape[1:] != references.shape[1:]:
        raise ValueError(f"image sizes differ: {queries.shape[1:]} and {references.shape[1:]}")
    window = tf.constant(_gaussian_window(min(SSIM_FILTER_SIZE, *queries.shape[1:])))
    scores = np.zeros((len(queries), len(references)), np.float32)
    for start in range(0, len(references), chunk):
        block = tf.constant(np.transpose(references[start: start + chunk], (1, 2, 0)))
        for q, query in enumerate(queries):
            scores[q, start: start + block.shape[-1]] = _ssim_against(tf.constant(query), block, window).numpy()
    return scores


def nearest_neighbours(queries, references):
    """For each query, the highest SSIM against any reference, and that reference.

    `references` is an iterable of (N, H, W[, 1]) batches (a whole split streams through
    without being held in memory). Returns (best SSIM, index of the best reference,
    the best references as (Q, H, W))."""
    best = np.full(len(queries), -np.inf, np.float32)
    index = np.zeros(len(queries), np.int64)
    images = np.zeros(np.shape(queries)[:3], np.float32)
    seen = 0
    for batch in references:
        batch = np.asarray(batch, np.float32).reshape(len(batch), *np.shape(batch)[1:3])
        scores = pairwise_ssim(queries, batch)
        better = scores.max(axis=1) > best
        best = np.where(better, scores.max(axis=1), best)
        index = np.where(better, seen + scores.argmax(axis=1), index)
        images[better] = batch[scores.argmax(axis=1)[better]]
        seen += len(batch)
    return best, index, images


def mean_pairwise_ssim(images):
    """Mean SSIM over all pairs of different images: high means alike (low diversity)."""
    if len(images) < 2:
        return float("nan")
    scores = pairwise_ssim(images, images)
    return float(scores[~np.eye(len(images), dtype=bool)].mean())


# ---------------------------------------------------------------------------
# Codebook and code statistics


def code_counts(indices, num_embeddings):
    return np.bincount(np.asarray(indices).ravel(), minlength=num_embeddings)[:num_embeddings]


def codebook_statistics(counts):
    """Codes used, dead codes and perplexity (exp of the entropy of code use) from counts."""
    counts = np.asarray(counts, np.float64)
    p = counts / max(counts.sum(), 1.0)
    entropy = -np.sum(p[p > 0] * np.log(p[p > 0]))
    used = int(np.count_nonzero(counts))
    return {"codes_used": used, "dead_codes": int(counts.size - used), "codebook_usage": used / counts.size,
            "perplexity": float(np.exp(entropy))}


def js_divergence(counts_p, counts_q):
    """Jensen-Shannon divergence in bits (0 = same distribution, 1 = disjoint) of two histograms."""
    p = np.asarray(counts_p, np.float64)
    q = np.asarray(counts_q, np.float64)
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl(a, b):
        keep = a > 0
        return np.sum(a[keep] * np.log2(a[keep] / b[keep]))

    return float(0.5 * kl(p, m) + 0.5 * kl(q, m))


# ---------------------------------------------------------------------------
# Scoring a run


def score_reconstructions(model, dataset, ms_settings, worst=5):
    """Per-slice SSIM, PSNR and MS-SSIM over a split, its (N, h, w) code grids, and the
    `worst` slices by SSIM with their reconstructions (all images in [0, 1])."""
    import vqvae

    ssims, psnrs, ms_ssims, grids = [], [], [], []
    kept = []  # (ssim, original, reconstruction), at most `worst`
    for images in dataset:
        reconstructions, indices = model.reconstruct(images)
        originals = images - model.shift
        clipped = tf.clip_by_value(reconstructions - model.shift, 0.0, 1.0)
        batch_ssim = vqvae.image_ssim(images, reconstructions, model.shift).numpy()
        ssims.append(batch_ssim)
        psnrs.append(vqvae.image_psnr(images, reconstructions, model.shift).numpy())
        ms_ssims.append(ms_ssim(originals, clipped, ms_settings).numpy())
        grids.append(indices.numpy())
        kept += [(s, o, r) for s, o, r in zip(batch_ssim, originals.numpy(), clipped.numpy())]
        kept = sorted(kept, key=lambda item: item[0])[:worst]
    return np.concatenate(ssims), np.concatenate(psnrs), np.concatenate(ms_ssims), np.concatenate(grids), kept


def split_images(dataset, shift):
    """Every slice of a batched split as one (N, H, W) numpy array in [0, 1]."""
    return np.concatenate([images.numpy()[..., 0] - shift for images in dataset])


def evaluate_run(run_dir, model, splits, prior=None, samples=16, temperature=1.0, seed=0, cmap="gray",
                 data_name=""):
    """Score a trained VQ-VAE (and its prior, if given) on `splits["test"]`, merge the
    metrics into RUN/metrics.json and write RUN/report.html. Figures go to RUN/evaluation/."""
    import keras

    import pixelcnn
    import plots

    out = os.path.join(run_dir, "evaluation")
    os.makedirs(out, exist_ok=True)
    image_size = next(iter(splits["test"])).shape[1:3]
    metrics, figures = {"evaluated_data": data_name}, {}
    start = time.time()
    print("scoring reconstructions of the whole test split", flush=True)
    ms_settings = ms_ssim_settings(*image_size)
    ssims, psnrs, ms_ssims, test_grids, worst = score_reconstructions(model, splits["test"], ms_settings)
    counts = code_counts(test_grids, model.num_embeddings)
    metrics.update({
        "test_slices": int(ssims.size), "test_ssim_mean": float(ssims.mean()), "test_ssim_std": float(ssims.std()),
        "test_ssim_min": float(ssims.min()), "test_psnr_mean": float(psnrs[np.isfinite(psnrs)].mean()),
        "test_ms_ssim_mean": float(ms_ssims.mean()), "test_ms_ssim_min": float(ms_ssims.min()),
        "ms_ssim_settings": ms_settings,
    })
    test_codes = codebook_statistics(counts)
    metrics.update({f"test_{key}": value for key, value in test_codes.items()})
    figures["ssim_histogram"] = plots.histogram(
        ssims, os.path.join(out, "ssim_histogram.png"), "SSIM per test slice",
        f"test SSIM: mean {ssims.mean():.3f}, min {ssims.min():.3f} over {ssims.size} slices")
    figures["worst"] = os.path.join(out, "worst_reconstructions.png")
    plots.image_grid([[o for _, o, _ in worst], [r for _, _, r in worst]], figures["worst"],
                     ["original", "reconstruction"], cmap=cmap,
                     title="the worst test reconstructions, SSIM " + ", ".join(f"{s:.3f}" for s, _, _ in worst))
    figures["codebook"] = plots.codebook_usage(
        counts, os.path.join(out, "codebook_usage.png"),
        f"test split: {test_codes['codes_used']} of {counts.size} codes used, perplexity {test_codes['perplexity']:.1f}")

    if prior is not None:
        print("prior: bits per code on the test split's codes", flush=True)
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        losses = [float(loss(grids, prior(grids))) * len(grids)
                  for grids in np.array_split(test_grids, max(1, len(test_grids) // 32))]
        metrics["prior_test_bits_per_code"] = float(pixelcnn.bits_per_code(sum(losses) / len(test_grids)))
        metrics["log2_K"] = float(np.log2(model.num_embeddings))

    if prior is not None and samples:
        height, width = test_grids.shape[1:]
        print(f"sampling {samples} slices and comparing them with real ones", flush=True)
        sampler = pixelcnn.Sampler(prior, samples, height, width)
        sample_codes = sampler.sample(temperature, seed).numpy()
        generated = np.clip(model.decode(sample_codes).numpy()[..., 0] - model.shift, 0, 1)
        test = split_images(splits["test"], model.shift)
        real = test[np.linspace(0, len(test) - 1, min(samples, len(test))).astype(int)]
        train_batches = (images.numpy() - model.shift for images in splits["train"].rebatch(256))
        nearest, _, nearest_images = nearest_neighbours(np.concatenate([generated, real]), train_batches)
        sample_nn, real_nn = nearest[: len(generated)], nearest[len(generated):]
        metrics.update({
            "samples": int(samples), "sample_temperature": float(temperature),
            "samples_nn_ssim_mean": float(sample_nn.mean()), "samples_nn_ssim_max": float(sample_nn.max()),
            "real_nn_ssim_mean": float(real_nn.mean()), "real_nn_ssim_max": float(real_nn.max()),
            "samples_pairwise_ssim": mean_pairwise_ssim(generated), "real_pairwise_ssim": mean_pairwise_ssim(real),
            "code_histogram_js_bits": js_divergence(code_counts(sample_codes, model.num_embeddings), counts),
        })
        figures["samples"] = os.path.join(out, "samples_nearest.png")
        order = np.argsort(-sample_nn)[:8]
        plots.image_grid([generated[order], nearest_images[order]], figures["samples"],
                         ["sample", "nearest train"], cmap=cmap,
                         title="samples over their nearest training slices, SSIM "
                               + ", ".join(f"{s:.2f}" for s in sample_nn[order]))
    metrics["evaluation_seconds"] = round(time.time() - start, 1)

    metrics_path = os.path.join(run_dir, "metrics.json")
    merged = {}
    if os.path.exists(metrics_path):
        with open(metrics_path) as f:
            merged = json.load(f)
    if not figures.get("samples"):  # no samples this time: drop an earlier evaluation's sample scores
        merged = {key: value for key, value in merged.items() if key not in SAMPLE_KEYS}
    merged.update(metrics)
    plots.write_json(metrics_path, merged)
    report = write_report(run_dir, merged, figures)
    print(f"wrote {metrics_path} and {report} in {metrics['evaluation_seconds']:.0f} s", flush=True)
    return merged, report


SAMPLE_KEYS = ("samples", "sample_temperature", "samples_nn_ssim_mean", "samples_nn_ssim_max", "real_nn_ssim_mean",
               "real_nn_ssim_max", "samples_pairwise_ssim", "real_pairwise_ssim", "code_histogram_js_bits")


# ---------------------------------------------------------------------------
# The report


METRIC_ROWS = [
    ("Reconstruction (test split)", [
        ("test_slices", "slices", "{:d}"), ("test_ssim_mean", "SSIM mean", "{:.4f}"),
        ("test_ssim_std", "SSIM std", "{:.4f}"), ("test_ssim_min", "SSIM min", "{:.4f}"),
        ("test_psnr_mean", "PSNR mean (dB)", "{:.2f}"), ("test_ms_ssim_mean", "MS-SSIM mean", "{:.4f}"),
        ("test_ms_ssim_min", "MS-SSIM min", "{:.4f}"), ("ms_ssim_settings", "MS-SSIM settings", "ms_ssim"),
    ]),
    ("Codebook (test split)", [
        ("test_codes_used", "codes used", "{:d}"), ("test_dead_codes", "dead codes", "{:d}"),
        ("test_codebook_usage", "usage", "{:.1%}"), ("test_perplexity", "perplexity", "{:.1f}"),
    ]),
    ("Prior", [
        ("prior_variant", "variant", "{}"), ("prior_parameters", "parameters", "{:,}"),
        ("prior_test_bits_per_code", "test bits per code", "{:.3f}"), ("log2_K", "log2 K", "{:.2f}"),
    ]),
    ("Samples against real slices", [
        ("samples", "samples", "{:d}"), ("sample_temperature", "temperature", "{:g}"),
        ("samples_nn_ssim_mean", "nearest-train SSIM of samples (mean)", "{:.4f}"),
        ("real_nn_ssim_mean", "nearest-train SSIM of real test slices (mean)", "{:.4f}"),
        ("samples_nn_ssim_max", "nearest-train SSIM of samples (max)", "{:.4f}"),
        ("real_nn_ssim_max", "nearest-train SSIM of real test slices (max)", "{:.4f}"),
        ("samples_pairwise_ssim", "pairwise SSIM among samples", "{:.4f}"),
        ("real_pairwise_ssim", "pairwise SSIM among real slices", "{:.4f}"),
        ("code_histogram_js_bits", "code histogram JS divergence (bits)", "{:.4f}"),
    ]),
    ("Training", [
        ("val_ssim_best", "best validation SSIM", "{:.4f}"), ("best_epoch", "best epoch", "{:d}"),
        ("epochs_run", "epochs run", "{:d}"), ("vqvae_train_seconds", "VQ-VAE training (s)", "{:.0f}"),
        ("prior_train_seconds", "prior training (s)", "{:.0f}"), ("evaluation_seconds", "evaluation (s)", "{:.0f}"),
    ]),
]


def _format(value, pattern):
    if pattern == "ms_ssim":
        return (f"{value['scales']} scales, {value['filter_size']}-pixel Gaussian filter, weights "
                + ", ".join(f"{w:.3f}" for w in value["power_factors"]))
    try:
        return pattern.format(value)
    except (ValueError, TypeError):
        return str(value)


def _embedded_image(path, alt):
    with open(path, "rb") as f:
        data = base64.b64encode(f.read()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def write_report(run_dir, metrics, figures):
    """One HTML page with the metrics table and every figure embedded as base64 PNG."""
    import plots

    sections = []
    rows = []
    for heading, entries in METRIC_ROWS:
        present = [(label, _format(metrics[key], pattern)) for key, label, pattern in entries if key in metrics]
        if present:
            rows.append(f'<tr><th colspan="2">{html.escape(heading)}</th></tr>')
            rows += [f"<tr><td>{html.escape(label)}</td><td>{html.escape(value)}</td></tr>" for label, value in present]
    sections.append(("Metrics", f'<table>{"".join(rows)}</table>'))
    figure_list = [
        ("Training curves", [os.path.join(run_dir, name) for name in ("loss.png", "ssim.png", "pixelcnn_loss.png")]),
        ("Reconstructions", [os.path.join(run_dir, "reconstructions.png"), figures.get("ssim_histogram"),
                             figures.get("worst")]),
        ("Codebook", [os.path.join(run_dir, "code_maps.png"), figures.get("codebook")]),
        ("Samples and their nearest training slices", [figures.get("samples")]),
    ]
    for heading, paths in figure_list:
        images = [_embedded_image(path, os.path.basename(path)) for path in paths if path and os.path.exists(path)]
        if images:
            sections.append((heading, "\n".join(images)))
    body = "\n".join(f"<h2>{html.escape(heading)}</h2>\n{content}" for heading, content in sections)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>VQ-VAE run report: {html.escape(os.path.basename(os.path.abspath(run_dir)))}</title>
<style>
body {{ font-family: sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 1em; }}
td, th {{ border: 1px solid #ccc; padding: 3px 10px; text-align: left; }}
th {{ background: #eee; }}
img {{ max-width: 100%; margin: 4px 0; }}
</style></head><body>
<h1>VQ-VAE run report</h1>
<p>Run <code>{html.escape(os.path.abspath(run_dir))}</code>, data <code>{html.escape(str(metrics.get("evaluated_data", "")))}</code>,
written {time.strftime("%Y-%m-%d %H:%M")}. Every figure is embedded; the page needs no network.</p>
{body}
</body></html>
"""
    def write(temporary):
        with open(temporary, "w", encoding="utf-8") as f:
            f.write(page)

    path = os.path.join(run_dir, "report.html")
    plots.atomic_write(path, write)
    return path
