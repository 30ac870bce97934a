"""``effir-export info MODEL``: architecture, per-layer structure and parameter count."""
from __future__ import annotations

import json

import click


def register(group: click.Group) -> None:
    group.add_command(info)


@click.command()
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print the same facts as JSON.")
def info(model: str, as_json: bool) -> None:
    """Show a model's architecture, layers, hidden size, per-layer attention/MLP presence and MLP
    widths, parameter count and embedding settings. Writes nothing."""
    from ..accounting import account
    from ..models.sources import load_model

    loaded = load_model(model)
    acc = account(loaded.model)
    facts = {"source": loaded.source, **acc.model_dump(), "embedding": loaded.embedding.model_dump()}
    if as_json:
        click.echo(json.dumps(facts, indent=2))
        return
    click.echo(format_info(facts))


def format_info(facts: dict) -> str:
    """Human-readable summary plus a per-layer table."""
    layers = facts["layers"]
    dropped_attn = [l["index"] for l in layers if not l["attention"]]
    dropped_mlp = [l["index"] for l in layers if not l["mlp"]]
    widths = sorted({l["intermediate_size"] for l in layers if l["mlp"]})
    lines = [
        f"source          {facts['source']}",
        f"architecture    {facts['model_type']} (adapter: {facts['family']})",
        f"layers          {facts['num_layers']}",
        f"hidden size     {facts['hidden_size']}",
        f"MLP widths      {', '.join(map(str, widths)) or '-'}",
        f"dropped attn    {dropped_attn or 'none'}",
        f"dropped MLP     {dropped_mlp or 'none'}",
        f"parameters      {facts['parameters']:,} ({facts['parameters'] / 1e6:.1f}M)",
        f"weight bytes    {facts['weight_bytes']:,}",
        "FLOPs/token     " + ", ".join(f"{v / 1e6:,.1f}M @ {t} tokens" for t, v in facts["flops_per_token"].items()),
        "embedding       " + ", ".join(f"{k}={v!r}" for k, v in facts["embedding"].items()),
        "",
        f"{'layer':>5}  {'attention':>9}  {'mlp':>5}  {'mlp width':>9}  {'attn params':>11}  {'mlp params':>10}",
    ]
    for l in layers:
        lines.append(f"{l['index']:>5}  {'yes' if l['attention'] else '-':>9}  {'yes' if l['mlp'] else '-':>5}  "
                     f"{l['intermediate_size'] if l['mlp'] else 0:>9}  {l['attention_params']:>11,}  {l['mlp_params']:>10,}")
    return "\n".join(lines)
