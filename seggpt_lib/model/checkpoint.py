"""Read and write SegGPT weights in every format users bring, mapped onto the official names.

Formats understood by :func:`load_weights`:

* ``official``: the official ``seggpt_vit_large.pth`` pickle, ``{"model": state_dict}``;
* a bare state dict (``.pth``/``.pt``/``.bin``) with official names;
* HuggingFace (``BAAI/seggpt-vit-large``): ``model.safetensors`` / ``pytorch_model.bin`` or
  their folder, names mapped by :func:`hf_to_official`;
* the project's own ``.safetensors`` (official names, the model config in the metadata) and
  training checkpoint folders (``.../checkpoints/last`` holding ``model.safetensors``).

Pickles are always read with ``torch.load(..., weights_only=True)`` (:func:`safe_torch_load`): a
checkpoint never runs code, and a file that is not one gets a one-line error naming it.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from seggpt_lib.model.attention import resize_rel_pos
from seggpt_lib.model.seggpt import SegGPT, SegGPTConfig, preset_config, resize_abs_pos

StateDict = dict[str, torch.Tensor]


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, or does not fit the model."""


# ------------------------------------------------------------------------------------------
# name mapping official <-> HuggingFace
# ------------------------------------------------------------------------------------------
# (official pattern, HF pattern); ``{i}`` is a block index.
_NAME_PAIRS: list[tuple[str, str]] = [
    ("mask_token", "model.embeddings.mask_token"),
    ("segment_token_x", "model.embeddings.segment_token_input"),
    ("segment_token_y", "model.embeddings.segment_token_prompt"),
    ("type_token_cls", "model.embeddings.type_token_semantic"),
    ("type_token_ins", "model.embeddings.type_token_instance"),
    ("pos_embed", "model.embeddings.position_embeddings"),
    ("patch_embed.proj.", "model.embeddings.patch_embeddings.projection."),
    ("blocks.{i}.norm1.", "model.encoder.layers.{i}.layernorm_before."),
    ("blocks.{i}.attn.qkv.", "model.encoder.layers.{i}.attention.qkv."),
    ("blocks.{i}.attn.proj.", "model.encoder.layers.{i}.attention.proj."),
    ("blocks.{i}.attn.rel_pos_h", "model.encoder.layers.{i}.attention.rel_pos_h"),
    ("blocks.{i}.attn.rel_pos_w", "model.encoder.layers.{i}.attention.rel_pos_w"),
    ("blocks.{i}.norm2.", "model.encoder.layers.{i}.layernorm_after."),
    ("blocks.{i}.mlp.fc1.", "model.encoder.layers.{i}.mlp.lin1."),
    ("blocks.{i}.mlp.fc2.", "model.encoder.layers.{i}.mlp.lin2."),
    ("norm.", "model.encoder.layernorm."),
    ("decoder_embed.", "decoder.decoder_embed."),
    ("decoder_pred.0.", "decoder.decoder_pred.conv."),
    ("decoder_pred.1.", "decoder.decoder_pred.layernorm."),
    ("decoder_pred.3.", "decoder.decoder_pred.head."),
]


def _compile(pairs: list[tuple[str, str]], reverse: bool) -> list[tuple[re.Pattern[str], str]]:
    out = []
    for off, hf in pairs:
        src, dst = (hf, off) if reverse else (off, hf)
        pat = re.escape(src).replace(re.escape("{i}"), r"(\d+)")
        rep = dst.replace("{i}", r"\1")
        out.append((re.compile("^" + pat), rep))
    return out


_TO_HF = _compile(_NAME_PAIRS, reverse=False)
_TO_OFFICIAL = _compile(_NAME_PAIRS, reverse=True)


def _rename(sd: Mapping[str, torch.Tensor], rules: list[tuple[re.Pattern[str], str]], what: str) -> StateDict:
    out: StateDict = {}
    unknown = []
    for name, t in sd.items():
        for pat, rep in rules:
            if pat.match(name):
                out[pat.sub(rep, name, count=1)] = t
                break
        else:
            unknown.append(name)
    if unknown:
        raise CheckpointError(f"{what}: tensors with no counterpart: {unknown[:10]}{' ...' if len(unknown) > 10 else ''}")
    return out


def official_to_hf(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Official / project names -> ``transformers.SegGptForImageSegmentation`` names."""
    return _rename(sd, _TO_HF, "official -> HF")


def hf_to_official(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """``transformers`` SegGPT names -> official names (the timm ``checkpoint_filter_fn`` idea)."""
    return _rename(sd, _TO_OFFICIAL, "HF -> official")


def is_hf_state_dict(sd: Mapping[str, Any]) -> bool:
    return any(k.startswith(("model.embeddings.", "model.encoder.", "decoder.decoder_")) for k in sd)


def hf_config_kwargs(cfg: SegGPTConfig) -> dict[str, Any]:
    """Arguments for ``transformers.SegGptConfig`` describing the same network."""
    return dict(
        hidden_size=cfg.embed_dim,
        num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.num_heads,
        hidden_act="gelu",
        layer_norm_eps=cfg.layer_norm_eps,
        image_size=list(cfg.img_size),
        patch_size=cfg.patch_size,
        num_channels=cfg.in_chans,
        qkv_bias=cfg.qkv_bias,
        mlp_dim=int(cfg.embed_dim * cfg.mlp_ratio),
        drop_path_rate=cfg.drop_path_rate,
        pretrain_image_size=cfg.pretrain_img_size,
        decoder_hidden_size=cfg.decoder_embed_dim,
        use_relative_position_embeddings=True,
        merge_index=cfg.merge_index,
        intermediate_hidden_state_indices=list(cfg.out_indices),
        beta=cfg.loss_beta,
    )


def config_from_hf(hf: Mapping[str, Any]) -> SegGPTConfig:
    """The inverse of :func:`hf_config_kwargs`, from an HF ``config.json`` dict."""
    mlp = hf.get("mlp_dim") or 4 * hf["hidden_size"]
    return SegGPTConfig(
        img_size=tuple(hf.get("image_size", (896, 448))),
        patch_size=hf.get("patch_size", 16),
        in_chans=hf.get("num_channels", 3),
        embed_dim=hf["hidden_size"],
        depth=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        mlp_ratio=mlp / hf["hidden_size"],
        qkv_bias=hf.get("qkv_bias", True),
        drop_path_rate=hf.get("drop_path_rate", 0.1),
        decoder_embed_dim=hf.get("decoder_hidden_size", 64),
        pretrain_img_size=hf.get("pretrain_image_size", 224),
        out_indices=tuple(hf.get("intermediate_hidden_state_indices", (5, 11, 17, 23))),
        merge_index=hf.get("merge_index", 2),
        layer_norm_eps=hf.get("layer_norm_eps", 1e-6),
        loss_beta=hf.get("beta", 0.01),
    )


# ------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _strip_wrappers(sd: Mapping[str, torch.Tensor]) -> StateDict:
    out = {}
    for k, v in sd.items():
        changed = True
        while changed:
            changed = False
            for p in _WRAPPER_PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p) :], True
        out[k] = v
    return out


def _resolve(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    if p.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin", "weights.safetensors"):
            if (p / name).is_file():
                return p / name
        raise CheckpointError(f"{p}: folder holds no model.safetensors or pytorch_model.bin")
    return p


_TORCH_ADVICE = ("weights only load failed", "weights_only", "torch.serialization", "check the documentation",
                 "do those steps only", "please file an issue", "this file can still be loaded")


def _one_line(text: str, limit: int = 200) -> str:
    """The informative line of an exception message, without PyTorch's advice to turn safety off."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    lines = [ln.strip(" \t.") for ln in text.splitlines()]
    keep = [ln for ln in lines if ln and not any(a in ln.lower() for a in _TORCH_ADVICE)]
    line = keep[0] if keep else (lines[0] if lines else "")
    line = line.replace("WeightsUnpickler error: ", "").split(". ")[0]  # the first sentence
    return line if len(line) <= limit else line[: limit - 3] + "..."


def safe_torch_load(path: str | os.PathLike[str], what: str = "checkpoint",
                    hint: str = "use a .safetensors file or a plain state dict of tensors") -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain containers only, never code.

    Every failure is a one-line :class:`CheckpointError` naming the file and what is wrong: empty,
    not a PyTorch file (corrupt, truncated, another format), or holding Python objects that only
    an unsafe load could build (refused: loading them could run code).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} not found: {p}")
    if p.stat().st_size == 0:
        raise CheckpointError(f"{p}: empty file (0 bytes), not a {what}")
    try:
        with warnings.catch_warnings():  # garbage often "looks like" another pickle protocol: the error says it
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if re.search(r"was not an allowed global|is blocked|must be \S+ to load", msg):
            g = re.search(r"GLOBAL (\S+)", msg)
            obj = f"a Python object ({g.group(1)})" if g else "Python objects"
            raise CheckpointError(
                f"{p}: cannot be read safely: it holds {obj} that only an unsafe load could build, and loading "
                f"it could run code; it was not loaded ({hint})") from None
        raise CheckpointError(f"{p}: not a readable {what} (corrupt, truncated or another format: {_one_line(msg)})") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, AttributeError, TypeError, IndexError) as e:
        raise CheckpointError(f"{p}: not a readable {what} (corrupt, truncated or another format: "
                              f"{type(e).__name__}: {_one_line(str(e))})") from None


def read_state_dict(path: str | os.PathLike[str]) -> tuple[StateDict, SegGPTConfig | None]:
    """Read any supported file into official names; also return the config when the file says it."""
    p = _resolve(path)
    cfg: SegGPTConfig | None = None
    if p.stat().st_size == 0:
        raise CheckpointError(f"{p}: empty file (0 bytes), not a checkpoint")
    try:
        if p.suffix == ".safetensors":
            sd = load_file(str(p))

            with safe_open(str(p), framework="pt") as f:
                meta = f.metadata() or {}
            if "seggpt_config" in meta:
                cfg = SegGPTConfig.from_dict(json.loads(meta["seggpt_config"]))
        else:
            obj = safe_torch_load(p)
            if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
                obj = obj["model"]
            elif isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
                obj = obj["state_dict"]
            if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
                raise CheckpointError(f"{p}: not a state dict (expected name -> tensor)")
            sd = dict(obj)
    except (CheckpointError, FileNotFoundError):
        raise
    except (SafetensorError, RuntimeError, EOFError, OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{p}: cannot read checkpoint (truncated or not a checkpoint): {_one_line(str(e))}") from None
    except Exception as e:  # anything else a broken file raises
        raise CheckpointError(f"{p}: cannot read checkpoint: {type(e).__name__}: {_one_line(str(e))}") from None
    sd = _strip_wrappers(sd)
    if is_hf_state_dict(sd):
        sd = hf_to_official(sd)
        hf_cfg = p.parent / "config.json"
        if cfg is None and hf_cfg.is_file():
            try:
                cfg = config_from_hf(json.loads(hf_cfg.read_text()))
            except (KeyError, ValueError, TypeError):
                cfg = None
    if cfg is None:
        cfg_file = p.parent / "config.json"
        if cfg_file.is_file():
            try:
                d = json.loads(cfg_file.read_text())
                d = d.get("model", d) if isinstance(d, dict) else d
                cfg = SegGPTConfig.from_dict(d)
            except (ValueError, TypeError):
                cfg = None
    return sd, cfg


def adapt_state_dict(sd: StateDict, model: SegGPT) -> StateDict:
    """Resize ``pos_embed`` (bicubic, cls slot kept) and relative-position tables (linear)."""
    out = dict(sd)
    target = model.state_dict()
    if "pos_embed" in out and out["pos_embed"].shape != target["pos_embed"].shape:
        src = out["pos_embed"]
        if src.ndim == 3 and src.shape[-1] == target["pos_embed"].shape[-1]:
            n = target["pos_embed"].shape[1] - 1
            side = int(n**0.5)

            grid = resize_abs_pos(src, (side, side)).reshape(1, n, -1)
            out["pos_embed"] = torch.cat([src[:, :1], grid], dim=1)
    for name, t in target.items():
        if name.endswith(("rel_pos_h", "rel_pos_w")) and name in out:
            src = out[name]
            if src.shape != t.shape and src.ndim == 2 and src.shape[1] == t.shape[1]:
                out[name] = resize_rel_pos(src, t.shape[0])
    return out


def check_state_dict(sd: Mapping[str, torch.Tensor], model: SegGPT, source: str = "checkpoint") -> None:
    """Raise :class:`CheckpointError` naming every missing, unexpected or mis-shaped tensor."""
    target = model.state_dict()
    missing = sorted(set(target) - set(sd))
    unexpected = sorted(set(sd) - set(target))
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(target[k].shape)}" for k in target if k in sd and sd[k].shape != target[k].shape]
    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {missing[:12]}{' ...' if len(missing) > 12 else ''}")
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {unexpected[:12]}{' ...' if len(unexpected) > 12 else ''}")
    if shapes:
        problems.append(f"mis-shaped tensors ({len(shapes)}): {shapes[:8]}{' ...' if len(shapes) > 8 else ''}")
    if problems:
        raise CheckpointError(f"{source} does not fit the model: " + "; ".join(problems))


def load_weights(model: SegGPT, path: str | os.PathLike[str], strict: bool = True) -> SegGPT:
    """Load any supported checkpoint into ``model`` (in place) and return it."""
    sd, _ = read_state_dict(path)
    sd = adapt_state_dict(sd, model)
    if strict:
        check_state_dict(sd, model, source=str(path))
    else:
        target = model.state_dict()
        sd = {k: v for k, v in sd.items() if k in target and v.shape == target[k].shape}
    model.load_state_dict(sd, strict=strict)
    return model


def build_from_checkpoint(path: str | os.PathLike[str], preset: str | None = None, **overrides: Any) -> SegGPT:
    """Build the model a checkpoint describes (its own config, else ``preset``) and load it."""

    sd, cfg = read_state_dict(path)
    if preset is not None:
        cfg = preset_config(preset, **overrides)
    elif cfg is None:
        raise CheckpointError(f"{path}: the file does not record its architecture; pass a preset (e.g. --preset vit_large)")
    elif overrides:
        cfg = SegGPTConfig.from_dict({**cfg.to_dict(), **overrides})
    model = SegGPT(cfg)
    sd = adapt_state_dict(sd, model)
    check_state_dict(sd, model, source=str(path))
    model.load_state_dict(sd)
    return model


# ------------------------------------------------------------------------------------------
# writing (atomic: temporary name, then rename)
# ------------------------------------------------------------------------------------------
def atomic_write(path: str | os.PathLike[str], write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``path``; a crash never leaves a half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _contiguous(sd: Mapping[str, torch.Tensor]) -> StateDict:
    return {k: v.detach().cpu().contiguous() for k, v in sd.items()}


def save_weights(model: SegGPT, path: str | os.PathLike[str], format: str = "safetensors") -> Path:
    """Write the weights as ``safetensors`` (ours, config in metadata), ``official`` or ``hf`` (a folder)."""
    sd = _contiguous(model.state_dict())
    cfg = model.cfg
    if format == "safetensors":
        meta = {"seggpt_config": cfg.to_json(), "format": "seggpt-defects"}
        return atomic_write(path, lambda tmp: save_file(sd, tmp, metadata=meta))
    if format == "official":
        return atomic_write(path, lambda tmp: torch.save({"model": sd}, tmp))
    if format == "hf":
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        hf_sd = official_to_hf(sd)
        atomic_write(folder / "model.safetensors", lambda tmp: save_file(hf_sd, tmp, metadata={"format": "pt"}))
        hf_cfg = {"model_type": "seggpt", "architectures": ["SegGptForImageSegmentation"], **hf_config_kwargs(cfg)}
        atomic_write(folder / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(hf_cfg, indent=2)))
        return folder
    raise ValueError(f"unknown format {format!r}; choose safetensors, official or hf")
