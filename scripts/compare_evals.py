"""Put several infer.py (or mean_box_baseline.py) results side by side in one markdown table.

    python scripts/compare_evals.py outputs/eval_base_textvqa outputs/eval_base_refcoco \\
        outputs/eval_sft_textvqa outputs/eval_sft_refcoco --output outputs/comparison.md

Each DIR holds a metrics.json, which names its model and test set. Models are rows (in the order
first named), test sets are column groups: Acc@0.5, mean IoU and small-box Acc@0.5 (with the number
of small boxes), for a test set with list rows F1@0.5, recall@0.5 and rejection accuracy, and mAP@[.5:.95] with
the model's confidences beside mAP with every score 1. From the second row on, each figure shows its change
against the first row's.

--retention gives the table of issue #31 instead: what grounding SFT gained and what general question
answering lost. One row per model (the base model first, e.g. then SFT without and with mixing), two columns:
grounding Acc@0.5 (from the DIR whose test set has box rows) and VQA accuracy (from the DIR whose test set has
text rows; a mixed test file gives both), each with its change against the base model.

    python scripts/compare_evals.py --retention outputs/eval_base outputs/eval_sft outputs/eval_sft_mix
"""

import argparse
import json
import os

COLUMNS = (("Acc@0.5", lambda m: m["acc@0.5"]), ("mean IoU", lambda m: m["mean_iou"]),
           ("small Acc@0.5", lambda m: m["by_size"]["small"]["acc@0.5"]))  # fmt: skip
# A test set with list rows (several boxes, or [] for none) also gets these (scoring.list_metrics).
LIST_COLUMNS = (("F1@0.5", lambda m: m["f1@0.5"]), ("recall@0.5", lambda m: m["recall@0.5"]),
                ("rejection acc", lambda m: m["rejection_acc"]))  # fmt: skip
# mAP ranked by the model's confidences, and with every score 1 (scoring.detection_map); absent from older metrics.json.
MAP_COLUMNS = (("mAP", lambda m: m.get("map")), ("mAP scores 1", lambda m: m.get("map_const")))
# (column, the metrics key counting its samples, the metrics key of its figure)
RETENTION_COLUMNS = (("grounding Acc@0.5", "num_samples", "acc@0.5"), ("VQA accuracy", "vqa_num_samples", "vqa_accuracy"))


def read_results(directories) -> dict[tuple[str, str], dict]:
    """{(model, test set): metrics} of every DIR; a missing file or a pair named twice raises ValueError."""
    results, sources = {}, {}
    for directory in directories:
        path = os.path.join(directory, "metrics.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found: is {directory} an infer.py --output_dir of a finished run?")
        with open(path) as f:
            metrics = json.load(f)
        if "by_size" not in metrics or "model" not in metrics:
            raise ValueError(f"{path} was written by an older infer.py (no model / by_size keys): evaluate again")
        key = (metrics["model"], metrics["test_dataset"])
        if key in results:
            raise ValueError(f"{path} and {sources[key]} both evaluate {key[0]} on {key[1]}: pass one of them")
        results[key], sources[key] = metrics, path
    return results


def cell(value, reference, is_first_row) -> str:
    """The figure, and from the second row on its change against the first row's."""
    if value is None:
        return "n/a"  # no box of that size in the test set
    if is_first_row or reference is None:
        return f"{value:.4f}"
    return f"{value:.4f} ({value - reference:+.4f})"


def comparison_table(results) -> str:
    models = list(dict.fromkeys(model for model, _ in results))
    test_sets = list(dict.fromkeys(test_set for _, test_set in results))
    lists = {test_set for (_, test_set), metrics in results.items() if "num_list_samples" in metrics}
    columns = {test_set: COLUMNS + (LIST_COLUMNS if test_set in lists else ()) + MAP_COLUMNS for test_set in test_sets}
    header = ["model"] + [f"{test_set} {name}" for test_set in test_sets for name, _ in columns[test_set]]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for row, model in enumerate(models):
        cells = [model]
        for test_set in test_sets:
            metrics, first = results.get((model, test_set)), results.get((models[0], test_set))
            if metrics is None:
                cells += ["not run"] * len(columns[test_set])
                continue
            for index, (_, value_of) in enumerate(columns[test_set]):
                cells.append(cell(value_of(metrics), None if first is None else value_of(first), row == 0))
                if index == len(COLUMNS) - 1:
                    cells[-1] += f" (n={metrics['by_size']['small']['count']})"  # how many boxes it rests on
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def retention_table(results) -> str:
    """Grounding Acc@0.5 and VQA accuracy per model, with the change against the first model (the base)."""
    models = list(dict.fromkeys(model for model, _ in results))
    figures = {model: {} for model in models}
    for (model, test_set), metrics in results.items():
        for name, count_key, value_key in RETENTION_COLUMNS:
            if metrics.get(count_key):  # metrics.json files from before VQA scoring have no vqa_num_samples
                if name in figures[model]:
                    raise ValueError(f"{model}: more than one test set gives its {name}; pass one of them")
                figures[model][name] = metrics[value_key]
    header = ["model"] + [name for name, _, _ in RETENTION_COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for row, model in enumerate(models):
        cells = [model]
        for name, _, _ in RETENTION_COLUMNS:
            value = figures[model].get(name)
            cells.append("not run" if name not in figures[model] else cell(value, figures[models[0]].get(name), row == 0))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directories", nargs="+", metavar="DIR", help="infer.py --output_dir folders")
    parser.add_argument("--output", default="comparison.md", help="where the markdown table is written")
    parser.add_argument("--retention", action="store_true", help="grounding Acc@0.5 and VQA accuracy against the base")
    args = parser.parse_args()
    try:
        results = read_results(args.directories)
        table = retention_table(results) if args.retention else comparison_table(results)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(str(error)) from error
    print(table)
    tmp_path = f"{args.output}.tmp"
    with open(tmp_path, "w", encoding="utf-8") as f:
        f.write(table + "\n")
    os.replace(tmp_path, args.output)
    print(f"\nwritten to {args.output}")


if __name__ == "__main__":
    main()
