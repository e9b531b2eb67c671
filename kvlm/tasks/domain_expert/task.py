"""The domain_expert task: one domain's expert trained with a released base frozen.

The model (`kvlm.domain_experts.specialist`) is the base (`--base`, default the shipped
`kvlm_tiny_vqa`), frozen, with embedding rows for the domain's words the base tokenizer lacks,
and either (`--kind adapters`, the default) rank-`--adapter-rank` LoRA adapters through the
whole path and an own answer head over every answer of the domain, or (`--kind ffn`) a
trainable branch of each fusion block's feed-forward network and head columns for the
answers the base head lacks. It trains on `--datasets` or a `--data` folder through the
shared loop; the run folder is a classifier run folder (`kvlm evaluate` and `kvlm export`
treat it as one) plus:

- `expert/`: the `DomainExpert` (adapters or FFN weights, router keys computed on the training
  data, an adapter expert's question key over its training questions and both abstention
  thresholds calibrated on all its data, new words and answers, the base fingerprint, the
  specialist's held-out accuracy);
- `plugin/`: a pip-installable plugin distribution shipping `expert/`
  (`kvlm.domain_experts.packaging.write_plugin`), so `pip install <run>/plugin` installs it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import keras
import numpy as np

from kvlm.data import make_dataset, make_tokenizer, missing_words
from kvlm.domain_experts.base import Base
from kvlm.domain_experts.expert import DomainExpert
from kvlm.domain_experts.packaging import write_plugin
from kvlm.domain_experts.routing import KEY_EXAMPLES, adapter_routing, router_keys
from kvlm.domain_experts.specialist import (
    adapter_specialist_model,
    adapter_specialist_weights,
    specialist_model,
    specialist_weights,
)
from kvlm.runs import TrainConfig
from kvlm.tasks.base import ClassifierTask, TrainData, trained_line
from kvlm.tasks.domain_expert import INFO
from kvlm.training.distribution import Distribution
from kvlm.training.evaluation import answer_accuracy

EXPERT_DIR = "expert"
PLUGIN_DIR = "plugin"


def expert_domain(config: TrainConfig, examples) -> str:
    """`--domain`, else the single domain of the training examples, else the data folder's name."""
    if config.options["domain"]:
        return config.options["domain"]
    domains = sorted({e.domain for e in examples})
    if len(domains) == 1 and domains[0] not in ("", "custom"):
        return domains[0]
    return Path(config.data_dir).name if config.data_dir else "custom"


class DomainExpertTask(ClassifierTask):
    """Trains a `DomainExpert` for `config.options["base"]` (see the module docstring)."""

    info = INFO

    def configure(self, config: TrainConfig) -> TrainConfig:
        if config.overrides:
            raise ValueError(
                "The domain_expert task takes its architecture from its --base: drop the model overrides. "
                f"Received: overrides={config.overrides}"
            )
        return config

    def prepare(self, config: TrainConfig) -> TrainData:
        base = Base.load(config.options["base"])
        train, held_out = self.examples(config)
        words = missing_words((e.question for e in train), base.vocabulary)
        if config.options["kind"] == "adapters":
            answers = sorted({e.answer for e in train})
        else:
            answers = base.answers + sorted({e.answer for e in train} - set(base.answers))
        vocabulary = base.vocabulary + words
        tokenizer = make_tokenizer(vocabulary, base.sequence_length)
        return TrainData(train, held_out, vocabulary, tokenizer, base.image_size, answers, extra={"base": base})

    def build_model(self, config: TrainConfig, data: TrainData, steps: int) -> keras.Model:
        base = data.extra["base"]
        num_words = len(data.vocabulary) - len(base.vocabulary)
        if config.options["kind"] == "adapters":
            targets = config.options["adapt"].split(",") if config.options["adapt"] else None
            model = adapter_specialist_model(base.model, num_words, data.answers, config.options["adapter_rank"], targets)
        else:
            model = specialist_model(base.model, num_words, len(data.answers) - len(base.answers))
        return self.compile(model, config, steps)

    def saved_model(self, model: keras.Model) -> keras.Model:
        """The specialist without its optimizer: `model.keras` is for prediction and export (the
        expert itself is `expert/`)."""
        return keras.Model(model.input, model.output, name=model.name)

    def after_training(
        self, config: TrainConfig, data: TrainData, model: keras.Model, out: Path, distribution: Distribution
    ) -> dict[str, Any]:
        """Writes `expert/` (with the router keys and the held-out accuracy) and `plugin/`."""
        base = data.extra["base"]
        keys_data = make_dataset(data.train[:KEY_EXAMPLES], data.tokenizer, data.answers, data.image_size, 256)
        held_out_accuracy = answer_accuracy(model, data.held_out, data.tokenizer, data.answers, data.image_size)
        domain = expert_domain(config, data.train)
        metrics = {"accuracy": held_out_accuracy, "train_examples": len(data.train),
                   "eval_examples": len(data.held_out), "epochs": config.epochs}
        if config.options["kind"] == "adapters":
            held_out = make_dataset(data.held_out, data.tokenizer, data.answers, data.image_size, 256)
            questions = [np.asarray(data.tokenizer([e.question for e in examples])) for examples in (data.train, data.held_out)]
            parts = dict(answers=data.answers, ffn_weights=[], **adapter_specialist_weights(model),
                         **adapter_routing(base, keys_data, held_out, *questions, len(data.vocabulary)))
            metrics["adapter_rank"] = config.options["adapter_rank"]
        else:
            parts = dict(answers=data.answers[len(base.answers):], keys=router_keys(model, keys_data),
                         **specialist_weights(model))
        expert = DomainExpert(
            name=config.options["expert_name"] or domain.replace(" ", "_").lower(),
            domain=domain,
            base=base.fingerprint,
            words=data.vocabulary[len(base.vocabulary):],
            metrics=metrics,
            **parts,
        )
        expert.save(out / EXPERT_DIR)
        plugin = write_plugin(out / EXPERT_DIR, out / PLUGIN_DIR, base=config.options["base"])
        return {"expert": {"name": expert.name, "domain": domain, "base": expert.base, "accuracy": held_out_accuracy,
                           "new_words": len(expert.words), "new_answers": len(set(expert.answers) - set(base.answers)),
                           "path": str(out / EXPERT_DIR), "plugin": str(plugin)}}

    def summary_lines(self, summary: dict[str, Any]) -> list[str]:
        expert = summary["expert"]
        return [
            trained_line(summary, f"held-out accuracy {expert['accuracy']:.4f}"),
            f"expert {expert['name']!r} ({expert['domain']}) for base {expert['base']}: {expert['new_words']} new words, "
            f"{expert['new_answers']} new answers; {expert['path']}",
            f"plugin distribution: {expert['plugin']} (pip install {expert['plugin']})",
        ]


TASK = DomainExpertTask
