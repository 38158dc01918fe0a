"""Compare the plain and the gated PixelCNN prior at about the same parameter count, on the
code grids of a trained run (RUN/codes.npz, written when a run trains a prior).

    python benchmarks/prior_variants.py --run RUN_DIR --epochs 12

Both are trained on the train split's codes with the same epochs, batch size and learning
rate (by default decayed along a half cosine to 5%, as the driver does); the table gives the
best validation bits per code and the test bits per code. `--only` trains one variant, so two
processes can train the two side by side (with TF_NUM_INTRAOP_THREADS=1 each).
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import callbacks  # noqa: E402
import driver  # noqa: E402
import evaluate  # noqa: E402
import pixelcnn  # noqa: E402
import table  # noqa: E402
import train  # noqa: E402


def plain_config(num_embeddings, filters, layers, res_blocks, learning_rate):
    return driver.Config(K=num_embeddings, pcnn_variant="plain", pcnn_filters=filters, pcnn_layers=layers,
                         pcnn_res_blocks=res_blocks, pcnn_head_units=0, pcnn_learning_rate=learning_rate)


def matched_plain_filters(target, num_embeddings, layers, res_blocks):
    """The plain prior's channel count whose parameter count is closest to `target`."""
    def count(filters):
        return train.build_prior(plain_config(num_embeddings, filters, layers, res_blocks, 1e-3)).count_params()
    return min(range(8, 257, 4), key=lambda filters: abs(count(filters) - target))


def fit(model, codes, epochs, batch_size, learning_rate, seed, schedule):
    def dataset(grids, shuffle):
        return train.code_dataset(grids, batch_size, shuffle, seed)

    schedules = [callbacks.CosineLearningRate(learning_rate, epochs)] if schedule == "cosine" else []
    start = time.time()
    history = model.fit(dataset(codes["train"], True), validation_data=dataset(codes["validate"], False),
                        epochs=epochs, verbose=2, callbacks=schedules)
    seconds = time.time() - start
    return {
        "parameters": model.count_params(),
        "val_bits_per_code": [round(pixelcnn.bits_per_code(v), 4) for v in history.history["val_loss"]],
        "best_val_bits_per_code": round(pixelcnn.bits_per_code(min(history.history["val_loss"])), 4),
        "test_bits_per_code": round(evaluate.prior_bits_per_code(model, codes["test"]), 4),
        "seconds": round(seconds, 1),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--filters", type=int, default=35, help="gated prior channels")
    parser.add_argument("--layers", type=int, default=3, help="gated layers")
    parser.add_argument("--head-units", type=int, default=140,
                        help="width of the gated prior's layer before the logits (0: --filters)")
    parser.add_argument("--only", choices=("gated", "plain"), help="train only this variant")
    parser.add_argument("--plain-layers", type=int, default=2, help="1x1 layers of the plain prior")
    parser.add_argument("--plain-res-blocks", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--schedule", choices=("cosine", "constant"), default="cosine",
                        help="learning rate: half-cosine decay to 5%% over the epochs, or constant")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    codes = dict(np.load(os.path.join(args.run, "codes.npz")))
    num_embeddings = json.load(open(os.path.join(args.run, "config.json")))["K"]
    keras.utils.set_random_seed(args.seed)
    make_gated = lambda: train.build_prior(driver.Config(  # noqa: E731
        K=num_embeddings, pcnn_filters=args.filters, pcnn_layers=args.layers, pcnn_head_units=args.head_units,
        pcnn_learning_rate=args.learning_rate))
    gated = make_gated()
    plain_filters = matched_plain_filters(gated.count_params(), num_embeddings, args.plain_layers,
                                          args.plain_res_blocks)
    results = {}
    for name, make in (
        ("gated", make_gated),
        ("plain", lambda: train.build_prior(plain_config(num_embeddings, plain_filters, args.plain_layers,
                                                         args.plain_res_blocks, args.learning_rate))),
    ):
        if args.only and name != args.only:
            continue
        keras.utils.set_random_seed(args.seed)
        model = make()
        print(f"\n{name}: {model.count_params():,} parameters ({model.get_config()})", flush=True)
        results[name] = fit(model, codes, args.epochs, args.batch_size, args.learning_rate, args.seed,
                            args.schedule)
        results[name].update(config=model.get_config(), epochs=args.epochs, learning_rate=args.learning_rate,
                             schedule=args.schedule)

    grid = codes["train"].shape[1:]
    print(f"\ncode grids {grid[0]}x{grid[1]}, K = {num_embeddings} (log2 K = {np.log2(num_embeddings):.2f} bits), "
          f"{len(codes['train'])} train / {len(codes['validate'])} validate / {len(codes['test'])} test grids, "
          f"{args.epochs} epochs each")
    table.print_table(
        [("prior", 8, "{}"), ("parameters", 10, "{:,d}"), ("best val bits/code", 19, "{:.3f}"),
         ("test bits/code", 15, "{:.3f}"), ("seconds", 8, "{:.0f}")],
        [[name, result["parameters"], result["best_val_bits_per_code"], result["test_bits_per_code"],
          result["seconds"]] for name, result in results.items()])
    table.save(args.json, results)

if __name__ == "__main__":
    main()
