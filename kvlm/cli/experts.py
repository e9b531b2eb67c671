"""`kvlm experts list`: the installed expert plugins, their datasets and broken plugins."""

from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    """Adds the `experts` command group."""
    experts = subparsers.add_parser("experts", help="inspect the installed expert plugins")
    commands = experts.add_subparsers(dest="experts_command", required=True)
    listing = commands.add_parser(
        "list",
        help="list discovered experts (name, domain, distribution, version), datasets and broken plugins",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    listing.add_argument("--json", action="store_true", help="print one JSON object for machines")
    listing.set_defaults(handler=run_list)


def listing() -> dict:
    """What `kvlm experts list --json` prints."""
    from kvlm import experts

    return {
        "experts": [
            {
                "name": info.name,
                "domain": info.spec.domain,
                "distribution": info.distribution,
                "version": info.version,
                "expert_version": info.spec.version,
                "description": info.spec.description,
                "vocabulary_size": len(info.spec.vocabulary),
            }
            for info in sorted(experts.available().values(), key=lambda i: i.name)
        ],
        "datasets": [
            {
                "name": info.name,
                "domain": info.spec.domain,
                "distribution": info.distribution,
                "version": info.version,
                "description": info.spec.description,
            }
            for info in sorted(experts.datasets().values(), key=lambda i: i.name)
        ],
        "broken": [report.to_dict() for report in experts.broken()],
    }


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


def run_list(args) -> int:
    data = listing()
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    header = ["NAME", "DOMAIN", "DISTRIBUTION", "VERSION"]
    keys = ["name", "domain", "distribution", "version"]
    print("\n".join(_table([header] + [[e[k] for k in keys] for e in data["experts"]])))
    if data["datasets"]:
        print("\ndatasets:")
        print("\n".join(_table([header] + [[d[k] for k in keys] for d in data["datasets"]])))
    if data["broken"]:
        print("\nbroken plugins (skipped):")
        for report in data["broken"]:
            print(f"  {report['distribution']} {report['version']} ({report['entry_point']}): {report['reason']}")
    return 0
