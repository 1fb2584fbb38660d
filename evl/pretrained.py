"""CLIP weights named as open_clip names them: a model and a pretrained tag (``ViT-B-16`` +
``openai``), or an ``hf-hub:ORG/REPO`` model whose Hugging Face repository holds its config
(``open_clip_config.json``) and weights.

The names are resolved by open_clip's own code (``get_pretrained_cfg``, ``download_pretrained``,
``download_pretrained_from_hf``), which keeps files in huggingface_hub's cache (``HF_HOME``,
``HF_HUB_CACHE``; with ``HF_HUB_OFFLINE=1`` only the cache is read): a file open_clip has
fetched once is found here without a download, and the other way round. What comes out is a
file path, which :func:`evl.weights.load_backbone_weights` reads like any other weights file
(safetensors, or ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import json
import os
import warnings

from .weights import WeightsError

__all__ = ["HF_HUB_PREFIX", "PretrainedError", "is_hf_hub", "hub_cache_dir", "tag_config", "hub_config",
           "warn_normalisation", "weights_file"]

HF_HUB_PREFIX = "hf-hub:"
_HF_CONFIG = "open_clip_config.json"


class PretrainedError(WeightsError):
    """Weights named by tag or ``hf-hub:`` repository that cannot be had: an unknown tag, or files
    neither in the Hugging Face cache nor downloadable."""


def is_hf_hub(backbone: str | None) -> bool:
    return bool(backbone) and backbone.startswith(HF_HUB_PREFIX)


def hub_cache_dir() -> str:
    """huggingface_hub's cache directory (``HF_HUB_CACHE``, else ``HF_HOME/hub``), where open_clip's
    downloads go."""
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _unavailable(what: str, source: str, error: BaseException,
                 instead: str = "pass --backbone_path FILE") -> PretrainedError:
    """The one-line error for files that are neither cached nor downloadable."""
    if _offline():
        why = "HF_HUB_OFFLINE=1 forbids downloading them: run once with network access"
    else:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        why = f"downloading failed ({reason})"
    return PretrainedError(f"{what} ({source}) not found in the Hugging Face cache {hub_cache_dir()}, and {why}, "
                           f"or {instead}")


def tag_config(model: str, tag: str) -> dict:
    """open_clip's record of ``model``'s pretrained ``tag`` (where its weights are, its activation
    and normalisation); a tag open_clip does not know for ``model`` is a :class:`PretrainedError`
    listing the ones it does."""
    import open_clip

    if is_hf_hub(model):
        raise PretrainedError(f"--pretrained {tag}: {model} names its weights itself (its repository's); "
                              "leave out --pretrained")
    cfg = open_clip.get_pretrained_cfg(model, tag)
    if cfg:
        return dict(cfg)
    tags = open_clip.list_pretrained_tags_by_model(model)
    if tags:
        raise PretrainedError(f"--pretrained {tag}: not a pretrained tag of open_clip's {model}; its tags: "
                              f"{', '.join(tags)}")
    others = open_clip.list_pretrained_models_by_tag(tag)
    hint = f" (models with tag {tag}: {', '.join(others[:12])}{', ...' if len(others) > 12 else ''})" if others else ""
    raise PretrainedError(f"--pretrained {tag}: open_clip has no pretrained weights for {model}{hint}")


def hub_config(backbone: str) -> dict:
    """The ``open_clip_config.json`` of an ``hf-hub:ORG/REPO`` model (``model_cfg``,
    ``preprocess_cfg``), from the Hugging Face cache or the Hub, as ``open_clip.create_model``
    reads it."""
    from open_clip.pretrained import download_pretrained_from_hf

    repo = backbone[len(HF_HUB_PREFIX):]
    if not repo:
        raise PretrainedError(f"--backbone {backbone}: no repository after {HF_HUB_PREFIX}")
    try:
        path = download_pretrained_from_hf(repo, filename=_HF_CONFIG)
    except (OSError, RuntimeError) as e:
        raise _unavailable(f"--backbone {backbone}: {_HF_CONFIG}", f"Hugging Face repository {repo}", e,
                          "pass the path of a local copy as --backbone") from None
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PretrainedError(f"--backbone {backbone}: {path}: not a valid open_clip config: {e}") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model_cfg"), dict):
        raise PretrainedError(f"--backbone {backbone}: {path} has no model_cfg: not an open_clip model repository")
    return cfg


def warn_normalisation(what: str, mean, std) -> None:
    """Warn when weights were trained on inputs normalised otherwise than CLIP's: every pipeline
    normalises with CLIP's mean and std, so the frozen tower sees inputs it was not trained on."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    def other(given, clip) -> bool:
        return given is not None and any(abs(float(a) - b) > 1e-6 for a, b in zip(given, clip))

    if other(mean, OPENAI_DATASET_MEAN) or other(std, OPENAI_DATASET_STD):
        warnings.warn(f"{what} was trained on frames normalised with mean {tuple(mean or ())} and std "
                      f"{tuple(std or ())}, but the pipelines normalise with CLIP's {OPENAI_DATASET_MEAN} and "
                      f"{OPENAI_DATASET_STD}", stacklevel=3)


def weights_file(backbone: str, pretrained: str | None = None) -> str | None:
    """The weights file open_clip loads for ``backbone`` + ``pretrained`` tag, or for an
    ``hf-hub:`` ``backbone`` (its repository's ``open_clip_model.safetensors``, else
    ``open_clip_pytorch_model.bin``), from the Hugging Face cache or downloaded into it; ``None``
    when neither names weights. Raises :class:`PretrainedError`, naming the tag or repository and
    the cache, when the file can be had neither way."""
    from open_clip.pretrained import download_pretrained, download_pretrained_from_hf

    if is_hf_hub(backbone):
        if pretrained:
            tag_config(backbone, pretrained)  # raises: the repository names its weights
        repo = backbone[len(HF_HUB_PREFIX):]
        try:
            return download_pretrained_from_hf(repo)
        except (OSError, RuntimeError) as e:
            raise _unavailable(f"--backbone {backbone}: weights", f"Hugging Face repository {repo}", e) from None
    if not pretrained:
        return None
    cfg = tag_config(backbone, pretrained)
    source = (f"Hugging Face repository {cfg['hf_hub'].rstrip('/')}" if cfg.get("hf_hub")
              else cfg.get("url") or cfg.get("file") or "no source")
    try:
        path = download_pretrained(cfg)
    except (OSError, RuntimeError) as e:
        raise _unavailable(f"--pretrained {pretrained} of {backbone}: weights", source, e) from None
    if not path or not os.path.isfile(path):
        raise PretrainedError(f"--pretrained {pretrained} of {backbone}: open_clip gives no weights file for it "
                              f"({path or 'none'})")
    return path
