"""The paper's protocol for its other two tasks: the backbone starts from a classification run.

A downstream run names its pretraining the way a user would train it: `pretrain.overrides` (the
classification settings: data, schedule, ...) and `pretrain.sweep` (its results folder), with the
downstream run's own operator (every axis override included), model size and seed. That composes the
classification config of exactly one run (`ablate.runs.pretraining_config`), whose folder follows
from its identity, so the pretraining run is found, never guessed; its experiment key is part of the
downstream run's identity, so runs fine-tuned from different pretraining are different experiments.
`task.pretrained=false` trains the same model from scratch (the paper's baseline).
"""
from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig

from ablate.errors import ConfigError
from ablate.models.dense import CLASSIFIER_PARTS
from ablate.models.weights import evaluated_weights, fit_position_tables
from ablate.runs import pretraining_config, run_folder
from ablate.tracking import CheckpointError, RunStore

__all__ = ["load_pretrained"]


def load_pretrained(backbone: torch.nn.Module, cfg: DictConfig) -> dict[str, Any]:
    """Load the pretraining run's weights into `backbone` (an AblateNet without its final norm and
    classifier); returns what the record says of it. ConfigError naming the folder and the command
    where the run is missing or unfinished, or where its weights do not fit this backbone."""
    pre = pretraining_config(cfg)
    folder = run_folder(pre)
    record = RunStore(folder).read_results()
    command = "python -m ablate.train " + " ".join([
        f"operator={cfg.preset}", f"model={cfg.model.size.name}", *cfg.pretrain.overrides,
        f"trainer.seed={cfg.trainer.seed}", f"trainer.sweep={cfg.pretrain.sweep}"])
    if record is None or record.get("status") != "completed":
        state = "no record" if record is None else f"status {record.get('status')}"
        raise ConfigError(f"the backbone starts from a classification run that is not completed ({state} "
                          f"in {folder}): train it first, `{command}` (or set task.pretrained=false to train "
                          "from scratch).")
    # the last epoch's checkpoint, checked against its sha256; an earlier epoch's (the store's fallback
    # when the last is damaged) would be other weights than those the record describes
    retrain = f"move {folder} away and train it again: `{command}`"
    try:
        checkpoint = RunStore(folder).load_checkpoint()
    except CheckpointError as err:
        raise ConfigError(f"the classification run's weights cannot be read ({err}); {retrain}.") from None
    if checkpoint is None or checkpoint.get("epoch") != record.get("epochs_done"):
        kept = "no checkpoint" if checkpoint is None else f"only epoch {checkpoint.get('epoch')}'s checkpoint"
        raise ConfigError(f"the classification run {folder} has {kept} readable, not that of its last epoch "
                          f"({record.get('epochs_done')}), whose weights its record describes: {retrain}.")
    # the weights the record's numbers describe: the EMA's where the run kept one
    weights = {k: v for k, v in evaluated_weights(checkpoint).items() if not k.startswith(CLASSIFIER_PARTS)}
    weights = fit_position_tables(weights, backbone.state_dict())
    try:
        missing, unexpected = backbone.load_state_dict(weights, strict=False)
    except RuntimeError as err:  # a tensor of another shape: weights per position of another map size
        first = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), str(err))
        raise ConfigError(f"the weights of {folder} do not fit this backbone at data.img_size="
                          f"{cfg.data.img_size}: {first} An operator with a weight per position of the map "
                          "cannot change its input size; set task.pretrained=false.") from err
    missing = [k for k in missing if not k.startswith(CLASSIFIER_PARTS)]
    if missing or unexpected:
        raise ConfigError(f"the weights of {folder} do not fit this backbone (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}): the pretraining run must have this run's operator "
                          "and model.")
    return {"pretrained_run": str(folder), "pretrained_experiment": record["experiment"],
            "pretrained_test_top1": record.get("final_test_top1")}
