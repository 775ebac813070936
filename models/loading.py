"""Building networks from checkpoints: ours, and the authors' released files (docs/original.md §5)."""
from __future__ import annotations

from pathlib import Path

import torch

from models.embedding import EmbeddingNet, backbone_from_embedding, infer_backbone
from models.idemenet import IDeMeNet
from utils.checkpoint import describe_mismatch, load_state_dict
from utils.errors import CheckpointError


def checkpoint_kind(state: dict[str, torch.Tensor]) -> str:
    """``stage1`` (``convnet.*``), ``original`` (the authors' GNet) or ``stage2`` (ours)."""
    keys = set(state)
    if any(k.startswith(("attentionNet.", "CNet.")) for k in keys):
        return "original"
    if any(k.startswith(("backbone.", "deformer.")) for k in keys):
        return "stage2"
    if any(k.startswith("convnet.") for k in keys):
        return "stage1"
    return "unknown"


def convert_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The authors' keys renamed: ``attentionNet.*``, ``toWeight.*`` -> ``deformer.*``; ``CNet.*`` -> ``backbone.*``."""
    nested = "CNet.resnet.convnet."
    has_nested = any(k.startswith(nested) for k in state)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("attentionNet."):
            out["deformer." + key[len("attentionNet."):]] = value
        elif key.startswith("toWeight."):
            out["deformer." + key] = value
        elif key.startswith(nested):
            rest = key[len(nested):]
            if not rest.startswith("fc."):
                out["backbone." + rest] = value
        elif key.startswith("CNet."):
            rest = key[len("CNet."):]
            if not has_nested and not rest.startswith(("fc.", "resnet.")):
                out["backbone." + rest] = value
        else:
            out[key] = value
    if "scale" in out:
        out["scale"] = out["scale"].reshape(1)
    return out


def _from_stage1(model: IDeMeNet, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A full IDeMeNet state dict whose embedding and fc come from a stage-1 file."""
    body, fc = backbone_from_embedding(state)
    full = model.state_dict()
    full.update({"backbone." + k: v for k, v in body.items()})
    full.update({"fc." + k: v for k, v in fc.items()})
    full.update({"deformer." + k: v for k, v in model.deformer.state_from_embedding(body).items()})
    return full


def _load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path | str, what: str) -> None:
    # PyTorch 0.4.0 (the authors') wrote no ``num_batches_tracked``: a missing one is the model's (0).
    own = model.state_dict()
    state = dict(state)
    for key, value in own.items():
        if key.endswith(".num_batches_tracked") and key not in state \
                and key[:-len("num_batches_tracked")] + "running_mean" in state:
            state[key] = value.clone()
    problem = describe_mismatch(model, state)
    if problem:
        raise CheckpointError(f"{path}: does not fit {what} ({problem})")
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
    fc_key = "convnet.fc.weight" if kind == "stage1" else "fc.weight"
    if "num_classes" not in model_args and fc_key in state:
        model_args["num_classes"] = state[fc_key].shape[0]
    if "backbone" not in model_args:
        model_args["backbone"] = infer_backbone(state, "convnet." if kind == "stage1" else "backbone.", path)
    model = IDeMeNet(**model_args)
    if kind == "stage1":
        state = _from_stage1(model, state)
    _load_strict(model, state, path, f"IDeMeNet({model.backbone_name}, {model.deform_net}, image size "
                                     f"{model.image_size}, grid {model.fang}x{model.fang})")
    return model


def load_embedding(path: Path | str, num_classes: int | None = None) -> EmbeddingNet:
    """An :class:`EmbeddingNet` from a stage-1 file (``softRandom.t7`` too) or a stage-2 file's embedding."""
    state = load_state_dict(path)
    kind = checkpoint_kind(state)
    if kind in ("original", "stage2"):
        body = convert_original(state) if kind == "original" else state
        state = {("convnet." + k[len("backbone."):]): v for k, v in body.items() if k.startswith("backbone.")}
        state.update({("convnet." + k): v for k, v in body.items() if k.startswith("fc.")})
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
        if not key.endswith((".running_mean", ".running_var")):
            continue
        names = [prefix + key[len("convnet."):] for prefix in prefixes if prefix + key[len("convnet."):] in state]
        if not names:
            raise CheckpointError(f"no {key[len('convnet.'):]} in the file's embedding")
        for name in names:
            out[name] = value.to(state[name].dtype).clone()
    return out
