"""Command line: ``python -m flowlib {run,table,predict,methods}``.

Examples::

    python -m flowlib run fastflow --dataset demo --categories all --preset quick --seed 0 --out results/
    python -m flowlib run csflow --dataset mvtec --root /data/mvtec_ad --preset paper
    python -m flowlib table results/
    python -m flowlib predict checkpoints/fastflow/demo/brick_quick_seed0.pt my_images/ --out maps/
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

DATASETS = ("demo", "mvtec", "visa", "btad", "mvtec3d", "folder")


def _parse_override(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--set expects KEY=VALUE, got {text!r}.")
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m flowlib", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="train and evaluate a method, write JSON results")
    run.add_argument("method")
    run.add_argument("--dataset", choices=DATASETS, default="demo")
    run.add_argument("--root", default=None, help="dataset root (default: $FLOWLIB_DATA or data/<dataset>)")
    run.add_argument("--categories", default="all", help="'all' or a comma-separated list")
    run.add_argument("--preset", default="quick", help="quick, paper, or a method-specific preset")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--out", default=None, help="results folder (default: results/)")
    run.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    run.add_argument("--set", dest="overrides", action="append", type=_parse_override, default=[],
                     metavar="KEY=VALUE", help="override a preset setting, e.g. --set epochs=5")
    run.add_argument("--save-checkpoints", metavar="DIR", default=None,
                     help="also write a checkpoint per model under DIR")
    run.add_argument("--no-progress", action="store_true")

    table = sub.add_parser("table", help="render the results under a folder as tables")
    table.add_argument("results", nargs="?", default=None)
    table.add_argument("--metric", action="append", default=None,
                       help="metric(s) for the per-category tables (default: image and pixel AUROC)")
    table.add_argument("--method", default=None)
    table.add_argument("--dataset", default=None)
    table.add_argument("--paper", action="store_true", help="add the papers' rows where known")

    predict = sub.add_parser("predict", help="anomaly maps, overlays and scores for new images")
    predict.add_argument("checkpoint")
    predict.add_argument("images", help="an image file or a folder of images")
    predict.add_argument("--out", required=True)
    predict.add_argument("--category", default=None, help="category of the images (unified models)")
    predict.add_argument("--device", default=None)
    predict.add_argument("--compile", action="store_true",
                         help="torch.compile the model first (slow start, faster per image: for many images)")

    sub.add_parser("methods", help="list the registered methods and their presets")
    return parser


def _table(args: argparse.Namespace) -> str:
    from flowlib.results import category_table, load_results, metrics_table, paper_tables

    records = load_results(args.results, method=args.method, dataset=args.dataset)
    if not records:
        return f"No results found under {args.results or 'results/'}."
    parts = []
    for dataset in sorted({r["dataset"] for r in records}):
        subset = [r for r in records if r["dataset"] == dataset]
        parts.append(f"## {dataset}\n\n" + metrics_table(subset))
        for metric in args.metric or ["image_auroc", "pixel_auroc"]:
            paper = paper_tables(dataset=dataset, metric=metric) if args.paper else []
            if args.method:
                paper = [p for p in paper if p.method == args.method]
            parts.append(category_table(subset, metric, paper=paper))
    return "\n\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        from flowlib.engine import run
        from flowlib.results import metrics_table

        records = run(args.method, dataset=args.dataset, categories=args.categories, preset=args.preset,
                      seed=args.seed, root=args.root, out=args.out, overrides=dict(args.overrides),
                      device=args.device, checkpoint_dir=args.save_checkpoints,
                      progress=not args.no_progress)
        print(metrics_table(records))
        print(f"\nwrote {len(records)} result file(s), e.g. {records[0]['_path']}")
    elif args.command == "table":
        print(_table(args))
    elif args.command == "predict":
        from flowlib.predict import predict_images

        entries = predict_images(args.checkpoint, args.images, args.out, device=args.device,
                                 category=args.category, compile=args.compile)
        for e in entries:
            verdict = "" if "defective" not in e else ("  DEFECTIVE" if e["defective"] else "  good")
            print(f"{e['score']:.5g}{verdict}  {e['image']}")
        print(f"wrote maps, overlays and scores.json to {args.out}")
    elif args.command == "methods":
        from flowlib.models import available_methods, method_spec

        for name in available_methods():
            spec = method_spec(name)
            print(f"{name:10s} presets: {', '.join(spec.presets)}  {spec.description}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
