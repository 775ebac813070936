"""Building networks from checkpoints: ours, and the authors' released files (docs/original.md §5)."""
from __future__ import annotations

from pathlib import Path

import torch

from models.embedding import EmbeddingNet, infer_backbone
from models.idemenet import IDeMeNet
from utils.checkpoint import load_state_dict
from utils.errors import CheckpointError

# Checkpoint kind -> the key prefixes that mark it, tried in this order.
KINDS = {"original": ("attentionNet.", "CNet."), "stage2": ("backbone.", "deformer."), "stage1": ("convnet.",)}
# Key renamings for :func:`renamed`: old prefix -> new prefix (None: dropped).
STAGE1_TO_STAGE2 = {"convnet.fc.": "fc.", "convnet.": "backbone."}
STAGE2_TO_STAGE1 = {"backbone.": "convnet.", "fc.": "convnet.fc."}
# The authors' GNet (docs/original.md §5.2): the ResNet under CNet.resnet.convnet.*, CNet.* or both (the nested
# copy then wins); the fc inside CNet is stage 1's, not the trained one.
ORIGINAL_TO_STAGE2 = {"attentionNet.": "deformer.", "toWeight.": "deformer.toWeight.",
                      "CNet.resnet.convnet.fc.": None, "CNet.resnet.convnet.": "backbone.", "CNet.fc.": None,
                      "CNet.resnet.": None, "CNet.": "backbone.", "": ""}


def checkpoint_kind(state: dict[str, torch.Tensor]) -> str:
    """``original`` (the authors' GNet), ``stage2`` (ours), ``stage1`` (``convnet.*``) or ``unknown``."""
    return next((kind for kind, prefixes in KINDS.items() if any(k.startswith(prefixes) for k in state)), "unknown")


def renamed(state: dict[str, torch.Tensor], prefixes: dict[str, str | None]) -> dict[str, torch.Tensor]:
    """``state``'s keys renamed by the first of ``prefixes`` each starts with; keys that match none are dropped."""
    out = {}
    for key, value in state.items():
        old = next((prefix for prefix in prefixes if key.startswith(prefix)), None)
        if old is not None and prefixes[old] is not None:
            out[prefixes[old] + key[len(old):]] = value
    return out


def convert_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The authors' keys renamed: ``attentionNet.*``, ``toWeight.*`` -> ``deformer.*``; ``CNet.*`` -> ``backbone.*``."""
    nested = any(k.startswith("CNet.resnet.convnet.") for k in state)
    out = renamed(state, {**ORIGINAL_TO_STAGE2, "CNet.": None if nested else "backbone."})
    if "scale" in out:
        out["scale"] = out["scale"].reshape(1)
    return out


def _load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path | str, what: str) -> None:
    """Load ``state`` into ``model``, else :class:`CheckpointError` naming the first missing, unexpected and
    differently shaped keys; a ``num_batches_tracked`` PyTorch 0.4.0 (the authors') did not write is the model's."""
    own = model.state_dict()
    counts = {k: v.clone() for k, v in own.items() if k.endswith(".num_batches_tracked") and k not in state
              and k[:-len("num_batches_tracked")] + "running_mean" in state}
    state = {**state, **counts}
    problems = {"missing keys": [k for k in own if k not in state],
                "unexpected keys": [k for k in state if k not in own],
                "shape mismatch": [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
                                   if k in state and state[k].shape != own[k].shape]}
    parts = [f"{label}: {', '.join(keys[:4])}" + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")
             for label, keys in problems.items() if keys]
    if parts:
        raise CheckpointError(f"{path}: does not fit {what} ({'; '.join(parts)})")
    model.load_state_dict(state)


def load_idemenet(path: Path | str, **model_args) -> IDeMeNet:
    """An :class:`IDeMeNet` (``model_args``; ``num_classes`` and ``backbone`` default to the file's) from a stage-1
    file (fresh deformation, scale 1), ours or the authors' ``metaNet_*shot.t7``; else :class:`CheckpointError`."""
    state = load_state_dict(path)
    kind = checkpoint_kind(state)
    if kind == "unknown":
        raise CheckpointError(f"{path}: neither a stage-1 (convnet.*) nor a stage-2 (backbone.*, deformer.*, "
                              f"attentionNet.*, CNet.*) state dict; first keys: {', '.join(list(state)[:3])}")
    if kind == "original":
        state = convert_original(state)
    prefix = "convnet." if kind == "stage1" else ""
    if "num_classes" not in model_args and f"{prefix}fc.weight" in state:
        model_args["num_classes"] = state[f"{prefix}fc.weight"].shape[0]
    if "backbone" not in model_args:
        model_args["backbone"] = infer_backbone(state, prefix or "backbone.", path)
    model = IDeMeNet(**model_args)
    if kind == "stage1":  # deformation and scale as built; a deformer may start from the ResNet too
        deformer = model.deformer.state_from_embedding(renamed(state, {"convnet.fc.": None, "convnet.": ""}))
        state = {**model.state_dict(), **renamed(state, STAGE1_TO_STAGE2),
                 **{"deformer." + key: value for key, value in deformer.items()}}
    _load_strict(model, state, path, f"IDeMeNet({model.backbone_name}, {model.deform_net}, image size "
                                     f"{model.image_size}, grid {model.fang}x{model.fang})")
    return model


def load_embedding(path: Path | str, num_classes: int | None = None) -> EmbeddingNet:
    """An :class:`EmbeddingNet` from a stage-1 file (``softRandom.t7`` too) or a stage-2 file's embedding."""
    state = load_state_dict(path)
    kind = checkpoint_kind(state)
    if kind in ("original", "stage2"):
        state = renamed(convert_original(state) if kind == "original" else state, STAGE2_TO_STAGE1)
    elif kind != "stage1":
        raise CheckpointError(f"{path}: not a stage-1 state dict (keys convnet.*); "
                              f"first keys: {', '.join(list(state)[:3])}")
    classes = num_classes or state["convnet.fc.weight"].shape[0]
    model = EmbeddingNet(classes, infer_backbone(state, "convnet.", path))
    _load_strict(model, state, path, f"EmbeddingNet({model.backbone_name}, {classes} classes)")
    return model


def with_embedding_statistics(state: dict[str, torch.Tensor],
                              embedding: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (layout kept) with its embedding's BatchNorm running statistics taken from ``embedding``."""
    prefixes = {"stage1": ("convnet.",), "stage2": ("backbone.",),
                "original": ("CNet.resnet.convnet.", "CNet.")}.get(checkpoint_kind(state))
    if prefixes is None:
        raise CheckpointError("not a stage-1 or stage-2 state dict")
    out = dict(state)
    for key, value in embedding.items():
        if key.endswith((".running_mean", ".running_var")):
            names = [prefix + key[len("convnet."):] for prefix in prefixes if prefix + key[len("convnet."):] in state]
            if not names:
                raise CheckpointError(f"no {key[len('convnet.'):]} in the file's embedding")
            out.update({name: value.to(state[name].dtype).clone() for name in names})
    return out
