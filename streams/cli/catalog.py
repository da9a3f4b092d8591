"""`lorastream policies | policy show | revisions | rollback | catalog rebuild | catalog gc`.

Fast answers (lists, aliases, states, hashes) come from the Redis index; provenance and
evaluations are fetched from the catalog topic at the offsets the index keeps. Every command
prints text for people, or one JSON object with `--json`.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from typing import Any

import orjson

from infra.settings import Settings
from workers.catalog.entries import PolicyEntry
from workers.catalog.index import CatalogIndex


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("policies", help="list catalogued policies")
    p.add_argument("--namespace", help="only this namespace (tenant)")
    p.add_argument("--limit", type=int, default=100, help="at most this many (0 = all)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_policies)

    p = sub.add_parser("policy", help="one policy's identity, aliases and revisions")
    psub = p.add_subparsers(dest="policy_command", required=True)
    show = psub.add_parser("show", help="identity, base model, LoRA config, aliases")
    show.add_argument("policy_id")
    show.add_argument("--json", action="store_true")
    show.set_defaults(handler=cmd_policy_show)
    from streams.cli.policyconfig import add_create

    add_create(psub)

    p = sub.add_parser("revisions", help="a policy's revisions with provenance and evaluations")
    p.add_argument("policy_id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_revisions)

    p = sub.add_parser("trained-on", help="the interaction logs a revision was trained on, "
                                          "from its provenance archive (outlives retention)")
    p.add_argument("policy_id")
    p.add_argument("revision", type=int)
    p.set_defaults(handler=cmd_trained_on)

    p = sub.add_parser("rollback", help="serve an earlier revision now (default: the last one "
                                        "that served before)")
    p.add_argument("policy_id")
    p.add_argument("--to", type=int, default=None, help="revision to serve (0 = base model)")
    p.add_argument("--reason", default="operator rollback")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_rollback)

    p = sub.add_parser("catalog", help="catalog maintenance")
    csub = p.add_subparsers(dest="catalog_command", required=True)
    rb = csub.add_parser("rebuild", help="drop the Redis index and refold it from the topic")
    rb.add_argument("--no-working-set", action="store_true",
                    help="skip re-deriving the pipeline's serving/hot-set keys")
    rb.add_argument("--json", action="store_true")
    rb.set_defaults(handler=cmd_rebuild)
    gc = csub.add_parser("gc", help="collect artifacts no alias or retained revision needs")
    gc.add_argument("--keep-last", type=int, default=3)
    gc.add_argument("--orphan-grace-s", type=float, default=3600.0)
    gc.add_argument("--dry-run", action="store_true")
    gc.add_argument("--json", action="store_true")
    gc.set_defaults(handler=cmd_gc)


def _out(args: argparse.Namespace, data: dict[str, Any], text: str) -> None:
    if args.json:
        sys.stdout.write(orjson.dumps(data).decode() + "\n")
    else:
        sys.stdout.write(text.rstrip("\n") + "\n")


def _ts(value: float | None) -> str:
    return datetime.fromtimestamp(value, UTC).isoformat(timespec="seconds") if value else "-"


def _summary(e: PolicyEntry) -> dict[str, Any]:
    return {"policy_id": e.policy_id, "namespace": e.namespace, "serving": e.serving,
            "candidate": e.candidate, "head": e.head, "revisions": len(e.revisions)}


def cmd_policies(args: argparse.Namespace, settings: Settings) -> int:
    index = CatalogIndex(settings)
    rows: list[dict[str, Any]] = []
    for pid in index.policy_ids():
        entry = index.get(pid)
        if entry is None or (args.namespace and entry.namespace != args.namespace):
            continue
        rows.append(_summary(entry))
        if args.limit and len(rows) >= args.limit:
            break
    rows.sort(key=lambda r: r["policy_id"])
    lines = [f"{'policy':<24} {'namespace':<12} serving candidate head revisions"]
    lines += [f"{r['policy_id']:<24} {r['namespace']:<12} {r['serving']:>7} {r['candidate']:>9} "
              f"{r['head']:>4} {r['revisions']:>9}" for r in rows]
    _out(args, {"policies": rows}, "\n".join(lines))
    return 0


def _entry_or_fail(settings: Settings, policy_id: str) -> PolicyEntry | None:
    entry = CatalogIndex(settings).get(policy_id)
    if entry is None:
        print(f"unknown policy {policy_id!r}", file=sys.stderr)
    return entry


def cmd_policy_show(args: argparse.Namespace, settings: Settings) -> int:
    from workers.catalog.read import identity_of

    entry = _entry_or_fail(settings, args.policy_id)
    if entry is None:
        return 1
    data = {**_summary(entry), **identity_of(settings, entry), "training": entry.training}
    states = {n: r.state.value for n, r in sorted(entry.revisions.items())}
    data["states"] = states
    text = (f"policy     {entry.policy_id} (namespace {entry.namespace})\n"
            f"base       {entry.base.get('name')}  sha256 {entry.base.get('hash')}\n"
            f"lora       rank {entry.lora.get('rank')} alpha {entry.lora.get('alpha')} "
            f"modules {','.join(entry.lora.get('target_modules', []))}\n"
            f"training  {' '.join(f'{k} {v}' for k, v in entry.training.items()) or 'grpo'}\n"
            f"registered {_ts(data.get('registered_ts'))}\n"
            f"aliases    serving r{entry.serving}  candidate r{entry.candidate}\n"
            f"revisions  {len(entry.revisions)} (head r{entry.head}): "
            + " ".join(f"r{n}:{s}" for n, s in states.items()))
    if data.get("last_rollback"):
        rb = data["last_rollback"]
        text += (f"\nrollback   r{rb['from_revision']} → r{rb['to_revision']} at {_ts(rb['ts'])}"
                 f": {rb['reason']}")
    _out(args, data, text)
    return 0


def cmd_trained_on(args: argparse.Namespace, settings: Settings) -> int:
    """One JSON line per interaction log the revision's steps trained on."""
    from schemas.catalog import Provenance
    from workers.artifacts.store import ArtifactStore
    from workers.catalog.archive import interactions
    from workers.catalog.read import revisions_of

    entry = _entry_or_fail(settings, args.policy_id)
    if entry is None:
        return 1
    found = [r for r in revisions_of(settings, entry) if r["revision"] == args.revision]
    if not found or not found[0].get("provenance"):
        print(f"{args.policy_id} has no revision {args.revision} with provenance",
              file=sys.stderr)
        return 1
    provenance = Provenance.model_validate(found[0]["provenance"])
    for inter in interactions(ArtifactStore.for_settings(settings), provenance):
        sys.stdout.write(inter.model_dump_json() + "\n")
    return 0


def cmd_revisions(args: argparse.Namespace, settings: Settings) -> int:
    from workers.catalog.read import revisions_of

    entry = _entry_or_fail(settings, args.policy_id)
    if entry is None:
        return 1
    revs = revisions_of(settings, entry)
    lines: list[str] = []
    for r in revs:
        p = r.get("provenance") or {}
        gone = " (files collected)" if r["collected"] else ""
        lines.append(f"r{r['revision']} {r['state']}{gone}"
                     f"  sha256 {r['sha256']}  {r['size_bytes']} bytes  step {r['step']}"
                     f"  parent r{r['parent']}")
        if p:
            lines.append(f"  trained   steps {p['first_step']}-{p['last_step']}, "
                         f"{p['tokens']} tokens, {_ts(p['started_ts'])} .. {_ts(p['finished_ts'])}"
                         f" by {p['trainer_version']}")
            fns = ", ".join(f"{f['name']} v{f['version']}" for f in p["reward_fns"]) or "-"
            lines.append(f"  rewards   {fns}")
            for rng in p["rollouts"]:
                lines.append(f"  rollouts  {rng['topic']}[{rng['partition']}] offsets "
                             f"{','.join(str(o) for o in rng['offsets'])}")
            if p.get("archive"):
                lines.append(f"  archive   {p['archive']} ({p['archived_records']} records)")
        for ev in r["evaluations"]:
            lines.append(f"  eval      {ev['evaluator']} {ev['score']:.4f} vs r"
                         f"{ev['baseline_revision']} {ev['baseline_score']:.4f} "
                         f"{'passed' if ev['passed'] else 'failed'} ({ev['reason']})")
    aliases = {"serving": entry.serving, "candidate": entry.candidate}
    _out(args, {"policy_id": entry.policy_id, "aliases": aliases, "revisions": revs},
         "\n".join(lines) or "no revisions")
    return 0


def cmd_rollback(args: argparse.Namespace, settings: Settings) -> int:
    from workers.catalog.lifecycle import IllegalTransitionError
    from workers.catalog.writer import Catalog, CatalogError

    catalog = Catalog(settings)
    try:
        event = catalog.rollback(args.policy_id, args.to, args.reason)
    except (CatalogError, IllegalTransitionError) as exc:
        print(f"rollback refused: {exc}", file=sys.stderr)
        return 1
    finally:
        catalog.close()
    _out(args, event.model_dump(mode="json"),
         f"{event.policy_id}: serving r{event.from_revision} → r{event.to_revision} "
         f"({event.reason})")
    return 0


def cmd_rebuild(args: argparse.Namespace, settings: Settings) -> int:
    from workers.catalog.log import rebuild

    report = rebuild(settings, working_set=not args.no_working_set)
    _out(args, report.as_dict(),
         f"rebuilt from {report.records} records ({report.skipped} skipped) in "
         f"{report.seconds:.1f} s; dropped {report.deleted_keys} keys; working set of "
         f"{report.policies} policies restored")
    return 0


def cmd_gc(args: argparse.Namespace, settings: Settings) -> int:
    from workers.catalog.gc import collect
    from workers.catalog.lifecycle import RetentionPolicy
    from workers.catalog.writer import Catalog

    catalog = Catalog(settings)
    try:
        report = collect(catalog, RetentionPolicy(keep_last=args.keep_last),
                         dry_run=args.dry_run, orphan_grace_s=args.orphan_grace_s)
    finally:
        catalog.close()
    verb = "would collect" if args.dry_run else "collected"
    text = (f"retention: {report.policy}\n{verb} {len(report.collected)} revision artifacts and "
            f"{len(report.orphans)} orphans, {report.bytes_freed} bytes; kept "
            f"{report.kept_revisions} revisions")
    _out(args, report.as_dict(), text)
    return 0
