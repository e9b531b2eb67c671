"""The first-party experts as shipped, installed into the released base with no training step.

    python bench/installed_experts.py [--eval-size 500]

For each installed plugin's trained expert: its specialist's held-out accuracy (recorded when it
was trained, `python scripts/release_experts.py`), then, on fresh held-out examples of each
domain and of the base's general task, the base alone and the base with every installed
expert (`kvlm experts install`), and where routing sends each domain's examples and the
examples that pair one domain's image with another's question; and the cost of experts: the
installed model's time per batch of 64 with eight experts installed against one (the shipped
experts under eight names), median of interleaved runs in one process. Writes
bench/results/installed_experts.json and .md.
"""

from __future__ import annotations

import argparse

import common

COST_BATCH = 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval-size", type=int, default=500)
    args = parser.parse_args()

    from kvlm.domain_experts import Base, install_experts, installed_experts
    from dataclasses import replace

    import numpy as np

    from kvlm.domain_experts.report import GENERAL, held_out_examples, installed_report, routed_slots

    base = Base.load("kvlm_tiny_vqa")
    experts = installed_experts()
    installed = install_experts(base, experts)
    report = installed_report(base, installed, args.eval_size)
    results = {"base": base.fingerprint, "host_training_steps": 0, "eval_size": args.eval_size, "domains": {}}
    for domain, row in report.items():
        expert = next((e for e in experts if e.domain == domain), None)
        own = expert.name if expert else GENERAL
        results["domains"][domain] = {
            "expert": own, "kind": expert.kind if expert else None,
            "specialist": expert.metrics["accuracy"] if expert else None,
            "base": row["base"], "installed": row["installed"], "routing_to_own": row["routing"][own],
            "routing": row["routing"],
        }
    # One domain's image with another domain's question: no expert was trained for the pair.
    names = [GENERAL, *installed.experts]
    owner = {installed.domains[name]: name for name in installed.experts} | {GENERAL: GENERAL}
    sets = held_out_examples(base, installed, args.eval_size, seed=1)
    results["mismatched"] = {}
    for image_domain, images in sets.items():
        for question_domain, questions in sets.items():
            if image_domain == question_domain:
                continue
            pairs = [replace(i, question=q.question, answer=q.answer) for i, q in zip(images, questions)]
            shares = np.bincount(routed_slots(installed.model, pairs, installed.tokenizer, base.image_size),
                                 minlength=len(names)) / len(pairs)
            results["mismatched"][f"{image_domain} image, {question_domain} question"] = {
                "to_base": round(float(shares[0]), 4),
                "to_image_expert": round(float(shares[names.index(owner[image_domain])]), 4),
                "to_question_expert": round(float(shares[names.index(owner[question_domain])]), 4),
            }
    # The cost of experts: one installed against eight (the shipped experts under eight names).
    from kvlm.data import make_dataset

    eight = [replace(experts[i % len(experts)], name=f"expert_{i}") for i in range(8)]
    one, many = install_experts(base, experts[:1]), install_experts(base, eight)
    mixed = [e for group in sets.values() for e in group[: COST_BATCH // len(sets)]]
    labels = sorted({e.answer for e in mixed})
    ms = common.batch_ms({name: (m.model, next(iter(make_dataset(mixed, m.tokenizer, labels, base.image_size, COST_BATCH)))[0])
                   for name, m in (("one", one), ("eight", many))}
                  | {"base": (base.model, next(iter(make_dataset(mixed, base.tokenizer, labels, base.image_size,
                                                                   COST_BATCH)))[0])})
    results["cost"] = {"one_expert_ms": round(ms["one"], 2), "eight_experts_ms": round(ms["eight"], 2),
                       "ratio": round(ms["eight"] / ms["one"], 3), "base_alone_ms": round(ms["base"], 2),
                       "batch": COST_BATCH, "rounds": common.COST_ROUNDS}
    lines = [
        "# The first-party experts installed into the released base (`python bench/installed_experts.py`)",
        "",
        f"{args.eval_size} fresh held-out examples per domain; specialist: the expert's own held-out accuracy "
        f"when trained (`python scripts/release_experts.py`); {results['host_training_steps']} host training steps.",
        "",
        "| domain | expert kind | base alone | specialist | installed | installed / specialist | routed to own expert |",
        "|---|---|---|---|---|---|---|",
    ]
    for domain, row in results["domains"].items():
        ratio = f"{row['installed'] / row['specialist']:.3f}" if row["specialist"] else f"drop {row['base'] - row['installed']:.3f}"
        specialist = f"{row['specialist']:.3f}" if row["specialist"] else "-"
        lines.append(f"| {domain} | {row['kind'] or 'base'} | {row['base']:.3f} | {specialist} | {row['installed']:.3f} | "
                     f"{ratio} | {row['routing_to_own']:.3f} |")
    lines += ["", "One domain's image asked another domain's question (no expert was trained for the pair; "
              "the base's own is `general`):", "",
              "| image, question | to the base | to the image's expert | to the question's expert |", "|---|---|---|---|"]
    lines += [f"| {pair} | {row['to_base']:.3f} | {row['to_image_expert']:.3f} | {row['to_question_expert']:.3f} |"
              for pair, row in results["mismatched"].items()]
    cost = results["cost"]
    lines += ["", f"Cost of experts (batch {COST_BATCH}, TensorFlow, median of {common.COST_ROUNDS} interleaved runs): one expert "
              f"installed {cost['one_expert_ms']:.1f} ms, eight {cost['eight_experts_ms']:.1f} ms, ratio {cost['ratio']:.3f} "
              f"(the base alone {cost['base_alone_ms']:.1f} ms)."]
    markdown = "\n".join(lines + [""])
    common.write_results(common.RESULTS, "installed_experts", results, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
