"""Weight files: CLIP backbone weights in, reference-implementation key layout in and out (spec §3).

CLIP weights come from OpenAI's TorchScript archives (``ViT-B-16.pt``), full CLIP state dicts
in OpenAI/open_clip naming (possibly wrapped in ``{'state_dict': ...}`` with DDP prefixes), or
visual-only state dicts, as PyTorch files or as safetensors files (the same key conventions).
Nothing here unpickles arbitrary objects: safetensors files are read by ``safetensors`` (a JSON
header and raw tensor bytes), plain files go through ``torch.load(weights_only=True)`` and
TorchScript archives through ``torch.jit.load``, whose constants are tensors and whose code only
runs if the module is called (we only read its state dict).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import struct
import warnings
import zipfile
from typing import Any, Mapping

import torch

from pipelines import files
from torch import nn

__all__ = [
    "WeightsError", "safe_load", "file_sha256", "is_safetensors", "read_safetensors", "read_clip_state_dict",
    "load_backbone_weights", "load_visual_state", "strip_prefix", "to_reference_state_dict",
]

# Keys of CLIP's visual tower that EVL never uses; a file may or may not have them.
UNUSED_VISUAL_KEYS = ("ln_post.weight", "ln_post.bias", "proj")


class WeightsError(ValueError):
    """A weights or checkpoint file that cannot be used, with the file named in the message."""


def file_sha256(path: str) -> str:
    """The sha256 of a file's bytes. Of a folder (a model ``evl.export`` wrote), the sha256 of one
    ``<relative path> <sha256>`` line per file in it, sorted, leaving out its ``README.md``: the
    model card may be edited without changing what the folder holds."""
    if not os.path.isdir(path):
        return files.file_sha256(path)
    lines = []
    for root, dirs, names in os.walk(path):
        dirs.sort()
        for name in sorted(names):
            rel = os.path.relpath(os.path.join(root, name), path)
            if rel != "README.md" and not name.startswith("."):
                lines.append(f"{rel} {files.file_sha256(os.path.join(root, name))}\n")
    return hashlib.sha256("".join(sorted(lines)).encode()).hexdigest()


def is_safetensors(path: str) -> bool:
    """Whether ``path`` starts like a safetensors file: an 8-byte little-endian header length that
    fits in the file, then the header's JSON object."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 0 < n <= size - 8


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, on CPU; a file that is not one is a ``WeightsError``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise FileNotFoundError(f"file not found: {path}")
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        with open(path, "rb") as f:
            magic = f.read(2)
        pytorch = magic == b"PK" or magic[:1] == b"\x80"  # a zip archive, or a pickle
        hint = " (it is a PyTorch file: give it a .pt name)" if pytorch else " (truncated or corrupt?)"
        raise WeightsError(f"{path}: not a readable safetensors file{hint}: {first}") from None


def _is_torchscript(path: str) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


def safe_load(path: str) -> Any:
    """``torch.load(weights_only=True)`` on CPU with errors that name the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError(f"{path}: refused: loading it would unpickle arbitrary objects "
                           f"(only tensors, dicts, lists and numbers are accepted): {first}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise WeightsError(f"{path}: not a readable PyTorch file (truncated or corrupt?): {e}") from None


def read_clip_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The raw tensors of a CLIP weights file, as float32, whatever its container."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CLIP weights file not found: {path}")
    if path.endswith(".safetensors") or is_safetensors(path):
        sd: Any = read_safetensors(path)
    elif _is_torchscript(path):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # jit is deprecated; OpenAI's files are jit
                sd = torch.jit.load(path, map_location="cpu").state_dict()
        except RuntimeError as e:
            raise WeightsError(f"{path}: unreadable TorchScript archive: {e}") from None
    else:
        sd = safe_load(path)
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(sd, Mapping) and isinstance(sd.get(wrapper), Mapping):
            sd = sd[wrapper]
    tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)} if isinstance(sd, Mapping) else {}
    if not tensors:
        raise WeightsError(f"{path}: expected a state dict of CLIP weights, found {type(sd).__name__} "
                           "without tensors")
    return {k: (v.float() if v.is_floating_point() else v) for k, v in tensors.items()}


def strip_prefix(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Drop ``prefix`` from the keys that have it (DDP's ``module.``, CLIP's ``visual.``)."""
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in sd.items()}


def _visual_part(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    sd = strip_prefix(sd, "module.")
    if any(k.startswith("visual.") for k in sd):
        return {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
    if "patch_embed.proj.weight" in sd and "blocks.0.attn.q_proj.weight" in sd:
        return from_reference_backbone(sd)
    return dict(sd)  # a visual-only state dict


# The reference implementation's own ViT (VisionTransformer2D) -> open_clip names, per block.
_REFERENCE_BLOCK = {"attn.out_proj.weight": "attn.out_proj.weight", "attn.out_proj.bias": "attn.out_proj.bias",
                    "mlp.fc1.weight": "mlp.c_fc.weight", "mlp.fc1.bias": "mlp.c_fc.bias",
                    "mlp.fc2.weight": "mlp.c_proj.weight", "mlp.fc2.bias": "mlp.c_proj.bias",
                    "norm1.weight": "ln_1.weight", "norm1.bias": "ln_1.bias",
                    "norm2.weight": "ln_2.weight", "norm2.bias": "ln_2.bias"}


def from_reference_backbone(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict of the reference implementation's ViT in OpenAI/open_clip naming.

    Its patch embedding is a Linear over flattened ``(3, p, p)`` patches with a bias; open_clip's
    conv has none, so the bias moves into the patch tokens' positional embedding (the two are
    summed before anything else touches them).
    """
    w = sd["patch_embed.proj.weight"]
    width = w.shape[0]
    patch = round((w.shape[1] // 3) ** 0.5)
    pos = sd["pos_embed"].clone()
    pos[1:] += sd.get("patch_embed.proj.bias", torch.zeros(width))
    out = {"conv1.weight": w.reshape(width, 3, patch, patch), "class_embedding": sd["cls_token"],
           "positional_embedding": pos}
    if "ln_pre.weight" in sd:
        out.update({"ln_pre.weight": sd["ln_pre.weight"], "ln_pre.bias": sd["ln_pre.bias"]})
    i = 0
    while f"blocks.{i}.attn.q_proj.weight" in sd:
        src, dst = f"blocks.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat([sd[f"{src}attn.{n}_proj.{kind}"] for n in "qkv"])
        out.update({dst + theirs: sd[src + ours] for ours, theirs in _REFERENCE_BLOCK.items()})
        i += 1
    return out


def describe_visual(sd: Mapping[str, torch.Tensor]) -> str:
    """What ViT a visual state dict looks like, to make a mismatch error actionable."""
    conv = sd.get("conv1.weight")
    pos = sd.get("positional_embedding")
    if conv is None or conv.dim() != 4 or pos is None:
        return "not a CLIP ViT image tower (no conv1.weight / positional_embedding)"
    blocks = {k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")}
    grid = round((pos.shape[0] - 1) ** 0.5)
    return (f"a ViT of width {conv.shape[0]}, {len(blocks)} blocks, patch {conv.shape[-1]}, "
            f"{grid * conv.shape[-1]} px")


def load_backbone_weights(visual: nn.Module, path: str, spec=None) -> str:
    """Load CLIP weights into an open_clip visual tower, strictly; returns the file's sha256."""
    load_visual_state(visual, _visual_part(read_clip_state_dict(path)), path, spec)
    return file_sha256(path)


def load_visual_state(visual: nn.Module, src: Mapping[str, torch.Tensor], source: str, spec=None) -> None:
    """Copy a visual state dict (open_clip names) into ``visual``, strictly: every key EVL uses,
    no others, the same shapes; otherwise a ``WeightsError`` naming ``source``, with nothing copied."""
    dst = visual.state_dict()
    needed = {k for k in dst if k not in UNUSED_VISUAL_KEYS}
    missing = sorted(needed - src.keys())
    unexpected = sorted(k for k in src.keys() - dst.keys() if k not in UNUSED_VISUAL_KEYS)
    shapes = sorted(f"{k}: file {list(src[k].shape)} vs model {list(dst[k].shape)}"
                    for k in needed & src.keys() if src[k].shape != dst[k].shape)
    if missing or unexpected or shapes:
        what = spec.describe() if spec is not None else "the backbone"
        parts = [f"{source} does not fit {what}; the file holds {describe_visual(src)}."]
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                            ("shape mismatches", shapes)):
            if keys:
                more = f" (+{len(keys) - 5} more)" if len(keys) > 5 else ""
                parts.append(f"{label}: {', '.join(keys[:5])}{more}")
        raise WeightsError(" ".join(parts))
    with torch.no_grad():
        for k in dst.keys() & src.keys():
            if dst[k].shape == src[k].shape:  # an unused ln_post/proj of another size is skipped
                dst[k].copy_(src[k])


def to_reference_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's trainable weights in the reference implementation's released layout."""
    return {f"module.{k}": v for k, v in model.state_dict().items()}
