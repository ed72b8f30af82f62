"""Checkpoint formats: official pickle, bare state dict, HuggingFace, our safetensors; errors."""
from __future__ import annotations

import json

import pytest
import torch

from seggpt_lib import CheckpointError, build_from_checkpoint, build_seggpt, load_weights, save_weights
from seggpt_lib.model.checkpoint import (
    adapt_state_dict,
    check_state_dict,
    hf_to_official,
    official_to_hf,
    read_state_dict,
)


def _small(**kw):
    return build_seggpt("vit_tiny", depth=4, out_indices=(3,), embed_dim=64, num_heads=2, **kw)


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_official_vit_large_pickle_loads_strictly(tmp_path):
    """A file in the official layout: {"model": state_dict}, 354 tensors, official names and shapes.

    The tensors are stride-0 views of one number each, so the file stays a few KiB.
    """
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in build_seggpt("vit_large").state_dict().items()}
    sd = {k: torch.full((), float(i)).expand(shape) for i, (k, shape) in enumerate(shapes.items())}
    path = tmp_path / "seggpt_vit_large.pth"
    torch.save({"model": sd, "epoch": 0}, path)
    loaded, _ = read_state_dict(path)
    assert len(loaded) == 354
    with torch.device("meta"):
        dst = build_seggpt("vit_large")
    check_state_dict(adapt_state_dict(loaded, dst), dst, str(path))
    dst.load_state_dict(loaded, strict=True, assign=True)
    for i, (k, t) in enumerate(dst.state_dict().items()):
        assert t.shape == shapes[k] and t.flatten()[0].item() == float(i)


@pytest.mark.parametrize("fmt", ["safetensors", "official", "hf"])
def test_save_load_roundtrip_each_format(tmp_path, fmt):
    src = _small()
    path = tmp_path / {"safetensors": "w.safetensors", "official": "w.pth", "hf": "hf_dir"}[fmt]
    save_weights(src, path, format=fmt)
    dst = load_weights(_small(), path)
    assert _same_weights(src, dst)
    if fmt in ("safetensors", "hf"):  # these formats record the architecture
        rebuilt = build_from_checkpoint(path)
        assert rebuilt.cfg.embed_dim == 64 and rebuilt.cfg.depth == 4
        assert _same_weights(src, rebuilt)


def test_bare_state_dict_and_wrapper_prefixes(tmp_path):
    src = _small()
    path = tmp_path / "bare.pt"
    torch.save({f"module.{k}": v for k, v in src.state_dict().items()}, path)
    assert _same_weights(src, load_weights(_small(), path))


def test_hf_folder_loads_into_transformers_and_back(tmp_path):
    transformers = pytest.importorskip("transformers")
    src = _small()
    save_weights(src, tmp_path / "hf", format="hf")
    hf = transformers.SegGptForImageSegmentation.from_pretrained(tmp_path / "hf")
    assert set(hf.state_dict()) == set(official_to_hf(src.state_dict()))
    hf.save_pretrained(tmp_path / "hf2")  # transformers writes model.safetensors + config.json
    back = build_from_checkpoint(tmp_path / "hf2")
    assert _same_weights(src, back)


def test_name_mapping_roundtrip_is_bijective():
    with torch.device("meta"):
        sd = build_seggpt("vit_large").state_dict()
    hf = official_to_hf(sd)
    assert len(hf) == len(sd) == 354
    assert hf_to_official(hf).keys() == sd.keys()
    assert "model.encoder.layers.23.mlp.lin2.weight" in hf
    assert "decoder.decoder_pred.layernorm.bias" in hf


def test_resizes_position_tables_for_another_img_size(tmp_path):
    src = build_seggpt("vit_tiny", depth=4, out_indices=(3,), embed_dim=64, num_heads=2, pretrain_img_size=224)
    path = tmp_path / "w.safetensors"
    save_weights(src, path)
    dst = build_seggpt("vit_tiny", depth=4, out_indices=(3,), embed_dim=64, num_heads=2, img_size=(256, 128), pretrain_img_size=128)
    load_weights(dst, path)
    sd = dst.state_dict()
    assert sd["blocks.0.attn.rel_pos_h"].shape == (31, 32)
    assert sd["pos_embed"].shape == (1, 65, 64)
    assert torch.equal(sd["pos_embed"][:, :1], src.state_dict()["pos_embed"][:, :1])  # cls slot kept
    assert torch.equal(sd["blocks.0.attn.qkv.weight"], src.state_dict()["blocks.0.attn.qkv.weight"])


def test_missing_unexpected_misshaped_are_named(tmp_path):
    src = _small()
    sd = src.state_dict()
    sd.pop("blocks.1.norm1.weight")
    sd["blocks.9.extra"] = torch.zeros(1)
    sd["decoder_embed.bias"] = torch.zeros(7)
    path = tmp_path / "bad.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(CheckpointError) as e:
        load_weights(_small(), path)
    msg = str(e.value)
    assert "blocks.1.norm1.weight" in msg and "blocks.9.extra" in msg and "decoder_embed.bias" in msg
    assert str(path) in msg


def test_missing_and_truncated_files_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_weights(_small(), tmp_path / "nope.pth")
    good = tmp_path / "w.safetensors"
    save_weights(_small(), good)
    data = good.read_bytes()
    for name, blob in [("trunc.safetensors", data[: len(data) // 2]), ("trunc.pth", b"PK\x03\x04garbage"), ("empty.pt", b"")]:
        p = tmp_path / name
        p.write_bytes(blob)
        with pytest.raises(CheckpointError, match=name):
            load_weights(_small(), p)
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(CheckpointError, match="emptydir"):
        load_weights(_small(), tmp_path / "emptydir")


def test_checkpoint_never_runs_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (exec, ("raise SystemExit('pwned')",))

    path = tmp_path / "evil.pth"
    torch.save({"model": Evil()}, path)
    with pytest.raises(CheckpointError):
        load_weights(_small(), path)


def test_safetensors_metadata_records_config(tmp_path):
    from safetensors import safe_open

    path = save_weights(_small(), tmp_path / "w.safetensors")
    with safe_open(str(path), framework="pt") as f:
        cfg = json.loads(f.metadata()["seggpt_config"])
    assert cfg["embed_dim"] == 64 and cfg["out_indices"] == [3]


def test_unreadable_files_get_one_line_errors_without_unsafe_advice(tmp_path):
    """PyTorch's own message suggests retrying with the unsafe loader: never passed on."""
    import random

    class Evil:
        def __reduce__(self):
            return (exec, ("raise SystemExit('pwned')",))

    evil = tmp_path / "evil.pth"
    torch.save({"model": Evil()}, evil)
    cases = {"evil.pth": "cannot be read safely", "random.pth": "not a readable checkpoint", "empty.pt": "empty file"}
    (tmp_path / "random.pth").write_bytes(random.Random(0).randbytes(4096))
    (tmp_path / "empty.pt").write_bytes(b"")
    for name, what in cases.items():
        with pytest.raises(CheckpointError) as e:
            read_state_dict(tmp_path / name)
        msg = str(e.value)
        assert what in msg and str(tmp_path / name) in msg, msg
        assert "\n" not in msg and "weights_only" not in msg, msg
