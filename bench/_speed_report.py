"""Figures of ``bench/train_speed.py``: one row per (algorithm, layout), loss checks, JSON, Markdown and PNG.

From a job's ``metrics.jsonl`` (steps after the warm-up)::

    iter_ms         mean and p50 of step_ms (wall time of one optimizer step, device synchronised)
    tokens_per_s    tokens per step / mean step time;  per GPU: / (trainer GPUs + servers * server_tp)
    wait_fraction   sum(target_wait_ms) / sum(step_ms)  (time the trainer blocks on the target)
    bytes_per_step  target_bytes: bytes of target outputs the step consumed, all ranks together

The reference is ``colocated:dp=1`` of the same algorithm: target and draft never overlap there, so its
``target_wait_ms`` is the standalone target time of a step's micro-batches (T_t) and its ``train_ms`` the
standalone draft step on precomputed outputs (T_d). Then, with S servers of P GPUs and K trainers::

    ideal(colocated:dp=K) = (T_t + T_d) / K        ideal(remote) = max(T_t / (S * P), T_d / K)
    efficiency = ideal / measured mean iteration time

``T_t / P`` assumes perfect tensor-parallel scaling, so a TP server's efficiency also counts TP losses.
"""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path
from typing import Any

from zmqdisagg.train.metrics import read_metrics

logger = logging.getLogger("zmqdisagg.bench." + __name__.rpartition(".")[2])

REFERENCE = "colocated:dp=1"


def summarise(job: dict[str, Any], result: dict[str, Any], warmup: int, expected: int) -> dict[str, Any]:
    """The row of one job; timing fields are None when no measured step finished."""
    layout = job["layout"]
    records = read_metrics(job["dir"])
    measured = [r for r in records if r["step"] > warmup]
    in_process = ["in-process"] if layout["kind"] == "colocated" else []
    row = {"algorithm": job["algorithm"], "layout": job["layout_name"], **layout, "gpus": job["gpus"],
           "status": result.get("status"), "error": result.get("error"), "steps_done": len(records),
           "steps_measured": len(measured), "losses": [r["loss"] for r in records],
           "transports": sorted(set(result.get("transports", {}).values())) or in_process,
           "transports_by_server": result.get("transports", {}), "device_name": result.get("device_name"),
           "build_s": result.get("build_s"), "peak_mem_gib": result.get("peak_mem_gib"),
           "expected_bytes_per_step": expected}
    if not measured:
        return row
    step_ms = [r["step_ms"] for r in measured]
    tokens = round(measured[0]["tokens_per_s"] * measured[0]["step_ms"] / 1000)
    mean_s = statistics.fmean(step_ms) / 1000
    row.update(iter_ms_mean=round(1000 * mean_s, 2), iter_ms_p50=round(statistics.median(step_ms), 2),
               tokens_per_step=tokens, tokens_per_s=round(tokens / mean_s, 1),
               tokens_per_s_per_gpu=round(tokens / mean_s / max(job["gpus"], 1), 1),
               wait_fraction=round(sum(r["target_wait_ms"] for r in measured) / sum(step_ms), 4),
               bytes_per_step=measured[0]["target_bytes"],
               bytes_constant=len({r["target_bytes"] for r in measured}) == 1,
               target_ms_per_step=round(statistics.fmean(r["target_wait_ms"] for r in measured), 2),
               train_ms_per_step=round(statistics.fmean(r["train_ms"] for r in measured), 2))
    return row


def finish(rows: list[dict[str, Any]], batch: int) -> dict[str, Any]:
    """Fill in ideal time and efficiency, and compare losses; return the reference times and loss checks."""
    reference, checks = {}, {}
    for algo in sorted({r["algorithm"] for r in rows}):
        mine = [r for r in rows if r["algorithm"] == algo]
        ref = next((r for r in mine if r["layout"] == REFERENCE and r.get("iter_ms_mean")), None)
        if ref is not None:
            t_t, t_d = ref["target_ms_per_step"], ref["train_ms_per_step"]
            reference[algo] = {"target_ms_per_step": t_t, "train_ms_per_step": t_d, "micro_batches": batch,
                               "target_ms_per_micro_batch": round(t_t / batch, 2),
                               "train_ms_per_micro_batch": round(t_d / batch, 2)}
            for r in mine:
                if r.get("iter_ms_mean"):
                    r["ideal_ms"] = round(_ideal(r, t_t, t_d), 2)
                    r["efficiency"] = round(r["ideal_ms"] / r["iter_ms_mean"], 3)
        checks[algo] = loss_checks(mine, ref)
    return {"reference": reference, "loss_checks": checks}


def _ideal(row: dict[str, Any], t_t: float, t_d: float) -> float:
    if row["kind"] == "colocated":
        return (t_t + t_d) / row["trainers"]
    return max(t_t / (row["servers"] * row["server_tp"]), t_d / row["trainers"])


def loss_checks(rows: list[dict[str, Any]], ref: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Per trainer count: are all complete runs' losses bitwise equal? Plus max |dloss| to the reference."""
    done = [r for r in rows if r["status"] == "ok"]
    out = []
    for k in sorted({r["trainers"] for r in done}):
        group = [r for r in done if r["trainers"] == k]
        first = group[0]["losses"]
        out.append({"trainers": k, "layouts": [r["layout"] for r in group],
                    "bitwise_equal": all(_bits(r["losses"]) == _bits(first) for r in group),
                    "max_abs_diff_within": max(_max_diff(r["losses"], first) for r in group),
                    "max_abs_diff_vs_reference": (max(_max_diff(r["losses"], ref["losses"]) for r in group)
                                                  if ref is not None and ref["status"] == "ok" else None)})
    return out


def _bits(losses: list[float]) -> list[str]:
    return [float(x).hex() for x in losses]  # NaN == NaN here, unlike ==


def _max_diff(a: list[float], b: list[float]) -> float:
    return max((abs(x - y) for x, y in zip(a, b)), default=0.0)


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [f"Device: {m.get('device_summary')}; {m.get('cpu_cores')} CPU cores; torch {m.get('torch')}.  ",
             f"Workload: `{report['workload']['model']}` ({report['workload']['target_dtype']}), "
             f"{report['batch']} x {report['workload']['seq_len']} tokens per step, "
             f"{report['workload']['steps']} measured steps after {report['workload']['warmup']} warm-up.  ",
             f"Command: `{report['command']}`", "",
             "| algorithm | layout | GPUs | transport | iter ms mean / p50 | tokens/s | tokens/s/GPU | "
             "target wait | MB/step | efficiency | peak GiB | status |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in report["rows"]:
        if r.get("iter_ms_mean") is None:
            lines.append(f"| {r['algorithm']} | {r['layout']} | {r['gpus']} | - | - | - | - | - | - | - | - | "
                         f"{r['status']} |")
            continue
        eff = f"{r['efficiency']:.2f}" if r.get("efficiency") is not None else "-"
        peak = f"{r['peak_mem_gib']:.1f}" if r.get("peak_mem_gib") is not None else "-"
        lines.append(f"| {r['algorithm']} | {r['layout']} | {r['gpus']} | {','.join(r['transports'])} | "
                     f"{r['iter_ms_mean']:.1f} / {r['iter_ms_p50']:.1f} | {r['tokens_per_s']:.0f} | "
                     f"{r['tokens_per_s_per_gpu']:.0f} | {100 * r['wait_fraction']:.1f}% | "
                     f"{r['bytes_per_step'] / 2**20:.1f} | {eff} | {peak} | {r['status']} |")
    lines += ["", "Reference (colocated:dp=1, standalone): " + "; ".join(
        f"{a}: target {v['target_ms_per_micro_batch']} ms, draft step {v['train_ms_per_micro_batch']} ms per "
        f"micro-batch" for a, v in report["reference"].items()), "", "Losses:"]
    for algo, checks in report["loss_checks"].items():
        for c in checks:
            vs = c["max_abs_diff_vs_reference"]
            cross = f"; max |Δloss| vs colocated:dp=1 = {vs:.3g}" if vs is not None and c["trainers"] > 1 else ""
            lines.append(f"- {algo}, {c['trainers']} trainer(s) ({', '.join(c['layouts'])}): "
                         + ("bitwise identical" if c["bitwise_equal"] else
                            f"NOT identical (max |Δloss| {c['max_abs_diff_within']:.3g})") + cross)
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no %s (pip install matplotlib)", path.name)
        return False
    rows = [r for r in report["rows"] if r.get("iter_ms_mean")]
    if not rows:
        return False
    layouts = list(dict.fromkeys(r["layout"] for r in rows))
    algos = sorted({r["algorithm"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.45 * len(layouts) + 2), sharey=True)
    per = "GPU" if report["machine"].get("gpu_count") else "process (CPU run)"
    for ax, key, title in ((axes[0], "tokens_per_s_per_gpu", f"tokens/s per {per}"),
                           (axes[1], "efficiency", "pipeline efficiency (ideal / measured)")):
        for j, algo in enumerate(algos):
            got = {r["layout"]: r.get(key) or 0 for r in rows if r["algorithm"] == algo}
            ax.barh([i + 0.4 * j for i in range(len(layouts))], [got.get(n, 0) for n in layouts], height=0.4,
                    label=algo)
        ax.set_title(title)
        ax.legend()
    axes[0].set_yticks([i + 0.2 for i in range(len(layouts))], layouts, fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle(report["machine"].get("device_summary", ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write(report: dict[str, Any], out: Path, stem: str, *, final: bool) -> None:
    """The JSON after every job (a cut-short run keeps what it measured); table and plot at the end."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f"{stem}.json.tmp"
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(out / f"{stem}.json")
    if final:
        (out / f"{stem}_table.md").write_text(markdown(report))
        report["plot"] = plot(report, out / f"{stem}.png")
