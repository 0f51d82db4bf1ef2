"""Views of a results document: JSON file, markdown tables, matplotlib plots."""

from __future__ import annotations

import json
from pathlib import Path

MIB = 2**20


def setting_label(row: dict) -> str:
    if row["ratio"] is None:
        return f"{row['method']} (no compression)"
    label = f"{row['method']} r={row['ratio']:g} (kv_budget {row['kv_budget']:g})"
    return label + (f" obs={row['observe']}" if row["observe"] else "")


def _setting_key(row: dict) -> tuple:
    return (row["method"], -1.0 if row["ratio"] is None else row["ratio"], row["observe"] or "")


def _ordered(values):
    return list(dict.fromkeys(values))


def markdown(results: dict) -> str:
    """Accuracy (%) per setting and task@length, KL per setting and length, and the KV held."""
    summary = results["summary"]
    meta = results["meta"]
    lines = [
        f"Command: `{meta['command']}`  ",
        (
            f"Date: {meta['date']}; machine: {meta['machine']}; model: {meta['model']}; "
            f"llama-cpp-python {meta['llama_cpp_python']}; {meta['seconds']:.0f} s"
        ),
        "",
    ]
    accuracy = [r for r in summary if r["metric"] == "accuracy"]
    if accuracy:
        columns = _ordered((r["task"], r["length"]) for r in accuracy)
        by_setting: dict[tuple, dict] = {}
        for r in sorted(accuracy, key=_setting_key):
            by_setting.setdefault(_setting_key(r), {"label": setting_label(r)})[(r["task"], r["length"])] = r
        n = accuracy[0]["n"]
        lines.append(f"Accuracy (% of expected answers named; {n} samples per cell, seed {meta['config']['seed']}):")
        lines.append("")
        lines.append("| setting | " + " | ".join(f"{t}@{n_}" for t, n_ in columns) + " | mean |")
        lines.append("|---" * (len(columns) + 2) + "|")
        for cells in by_setting.values():
            scores = [cells[c]["score"] for c in columns if c in cells]
            row = [f"{100 * cells[c]['score']:.0f}" if c in cells else "-" for c in columns]
            lines.append(f"| {cells['label']} | " + " | ".join(row) + f" | {100 * sum(scores) / len(scores):.1f} |")
        lines.append("")
    kl = [r for r in summary if r["metric"] == "kl_nats"]
    if kl:
        lines.append(f"Next-token KL divergence against the full cache (nats; text: {meta.get('long_text')}):")
        lines.append("")
        lines.append("| setting | length | KL | NLL of the real next token | samples |")
        lines.append("|---|---|---|---|---|")
        for r in sorted(kl, key=lambda r: (_setting_key(r), r["length"])):
            lines.append(f"| {setting_label(r)} | {r['length']} | {r['score']:.4f} | {r['nll']:.3f} | {r['n']} |")
        lines.append("")
    lines.append("KV held at the end of a sample (means; physical = bytes of cells in use, logical = kept"
                 " (layer, KV head, slot) entries):")
    lines.append("")
    lines.append("| setting | task@length | prompt tokens | cells used | physical KV MiB | logical entries |")
    lines.append("|---|---|---|---|---|---|")
    for r in sorted(summary, key=lambda r: (_setting_key(r), r["length"])):
        lines.append(
            f"| {setting_label(r)} | {r['task']}@{r['length']} | {r['prompt_tokens']:.0f} | {r['cells_used']:.0f} "
            f"| {r['physical_bytes'] / MIB:.2f} | {r['logical_entries']:.0f} |"
        )
    if any(r["method"].startswith("kvpress:") for r in summary):
        lines.append("")
        lines.append("kvpress rows: transformers holds one float32 tensor per layer (twice an f16 cache's bytes, and"
                     " per-layer budgets are physical there); cells used = the widest layer.")
    if results.get("agreement"):
        lines.append("")
        lines.extend(agreement_markdown(results["agreement"]))
    return "\n".join(lines) + "\n"


def agreement_markdown(agreement: dict) -> list[str]:
    """Our methods against their kvpress counterparts: accuracy per task, KVCompose's per-layer budgets."""
    lines = ["Agreement with kvpress (same samples; " + agreement["note"] + "):", ""]
    if agreement["accuracy"]:
        lines.append("| ours | kvpress | r | task@length | ours % | kvpress % | difference (points) | ratio |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for a in agreement["accuracy"]:
            ratio = "-" if a["ratio"] is None else f"{a['ratio']:g}"
            ours = a["method"] + (f" obs={a['observe']}" if a["observe"] else "")
            rel = "-" if a["ratio_to_reference"] is None else f"{a['ratio_to_reference']:.2f}"
            lines.append(
                f"| {ours} | {a['reference']} | {ratio} | {a['task']}@{a['length']} | {100 * a['accuracy']:.0f} "
                f"| {100 * a['reference_accuracy']:.0f} | {a['difference_points']:+.0f} | {rel} |"
            )
        lines.append("")
    for b in agreement["layer_budgets"]:
        lines.append(
            f"KVCompose per-layer budgets, {b['task']}@{b['length']} sample {b['index']} ({b['context_tokens']} context "
            f"tokens), r={b['ratio']:g}: ours (one compression after the context, {b['our_observation']} observation) "
            f"keeps {b['total_ours']} slots in all, kvpress {b['total_kvpress']}; mean |difference| "
            f"{b['mean_abs_difference']:.1f} slots per layer ({100 * b['mean_abs_difference_of_context']:.1f} % of the "
            f"context), max {b['max_abs_difference']}, correlation "
            f"{'-' if b['correlation'] is None else format(b['correlation'], '.3f')}."
        )
        lines.append("")
        header = "| | " + " | ".join(str(i) for i in range(len(b["ours"]))) + " |"
        lines.append(header)
        lines.append("|---" * (len(b["ours"]) + 1) + "|")
        lines.append("| ours | " + " | ".join(str(x) for x in b["ours"]) + " |")
        lines.append("| kvpress | " + " | ".join(str(x) for x in b["kvpress"]) + " |")
        if "ours_in_eval_layer_slots" in b:
            lines.append(f"| ours in the eval run (obs={b['ours_in_eval_observe']}, end of sample) | "
                         + " | ".join(f"{x:.0f}" for x in b["ours_in_eval_layer_slots"]) + " |")
        lines.append("")
    return lines


def write_json(results: dict, path: Path) -> None:
    path.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")


def write_plots(results: dict, out_dir: Path) -> list[Path]:
    """accuracy_vs_physical_kv.png, accuracy_vs_logical_kv.png, layer_budgets.png."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'kvcompose-gguf[eval]'") from None
    summary = [r for r in results["summary"] if r["metric"] == "accuracy"]
    if not summary:
        return []
    written = []
    for x_key, x_label, name in (
        ("physical_bytes", "physical KV memory (MiB)", "accuracy_vs_physical_kv.png"),
        ("logical_entries", "logical KV entries (layer x KV head x slot)", "accuracy_vs_logical_kv.png"),
    ):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for method in _ordered(r["method"] for r in summary):
            for length in _ordered(r["length"] for r in summary):
                points = {}
                for r in summary:
                    if r["method"] == method and r["length"] == length:
                        points.setdefault((r["ratio"], r["observe"]), []).append(r)
                xs, ys = [], []
                for rows in points.values():
                    x = sum(r[x_key] for r in rows) / len(rows)
                    xs.append(x / MIB if x_key == "physical_bytes" else x)
                    ys.append(100 * sum(r["score"] for r in rows) / len(rows))
                order = sorted(range(len(xs)), key=xs.__getitem__)
                ax.plot([xs[i] for i in order], [ys[i] for i in order], marker="o", label=f"{method} @{length}")
        ax.set_xlabel(x_label)
        ax.set_ylabel("accuracy, mean over tasks (%)")
        ax.set_ylim(0, 100)
        ax.set_xlim(left=0)  # memory axes start at zero: savings read as proportions
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    written.append(_layer_heatmap(plt, results["summary"], out_dir / "layer_budgets.png"))
    return written


def _layer_heatmap(plt, summary: list[dict], path: Path) -> Path:
    """Fraction of the prompt each layer keeps, per setting (mean over tasks and lengths)."""
    rows: dict[tuple, dict] = {}
    for r in sorted(summary, key=_setting_key):
        entry = rows.setdefault(_setting_key(r), {"label": setting_label(r), "fractions": []})
        entry["fractions"].append([s / max(1.0, r["prompt_tokens"]) for s in r["layer_slots"]])
    labels = [e["label"] for e in rows.values()]
    matrix = [[sum(col) / len(col) for col in zip(*e["fractions"])] for e in rows.values()]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 + 0.9 * len(labels)), 5.0))
    image = ax.imshow(list(map(list, zip(*matrix))), aspect="auto", origin="lower", vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("layer")
    ax.set_title("slots each layer keeps, as a fraction of the prompt")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
