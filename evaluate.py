"""Scoring: how good a trained run is, measured like a paper on the whole test split.

    python driver.py evaluate --run RUN_DIR [--data DIR] [--samples 16]

(`evaluate_run` takes loaded models and datasets; `driver.py` does the loading.)
`score_batch` / `score_split` are the one way the project scores reconstructions: training's
final test scores, `evaluate`, `reconstruct` and the benchmarks all call them.

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
5. `metrics.json` (merged into the run's) and `report.html` (`report.py`), one
   self-contained page with every figure embedded, which opens offline.

This is its own module because none of the model files should know about files or
reports, and the metrics here serve every model the run holds.
"""

import math
import os
import time

import numpy as np
import tensorflow as tf

import realism
import vqvae

MS_SSIM_POWER_FACTORS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # tf.image.ssim_multiscale's default


# ---------------------------------------------------------------------------
# Image similarity


def ms_ssim_settings(height, width, filter_size=vqvae.SSIM_WINDOW, power_factors=MS_SSIM_POWER_FACTORS):
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


@tf.function(reduce_retracing=True)
def _ssim_against(query, references, window):
    """SSIM of one (H, W) image in [0, 1] against each of (H, W, R) references: the
    references sit on the channel axis, where the depthwise filters run far faster on CPU
    than over a batch of one-channel images."""
    return tf.reduce_mean(vqvae.ssim_map(query[None, :, :, None], references[None], window), axis=(0, 1, 2))


def pairwise_ssim(queries, references, chunk=256):
    """(Q, R) SSIM of every query against every reference; both (N, H, W[, 1]) in [0, 1].

    Equal to tf.image.ssim on each pair (to float rounding), at a fraction of the cost of
    calling it pair by pair."""
    queries = np.asarray(queries, np.float32).reshape(len(queries), *np.shape(queries)[1:3])
    references = np.asarray(references, np.float32).reshape(len(references), *np.shape(references)[1:3])
    if queries.shape[1:] != references.shape[1:]:
        raise ValueError(f"image sizes differ: {queries.shape[1:]} and {references.shape[1:]}")
    window = tf.constant(vqvae.gaussian_window(min(vqvae.SSIM_WINDOW, *queries.shape[1:])))
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
    """Codes used, dead codes, usage and perplexity (exp of the entropy of code use) from
    counts, through `vqvae.CodebookStatistics`, the metric training tracks."""
    metric = vqvae.CodebookStatistics(len(counts))
    metric.counts.assign(np.asarray(counts, np.float32))
    result = {name: float(value) for name, value in metric.result().items()}
    used = int(np.count_nonzero(counts))
    return {"codes_used": used, "dead_codes": int(len(counts) - used), "codebook_usage": result["codebook_usage"],
            "perplexity": result["perplexity"]}


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
# Scoring a model: the one way training, `evaluate`, `reconstruct` and the benchmarks do it


def score_batch(model, images, ms_settings=None):
    """Per-slice SSIM, PSNR (and MS-SSIM with `ms_settings`) of a batch of (B, H, W, 1)
    slices in [shift, 1 + shift], their code grids, and the originals and reconstructions
    in [0, 1]."""
    reconstructions, indices = model.reconstruct(images)
    scores = {"ssim": vqvae.image_ssim(images, reconstructions, model.shift).numpy(),
              "psnr": vqvae.image_psnr(images, reconstructions, model.shift).numpy(),
              "codes": indices.numpy(),
              "originals": np.asarray(images) - model.shift,
              "reconstructions": model.to_slices(reconstructions)}
    if ms_settings:
        scores["ms_ssim"] = ms_ssim(scores["originals"], scores["reconstructions"], ms_settings).numpy()
    return scores


def score_split(model, dataset, ms_settings=None, worst=0):
    """Score every slice of a batched split: per-slice `ssim`, `psnr` (and `ms_ssim`), the
    (N, h, w) `codes`, the `codebook` statistics over them, and the `worst` slices by SSIM
    as (ssim, original, reconstruction)."""
    columns, kept = {}, []
    for images in dataset:
        scores = score_batch(model, images, ms_settings)
        for key in ("ssim", "psnr", "ms_ssim", "codes"):
            if key in scores:
                columns.setdefault(key, []).append(scores[key])
        kept += list(zip(scores["ssim"], scores["originals"], scores["reconstructions"]))
        kept = sorted(kept, key=lambda item: item[0])[:worst]
    scores = {key: np.concatenate(values) for key, values in columns.items()}
    scores["codebook"] = codebook_statistics(code_counts(scores["codes"], model.num_embeddings))
    scores["worst"] = kept
    return scores


def prior_bits_per_code(prior, grids, positions=None, batch_size=32):
    """The prior's mean negative log-likelihood per code of (N, h, w) grids, in bits (for
    a hierarchical prior, the top and bottom grids' total per bottom code, at the slices'
    `positions` if it is conditioned on them)."""
    import pixelcnn

    parts = max(1, -(-len(grids) // batch_size))
    if getattr(prior, "position_bins", 0) and positions is not None:
        batches = zip(np.array_split(grids, parts), np.array_split(positions, parts))
        total = sum(float(tf.reduce_sum(prior.code_nll(batch, where))) for batch, where in batches)
    else:
        total = sum(float(tf.reduce_sum(prior.code_nll(batch))) for batch in np.array_split(grids, parts))
    return float(pixelcnn.bits_per_code(total / np.size(grids)))


def split_images(dataset, shift):
    """Every slice of a batched split as one (N, H, W) numpy array in [0, 1]."""
    return np.concatenate([images.numpy()[..., 0] - shift for images in dataset])


def reconstruct_folder(run_dir, folder=None, split="test", out=None, grids=4, batch_size=16):
    """`driver.py reconstruct`: reconstruct the files of `folder` (its `split` folder, if it
    has split folders; default: the run's data) with a run's VQ-VAE, into `out` (default
    RUN/reconstruct-<folder name>). Returns the summary, with the folder."""
    import runs

    config = runs.load_config(run_dir)
    model = runs.load_model(run_dir, "vqvae.keras")
    folder, paths = runs.input_files(folder or config["data"], split)
    out = out or os.path.join(run_dir, f"reconstruct-{os.path.basename(os.path.normpath(folder))}")
    summary = reconstruct_files(model, paths, config, out, grids, batch_size)
    print(f"{summary['slices']} slices from {folder}: mean SSIM {summary['ssim_mean']:.4f} "
          f"(min {summary['ssim_min']:.4f}); wrote {out}/reconstruction.csv and {summary['grids']} grid(s)")
    return {**summary, "folder": folder}


def reconstruct_files(model, paths, run_config, out, grids=4, batch_size=16):
    """Reconstruct every slice of the files at `paths` (PNG or NIfTI, read as the run reads
    its data) in batches: per-slice SSIM and PSNR in OUT/reconstruction.csv, a summary in
    OUT/summary.json and up to `grids` image grids."""
    import data
    import files
    import plots

    progress, seen = data.progress_bar(len(paths), "file"), set()
    named_slices = data.named_slices(paths, run_config["image_size"], run_config["slice_axis"],
                                     run_config["volume_index"])
    cmap = run_config.get("cmap", "gray")
    os.makedirs(out, exist_ok=True)
    rows, written = [], 0

    def flush(batch):
        nonlocal written
        names, images = zip(*batch)
        scores = score_batch(model, np.stack(images) + model.shift)
        rows.extend(zip(names, scores["ssim"], scores["psnr"]))
        if written < grids:
            plots.reconstruction_grid(scores["originals"], scores["reconstructions"],
                                      os.path.join(out, f"grid_{written:02d}.png"), ssims=scores["ssim"], cmap=cmap)
            written += 1

    batch = []
    for name, image in named_slices:
        batch.append((name, image))
        if len(batch) == batch_size:
            flush(batch)
            batch = []
        seen.add(name.split("[")[0])
        progress.update(len(seen))
    if batch:
        flush(batch)
    if len(seen) < len(paths):  # files skipped at the end: the bar still closes
        progress.update(len(paths), finalize=True)
    if not rows:
        raise data.DataError(f"none of the {len(paths)} files could be read (each is named above with its reason)")
    files.write_csv(os.path.join(out, "reconstruction.csv"), ["slice", "ssim", "psnr"],
                   [(name, f"{s:.5f}", f"{p:.3f}") for name, s, p in rows])
    ssims = np.array([row[1] for row in rows])
    summary = {"slices": len(rows), "ssim_mean": float(ssims.mean()), "ssim_min": float(ssims.min()),
               "ssim_std": float(ssims.std()), "grids": written}
    files.write_json(os.path.join(out, "summary.json"), summary)
    return summary


# ---------------------------------------------------------------------------
# Evaluating a run


def evaluate_run(run_dir, model, splits, prior=None, samples=16, temperature=1.0, seed=0, cmap="gray",
                 data_name="", test_positions=None):
    """Score a trained VQ-VAE (and its prior, if given, with the test slices' positions) on
    `splits["test"]`, merge the metrics into RUN/metrics.json and write RUN/report.html.
    Figures go to RUN/evaluation/."""
    import files
    import report

    out = os.path.join(run_dir, "evaluation")
    os.makedirs(out, exist_ok=True)
    for folder in (run_dir, out):  # what an earlier, killed evaluation left half-written
        files.remove_stale_temporaries(folder)
    start = time.time()
    metrics, figures, test_grids = reconstruction_report(model, splits["test"], out, cmap)
    metrics["evaluated_data"] = data_name
    if prior is not None:
        print("prior: bits per code on the test split's codes", flush=True)
        metrics["prior_test_bits_per_code"] = prior_bits_per_code(prior, test_grids, test_positions)
        metrics["log2_K"] = float(np.log2(model.num_embeddings))
        if samples:
            sample_metrics, figures["samples"] = sample_report(model, prior, splits, test_grids, samples, temperature,
                                                               seed, out, cmap, test_positions)
            metrics.update(sample_metrics)
    else:
        print(f"{run_dir} has no pixelcnn.keras: scoring the VQ-VAE only", flush=True)
    metrics["evaluation_seconds"] = round(time.time() - start, 1)

    metrics_path = os.path.join(run_dir, "metrics.json")
    merged = files.read_json(metrics_path) if os.path.exists(metrics_path) else {}
    if not figures.get("samples"):  # no samples this time: drop an earlier evaluation's sample scores
        merged = {key: value for key, value in merged.items() if key not in SAMPLE_KEYS}
    merged.update(metrics)
    files.write_json(metrics_path, merged)
    page = report.write_report(run_dir, merged, figures)
    print(f"wrote {metrics_path} and {page} in {metrics['evaluation_seconds']:.0f} s", flush=True)
    return merged, page


def reconstruction_report(model, dataset, out, cmap="gray"):
    """Reconstruction and codebook metrics over a whole split, their figures in `out`, and
    the split's code grids."""
    import plots

    print("scoring reconstructions of the whole test split", flush=True)
    ms_settings = ms_ssim_settings(*next(iter(dataset)).shape[1:3])
    scores = score_split(model, dataset, ms_settings, worst=5)
    ssims, psnrs, ms_ssims, worst, codebook = (scores[key] for key in ("ssim", "psnr", "ms_ssim", "worst", "codebook"))
    metrics = {
        "test_slices": int(ssims.size), "test_ssim_mean": float(ssims.mean()), "test_ssim_std": float(ssims.std()),
        "test_ssim_min": float(ssims.min()), "test_psnr_mean": float(psnrs[np.isfinite(psnrs)].mean()),
        "test_ms_ssim_mean": float(ms_ssims.mean()), "test_ms_ssim_min": float(ms_ssims.min()),
        "ms_ssim_settings": ms_settings, **{f"test_{key}": value for key, value in codebook.items()},
    }
    figures = {"ssim_histogram": plots.histogram(
        ssims, os.path.join(out, "ssim_histogram.png"), "SSIM per test slice",
        f"test SSIM: mean {ssims.mean():.3f}, min {ssims.min():.3f} over {ssims.size} slices")}
    figures["worst"] = os.path.join(out, "worst_reconstructions.png")
    plots.image_grid([[o for _, o, _ in worst], [r for _, _, r in worst]], figures["worst"],
                     ["original", "reconstruction"], cmap=cmap,
                     title="the worst test reconstructions, SSIM " + ", ".join(f"{s:.3f}" for s, _, _ in worst))
    counts = code_counts(scores["codes"], model.num_embeddings)
    figures["codebook"] = plots.codebook_usage(
        counts, os.path.join(out, "codebook_usage.png"),
        f"test split: {codebook['codes_used']} of {counts.size} codes used, perplexity {codebook['perplexity']:.1f}")
    return metrics, figures, scores["codes"]


def sample_report(model, prior, splits, test_grids, samples, temperature, seed, out, cmap="gray",
                  test_positions=None):
    """Sample slices and score them against real test slices (realism: C2ST against the
    real-vs-real control, by fifth of the volume where the test slices' positions are known,
    and anatomy statistics; nearest training slice, diversity, code histogram); returns the
    metrics and the path of their figure."""
    import hierarchy
    import plots

    print(f"sampling {samples} slices and comparing them with real ones", flush=True)
    sample_codes = hierarchy.sampler_for(prior, samples, *test_grids.shape[1:]).sample(temperature, seed).numpy()
    generated = model.decode_images(sample_codes)[..., 0]
    test = split_images(splits["test"], model.shift)
    real = test[np.linspace(0, len(test) - 1, min(samples, len(test))).astype(int)]
    train_batches = (images.numpy() - model.shift for images in splits["train"].rebatch(256))
    nearest, _, nearest_images = nearest_neighbours(np.concatenate([generated, real]), train_batches)
    sample_nn, real_nn = nearest[: len(generated)], nearest[len(generated):]
    print(f"realism: a classifier two-sample test of {len(generated)} samples against {len(test)} test slices, "
          "and of the validation slices against them (the control)", flush=True)
    metrics = realism.realism_metrics(generated, test, split_images(splits["validate"], model.shift), seed,
                                      real_positions=test_positions)
    metrics.update({
        "samples": int(samples), "sample_temperature": float(temperature),
        "samples_nn_ssim_mean": float(sample_nn.mean()), "samples_nn_ssim_max": float(sample_nn.max()),
        "real_nn_ssim_mean": float(real_nn.mean()), "real_nn_ssim_max": float(real_nn.max()),
        "samples_pairwise_ssim": mean_pairwise_ssim(generated), "real_pairwise_ssim": mean_pairwise_ssim(real),
        "code_histogram_js_bits": js_divergence(code_counts(sample_codes, model.num_embeddings),
                                                code_counts(test_grids, model.num_embeddings)),
    })
    figure = os.path.join(out, "samples_nearest.png")
    order = np.argsort(-sample_nn)[:8]
    plots.image_grid([generated[order], nearest_images[order]], figure, ["sample", "nearest train"], cmap=cmap,
                     title="samples over their nearest training slices, SSIM "
                           + ", ".join(f"{s:.2f}" for s in sample_nn[order]))
    return metrics, figure


SAMPLE_KEYS = ("samples", "sample_temperature", "samples_nn_ssim_mean", "samples_nn_ssim_max", "real_nn_ssim_mean",
               "real_nn_ssim_max", "samples_pairwise_ssim", "real_pairwise_ssim", "code_histogram_js_bits",
               "c2st_samples_vs_real", "c2st_real_vs_real", "c2st_slices", *(f"{who}_{statistic}" for who in (
                   "samples", "real") for statistic in ("near_empty", "one_piece", "solidity", "symmetry")),
               *(f"c2st_{who}_auroc_{name}" for who in ("samples", "control") for name in realism.position_bins([])))
