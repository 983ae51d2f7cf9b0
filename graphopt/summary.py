"""Tables for people (rich): the optimize summary and verification figures."""
from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .report import Report, human_bytes
from .verify import Verification


def print_summary(report: Report, console: Console) -> None:
    b, a = report.before, report.after
    t = Table(box=None, header_style="bold", title=None)
    t.add_column("")
    t.add_column("before", justify="right")
    t.add_column("after", justify="right")
    t.add_column("change", justify="right")
    nb, na = b.get("nodes", 0), a.get("nodes", 0)
    t.add_row("nodes", str(nb), str(na), f"{na - nb:+d}")
    sb, sa = b.get("model_bytes") or 0, a.get("model_bytes") or 0
    t.add_row("size", human_bytes(sb), human_bytes(sa), f"{(sa / sb if sb else 1):.2f}x")
    console.print(t)
    summary = report.pass_summary()
    if summary:
        pt = Table(box=None, header_style="bold")
        pt.add_column("pass")
        pt.add_column("runs", justify="right")
        pt.add_column("time", justify="right")
        pt.add_column("stats")
        pt.add_column("top refusal")
        for name, d in summary.items():
            stats = ", ".join(f"{k}={v}" for k, v in d["stats"].items() if v)
            top = d["skipped"].most_common(1)
            refusal = f"{top[0][0]} (x{top[0][1]})" if top else ""
            back = sum(1 for r in report.passes if r.name.split("{")[0] == name and r.status != "ok")
            runs = str(d["runs"]) + (f" ([yellow]{back} rolled back[/yellow])" if back else "")
            pt.add_row(name, runs, f"{d['seconds'] * 1000:.0f} ms", escape(stats), escape(refusal[:80]))
        console.print(pt)
    for n in report.notes:
        console.print(f"note: {escape(n)}")
    for r in report.passes:
        if r.status != "ok":
            console.print(f"[yellow]{r.status}[/yellow]: {escape(r.name)}: {escape(r.detail)}")
    v = report.verification or {}
    status = v.get("status", "off")
    if status == "passed":
        figs = "; ".join(_figures(o) for o in v.get("outputs", []))
        acc = v.get("accuracy") or {}
        if acc:
            figs += f"; accuracy {acc.get('accuracy', 0):.4f} (was {acc.get('accuracy_ref', 0):.4f})"
        console.print(f"verification: [green]passed[/green] ({v.get('backend')}, {v.get('samples')} sample(s){', lossy budget' if not v.get('exact', True) else ''}): {escape(figs)}")
    elif status == "not-verified":
        console.print(f"verification: [yellow]not verified[/yellow]: {escape(str(v.get('reason')))}")
    elif status == "off":
        console.print("verification: off")
    s = report.seconds
    if s:
        console.print(f"time: {s.get('total', 0):.2f} s (passes {s.get('passes', 0):.2f} s"
                      + (f" of which verify-each {s['verify_each']:.2f} s" if "verify_each" in s else "")
                      + f", verify {s.get('verify', 0):.2f} s)"
                      + (f"; wrote {report.output}" if report.output else ""))


def _figures(o: dict) -> str:
    s = f"{o['name']} max_abs={o['max_abs']:.2g} cos={o['cosine']:.6f}"
    if o.get("top1_agreement") is not None:
        s += f" top1={o['top1_agreement']:.3f}"
    return s


def print_verification(v: Verification, console: Console) -> None:
    t = Table(box=None, header_style="bold")
    for c in ("output", "ok", "shape", "max_abs", "max_rel", "rel_l2", "cosine", "top1", "note"):
        t.add_column(c)
    for o in v.outputs:
        t.add_row(escape(o.name), "yes" if o.ok else "[red]no[/red]", escape(str(o.shape_got)), f"{o.max_abs:.3g}", f"{o.max_rel:.3g}",
                  f"{o.rel_l2:.3g}", f"{o.cosine:.6f}", "" if o.top1_agreement is None else f"{o.top1_agreement:.3f}", escape(o.reason))
    console.print(t)
    colour = {"passed": "green", "failed": "red"}.get(v.status, "yellow")
    console.print(f"[{colour}]{v.status}[/{colour}]" + (f": {escape(v.reason)}" if v.reason else "") + f" ({v.backend}, {v.samples} sample(s))")
