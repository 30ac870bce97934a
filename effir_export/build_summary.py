"""The build's final summary: one row per stage plus the headline figures, as JSON and Markdown."""
from __future__ import annotations

import json
from pathlib import Path

from .pipeline import StageOutcome
from .validation.report import gates_verdict


def summarize(recipe, out: Path, outcomes: list[StageOutcome]) -> dict:
    """Collect stage statuses and the figures their reports carry."""
    stages = [{"stage": o.name, "status": o.status, "seconds": o.seconds, "reason": o.reason,
               "folder": str(o.folder) if o.folder else None} for o in outcomes]
    summary: dict = {"recipe": recipe.name, "out": str(out), "stages": stages}
    for outcome in outcomes:
        params = outcome.report.get("parameters")
        if isinstance(params, dict) and "after" in params:
            summary.setdefault("parameters", {"original": params["before"]})["final"] = params["after"]
        if "gates_passed" in outcome.report:
            summary["gates_passed"] = outcome.report["gates_passed"]
            summary["gates_checked"] = outcome.report.get("gates_checked")
        if "backends" in outcome.report:
            summary["backends"] = outcome.report["backends"]
            summary["failed_gates"] = outcome.report.get("failed_gates", [])
            summary["skipped_gates"] = outcome.report.get("skipped_gates", [])
        if "serving" in outcome.report:
            summary["serving"] = outcome.report["serving"]
    return summary


def format_summary(summary: dict) -> str:
    lines = [f"## build: {summary['recipe']}", "", "| stage | status | seconds | note |", "|---|---|---:|---|"]
    for s in summary["stages"]:
        lines.append(f"| {s['stage']} | {s['status']} | {s['seconds']:.1f} | {s['reason'] or s['folder'] or ''} |")
    if "parameters" in summary:
        p = summary["parameters"]
        lines += ["", f"parameters: {p['original']:,} -> {p.get('final', p['original']):,} "
                      f"({p.get('final', p['original']) / p['original']:.1%})"]
    if summary.get("backends"):
        asymmetric = any(b.get("asymmetric_ndcg@10") is not None for b in summary["backends"])
        lines += ["", "| backend | params | size MB | nDCG@10 |" + (" queries-only nDCG@10 |" if asymmetric else "")
                  + " min cosine (to) | query ms | doc ms |", "|---|---:|---:|---:|" + ("---:|" if asymmetric else "")
                  + "---:|---:|---:|"]
        for b in summary["backends"]:
            cosine = "-" if b.get("min_cosine") is None else f"{b['min_cosine']:.5f} ({b.get('cosine_to')})"
            queries_only = f" {_fmt(b.get('asymmetric_ndcg@10'), '{:.4f}')} |" if asymmetric else ""
            lines.append("| {name} | {params} | {size} | {ndcg} |{asym} {cos} | {q} | {d} |".format(
                name=b.get("name"), params=_fmt(b.get("parameters"), "{:,}"), size=_fmt(b.get("size_mb"), "{:.1f}"),
                ndcg=_fmt(b.get("ndcg@10"), "{:.4f}"), asym=queries_only, cos=cosine,
                q=_fmt(b.get("query_ms"), "{:.1f}"), d=_fmt(b.get("document_ms"), "{:.1f}")))
        if asymmetric:
            lines += ["", "nDCG@10: the backend embeds queries and documents (deploy it by re-embedding the corpus). "
                          "queries-only: it embeds the queries against the reference's document embeddings (deploy "
                          "it as the query encoder of an index the reference built)."]
    if "serving" in summary:
        serving = summary["serving"]
        lines += ["", f"Triton serves: {serving['stage']}" + (f" ({serving['backend']})" if serving["backend"] else "")
                  + f": {serving['reason']}"]
        lines += [f"  not chosen: {c['backend']}: {c['why_not']}" for c in serving["candidates"] if not c["eligible"]]
    if "gates_passed" in summary:
        lines += ["", f"gates: {gates_verdict(summary['gates_passed'], summary.get('gates_checked'))}"]
        lines += [f"  failed: {g['metric']} on {g['backend']}: {_fmt(g.get('value'), '{:.4g}')} "
                  f"(needs {g['comparison']} {g['threshold']})" for g in summary.get("failed_gates", [])]
        lines += [f"  skipped: {note}" for note in summary.get("skipped_gates", [])]
    return "\n".join(lines)


def _fmt(value, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def write_summary(summary: dict, out: Path) -> str:
    """Write build_summary.json and build_summary.md; return the Markdown."""
    text = format_summary(summary)
    (out / "build_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    (out / "build_summary.md").write_text(text + "\n")
    return text
