"""`kvlm experts list`: the installed expert plugins, their datasets and broken plugins.
`kvlm experts install`: the released base with the installed trained experts, measured and
written as a run folder (no training step)."""

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
    listing.set_defaults(handler=run_list, uses_tensorflow=False)
    install = commands.add_parser(
        "install",
        help="build the base with trained experts (no training), print per-domain accuracy and routing, "
             "write a run folder for `kvlm export`",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    install.add_argument("--output", required=True, help="run folder to write (model.keras, vocabulary, answers)")
    install.add_argument("--base", default="kvlm_tiny_vqa", help="a shipped trained preset or a base preset folder")
    install.add_argument("--experts", nargs="+", default=None,
                         help="names of installed trained experts, or folders written by `kvlm train --task "
                              "domain_expert` (their expert/); default: every installed trained expert")
    install.add_argument("--eval-size", type=int, default=500, help="held-out examples per domain")
    install.set_defaults(handler=run_install)


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


def _experts(given: list[str] | None) -> list:
    """Trained experts from names of installed plugins or from folders."""
    from pathlib import Path

    from kvlm.domain_experts import DomainExpert, installed_experts

    if given is None:
        return installed_experts()
    folders = [g for g in given if Path(g).is_dir()]
    experts = [DomainExpert.load(Path(f) / "expert" if (Path(f) / "expert").is_dir() else f) for f in folders]
    names = [g for g in given if g not in folders]
    return experts + (installed_experts(names) if names else [])


def run_install(args) -> int:
    from kvlm.domain_experts import Base, install_experts
    from kvlm.domain_experts.report import format_installed_report, installed_report, write_installed_run

    base = Base.load(args.base)
    installed = install_experts(base, _experts(args.experts))
    report = installed_report(base, installed, args.eval_size)
    out = write_installed_run(installed, args.output, args.eval_size)
    (out / "experts.json").write_text(json.dumps({"experts": installed.domains, "report": report}, indent=2) + "\n",
                                      encoding="utf-8")
    print(f"installed {', '.join(installed.experts) or 'no experts'} into {args.base} ({base.fingerprint}) "
          "with 0 training steps")
    print(format_installed_report(report, installed.experts))
    print(f"saved to {out} (kvlm export --model {out})")
    return 0
