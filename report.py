"""The run report: one self-contained HTML page with the metrics table and every figure
embedded as base64 PNG, so it opens offline (`driver.py evaluate` writes it).

Its own module so that scoring (`evaluate.py`) knows nothing about HTML.
"""

import base64
import html
import os
import time

import realism

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
    ("Realism: samples against real test slices", [
        ("c2st_slices", "slices in each set of the classifier two-sample test", "{:d}"),
        ("c2st_samples_vs_real", "C2ST accuracy, samples vs real (0.5 = indistinguishable)", "{:.3f}"),
        ("c2st_real_vs_real", "C2ST accuracy, validation vs test subjects (the floor)", "{:.3f}"),
        ("samples_symmetry", "left-right symmetry of samples", "{:.3f}"),
        ("real_symmetry", "left-right symmetry of real slices", "{:.3f}"),
        ("samples_one_piece", "samples in one piece", "{:.1%}"), ("real_one_piece", "real slices in one piece", "{:.1%}"),
        ("samples_near_empty", "near-empty samples", "{:.1%}"), ("real_near_empty", "near-empty real slices", "{:.1%}"),
        ("samples_solidity", "solidity of samples", "{:.3f}"), ("real_solidity", "solidity of real slices", "{:.3f}"),
    ]),
    ("Realism by level: how well the classifier tells each set from the real test slices of each fifth of the "
     "volume (AUROC; 0.5 = not told apart, 1 = always; 0 = the lowest slice)", [
        (f"c2st_{who}_auroc_{name}", f"{label}, real slices at {name}", "{:.3f}")
        for who, label in (("samples", "samples"), ("control", "validation subjects (the floor)"))
        for name in realism.position_bins([])]),
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
    import files

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
    files.atomic_write(path, write)
    return path
