"""m3ddm.weights: the file format, strict loading, and the key maps on full-size models (meta tensors only)."""
import json

import pytest
import torch
from safetensors.torch import save_file

from conftest import FIXTURES
from m3ddm import weights as W
from m3ddm.errors import UserError
from m3ddm.unet3d import UNet3D, UNet3DConfig
from m3ddm.vae import AutoencoderKL, VAEConfig

KEYS = FIXTURES / "keys"


def manifest(name, prefix=""):
    """{key: meta tensor} of a key manifest: full-size shapes at no memory cost."""
    shapes = json.loads((KEYS / name).read_text())
    return {prefix + k: torch.empty(s, device="meta", dtype=torch.int64 if k.endswith("num_batches_tracked")
                                    else torch.float32) for k, s in shapes.items()}


def shapes(sd):
    return {k: tuple(v.shape) for k, v in sd.items()}


@pytest.fixture(scope="module")
def meta_unet():
    with torch.device("meta"):
        return UNet3D(UNet3DConfig())


@pytest.fixture(scope="module")
def meta_vae():
    with torch.device("meta"):
        return AutoencoderKL(VAEConfig())


# ---------------------------------------------------------------------------------------------------
# format

def small_state():
    return {"a.weight": torch.randn(3, 2, generator=torch.Generator().manual_seed(0)),
            "bn.num_batches_tracked": torch.tensor(7, dtype=torch.int64)}


def test_save_read_header_round_trip(tmp_path):
    path = tmp_path / "m.safetensors"
    cfg = VAEConfig(block_out_channels=(16, 32), norm_num_groups=8)
    sha = W.save_model(path, small_state(), "vae", cfg, dtype=torch.bfloat16,
                       metadata={"sources": [{"name": "x.bin", "sha256": "ab"}], "note": "hi"})
    assert sha == W.sha256_file(path) and len(sha) == 64
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temporary left behind
    kind, config, meta = W.read_header(path)
    assert kind == "vae" and config["block_out_channels"] == [16, 32] and config["norm_num_groups"] == 8
    assert meta["format"] == "m3ddm" and meta["format_version"] == "1" and meta["note"] == "hi"
    assert json.loads(meta["sources"]) == [{"name": "x.bin", "sha256": "ab"}]
    from safetensors.torch import load_file
    back = load_file(str(path))
    assert back["a.weight"].dtype == torch.bfloat16  # floats cast
    assert back["bn.num_batches_tracked"].dtype == torch.int64 and back["bn.num_batches_tracked"].item() == 7
    assert W.make_config(VAEConfig, config) == cfg


def test_read_header_rejects_bad_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        W.read_header(tmp_path / "nope.safetensors")
    text = tmp_path / "t.safetensors"
    text.write_text("just some text, long enough to look like a header length\n")
    with pytest.raises(UserError, match="not a safetensors file"):
        W.read_header(text)
    plain = tmp_path / "plain.safetensors"
    save_file(small_state(), str(plain))
    with pytest.raises(UserError, match="not an m3ddm weights file"):
        W.read_header(plain)
    good = tmp_path / "good.safetensors"
    W.save_model(good, small_state(), "unet", {"x": 1})
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-5])
    with pytest.raises(UserError, match="truncated"):
        W.read_header(cut)


def test_strict_load_report_names_every_problem():
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    good = {k: v.clone() for k, v in model.state_dict().items()}
    W.strict_load(model, good)
    bad = dict(good)
    del bad["0.bias"]
    bad["2.weight"] = torch.zeros(1)
    bad["1.weight"] = torch.zeros(1, 4)
    with pytest.raises(UserError) as e:
        W.strict_load(model, bad, "x.safetensors")
    msg = str(e.value)
    assert "1 missing (0.bias)" in msg and "1 unexpected (2.weight)" in msg
    assert "1.weight is (1, 4) but the model needs (1, 3)" in msg and "\n" not in msg


def test_loaders_check_kind(tmp_path):
    path = tmp_path / "v.safetensors"
    W.save_model(path, small_state(), "vae", VAEConfig())
    with pytest.raises(UserError, match="holds a vae, not a unet"):
        W.load_unet(path)


def test_load_vae_gives_trainable_eval_model(tmp_path):
    from safetensors.torch import load_file
    sd = load_file(str(FIXTURES / "vae_tiny" / "diffusion_pytorch_model.safetensors"))
    path = tmp_path / "v.safetensors"
    W.save_model(path, sd, "vae", VAEConfig(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8))
    vae = W.load_vae(path)
    assert not vae.training and all(p.requires_grad and p.dtype == torch.float32 for p in vae.parameters())
    assert all(torch.equal(v, sd[k]) for k, v in vae.state_dict().items())
    assert {p.dtype for p in W.load_vae(path, dtype=torch.bfloat16).parameters()} == {torch.bfloat16}


def test_loaded_tensors_are_fresh_aligned_copies(tmp_path):
    sd = {"w": torch.randn(5, 3), "b": torch.randn(3).bfloat16(), "n": torch.tensor(4), "e": torch.zeros(0, 2)}
    save_file(sd, str(tmp_path / "t.safetensors"))
    got = W.load_tensors(tmp_path / "t.safetensors")
    assert all(torch.equal(got[k], v) and got[k].dtype == v.dtype for k, v in sd.items())
    assert all(t.data_ptr() % 64 == 0 for t in got.values() if t.numel())
    cast = W.load_tensors(tmp_path / "t.safetensors", dtype=torch.float16)
    assert cast["w"].dtype == cast["b"].dtype == torch.float16 and cast["n"].dtype == torch.int64


def test_same_weights_same_bits_whatever_the_header_length(tmp_path, tiny_models):
    """MKL's batch-1 Linear (matrix-vector) rounds by the weight's alignment; loading must not depend on
    where the tensors sit in the file (metadata of another length moves every tensor)."""
    unet, _ = tiny_models
    x = torch.randn(1, unet.config.block_out_channels[0], generator=torch.Generator().manual_seed(0))
    outs = []
    for pad in range(0, 64, 8):
        path = tmp_path / f"u{pad}.safetensors"
        W.save_model(path, unet.state_dict(), "unet", unet.config, metadata={"pad": "x" * pad})
        model = W.load_unet(path)
        assert all(p.data_ptr() % 64 == 0 for p in model.parameters())
        with torch.no_grad():
            outs.append(model.time_embedding(x))
    assert all(torch.equal(o, outs[0]) for o in outs)


def test_truncated_tensor_data_is_one_clear_error(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"w": torch.randn(64, 64)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(UserError, match="truncated"):
        W.load_tensors(path)


# ---------------------------------------------------------------------------------------------------
# key maps at full size

def test_full_unet_lightning_map_and_inference(meta_unet):
    sd = manifest("m3ddm_unet_keys.json", prefix=W.LIGHTNING_UNET_PREFIX)
    sd["model.vae.encoder.conv_in.weight"] = torch.empty(128, 3, 3, 3, device="meta")  # must be dropped
    mapped = W.unet_state_dict(sd)
    assert len(mapped) == 1516
    assert W.mismatch_report(meta_unet.state_dict(), mapped) == ""
    assert shapes(mapped) == shapes(meta_unet.state_dict())
    inferred = W.make_config(UNet3DConfig, W.infer_unet_config(mapped))
    assert inferred == UNet3DConfig()  # the released config, from shapes + documented defaults
    released = json.loads((KEYS / "m3ddm_unet_config.json").read_text())
    assert W.make_config(UNet3DConfig, released, strict=False) == UNet3DConfig()
    assert W.unet_state_dict(manifest("m3ddm_unet_keys.json")).keys() == mapped.keys()  # bare: identity


def test_full_sd15_vae_diffusers_and_old_attention_names(meta_vae):
    sd = manifest("sd15_vae_diffusers_keys.json")
    assert shapes(W.vae_state_dict(sd)) == shapes(meta_vae.state_dict())
    old = {k.replace("attentions.0.to_q.", "attentions.0.query.").replace("attentions.0.to_k.", "attentions.0.key.")
           .replace("attentions.0.to_v.", "attentions.0.value.").replace("attentions.0.to_out.0.", "attentions.0.proj_attn."): v
           for k, v in sd.items()}
    assert old.keys() != sd.keys()
    assert shapes(W.vae_state_dict(old)) == shapes(meta_vae.state_dict())
    assert W.make_config(VAEConfig, W.infer_vae_config(sd)) == VAEConfig()


def test_full_sd15_single_file_map(meta_vae):
    ldm = manifest("sd15_vae_ldm_keys.json")
    assert len(ldm) == 248
    whole = dict(ldm)  # a whole SD checkpoint: the 2D UNet and the text encoder must be ignored
    whole["model.diffusion_model.input_blocks.0.0.weight"] = torch.empty(320, 4, 3, 3, device="meta")
    whole["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = torch.empty(768, device="meta")
    mapped = W.vae_state_dict(whole)
    assert len(mapped) == 248  # every key mapped, none left over
    assert W.mismatch_report(meta_vae.state_dict(), mapped) == ""
    assert shapes(mapped) == shapes(meta_vae.state_dict())
    expect = json.loads((KEYS / "sd15_vae_diffusers_keys.json").read_text())
    assert {k: list(v) for k, v in shapes(mapped).items()} == expect
    assert W.vae_key_from_ldm("decoder.up.0.block.2.nin_shortcut.weight", 4) == \
        "decoder.up_blocks.3.resnets.2.conv_shortcut.weight"


def test_vae_tiny_ldm_map_is_bit_exact():
    from safetensors.torch import load_file
    ref = load_file(str(FIXTURES / "vae_tiny" / "diffusion_pytorch_model.safetensors"))
    mapped = W.vae_state_dict(load_file(str(FIXTURES / "vae_tiny_ldm.safetensors")))
    assert mapped.keys() == ref.keys()
    assert all(torch.equal(mapped[k], ref[k]) for k in ref)


def test_config_from_a_preset_or_a_json_file(tmp_path):
    from m3ddm.unet3d import UNET_PRESETS, UNet3DConfig
    from m3ddm.weights import config_from
    assert config_from("tiny", UNET_PRESETS, UNet3DConfig, "--config") is UNET_PRESETS["tiny"]
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"block_out_channels": [16, 16, 16, 32], "norm_num_groups": 8}))
    config = config_from(str(path), UNET_PRESETS, UNet3DConfig, "--config")
    assert config.block_out_channels == (16, 16, 16, 32) and config.norm_num_groups == 8
    with pytest.raises(UserError, match="--config nope is neither a preset"):
        config_from("nope", UNET_PRESETS, UNet3DConfig, "--config")
    path.write_text(json.dumps({"no_such_field": 1}))
    with pytest.raises(UserError, match="--config .* is not a valid config"):
        config_from(str(path), UNET_PRESETS, UNet3DConfig, "--config")


# ---------------------------------------------------------------------------------------------------
# loading to a device, dtypes, BatchNorm in fp32, headers that promise more than the file holds

def test_staged_load_equals_direct_load_and_stays_aligned(tmp_path):
    """The device path (two reusable staging buffers, one tensor at a time) gives the same tensors as the
    direct CPU read, each a fresh 64-byte-aligned tensor (not a view into a staging buffer)."""
    sd = {"w": torch.randn(7, 5), "b": torch.randn(3).half(), "n": torch.tensor(4), "e": torch.zeros(0, 2),
          "big": torch.randn(64, 33)}
    save_file(sd, str(tmp_path / "t.safetensors"))
    for dtype in (None, torch.bfloat16):
        direct = W.load_tensors(tmp_path / "t.safetensors", dtype=dtype)
        staged = W.load_tensors(tmp_path / "t.safetensors", dtype=dtype, staged=True)
        assert all(torch.equal(direct[k], staged[k]) and direct[k].dtype == staged[k].dtype for k in sd)
        assert all(t.data_ptr() % 64 == 0 for t in staged.values() if t.numel())
        pointers = [t.untyped_storage().data_ptr() for t in staged.values() if t.numel()]
        assert len(set(pointers)) == len(pointers)   # every tensor owns its storage


def test_batchnorm_names_and_keep_fp32(tmp_path):
    names = ["enc.bn.weight", "enc.bn.bias", "enc.bn.running_mean", "enc.bn.running_var",
             "enc.bn.num_batches_tracked", "enc.conv.weight", "norm.weight"]
    assert W.batchnorm_names(names) == set(names[:5])
    sd = {"enc.bn.running_var": torch.rand(4) + 0.5, "enc.conv.weight": torch.randn(4, 4)}
    save_file(sd, str(tmp_path / "t.safetensors"))
    got = W.load_tensors(tmp_path / "t.safetensors", dtype=torch.bfloat16, keep_fp32={"enc.bn.running_var"})
    assert got["enc.bn.running_var"].dtype == torch.float32 and torch.equal(got["enc.bn.running_var"],
                                                                            sd["enc.bn.running_var"])
    assert got["enc.conv.weight"].dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_unet_keeps_batchnorm_fp32(tmp_path, tiny_models, dtype):
    """The global encoder's BatchNorm weights and statistics stay fp32 (also from a file stored in fp16),
    everything else takes the requested dtype, and the global tokens stay close to fp32's."""
    unet, _ = tiny_models
    path = tmp_path / "u16.safetensors"
    W.save_model(path, unet.state_dict(), "unet", unet.config, dtype=torch.float16)
    low = W.load_unet(path, dtype=dtype)
    bn = W.batchnorm_names(low.state_dict())
    assert len(bn) == 35 * 5
    for name, t in low.state_dict().items():
        want = torch.int64 if name.endswith("num_batches_tracked") else torch.float32 if name in bn else dtype
        assert t.dtype == want, name
    g = torch.randn(1, 2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = unet.encode_global(g)
        got = low.encode_global(g)
    assert got.dtype == dtype and torch.isfinite(got.float()).all()
    if dtype == torch.float16:   # measured 1.5 % (2.3 % with the BatchNorms in fp16); bf16 is ~10 % either way
        assert ((got.float() - ref).norm() / ref.norm()).item() < 0.02
    assert W.cast_model(W.load_unet(path), dtype).global_img_encoder.resnet_layer[0].layers[0].layer[0] \
        .normalization.running_var.dtype == torch.float32


def test_header_promising_more_bytes_than_the_file_is_one_clear_error(tmp_path):
    """A 5 GB download cut short: the header's offsets reach 5.2e9 bytes, the file has a few hundred."""
    import struct
    header = json.dumps({"__metadata__": {"format": "m3ddm", "format_version": "1", "kind": "unet", "config": "{}"},
                         "w": {"dtype": "F32", "shape": [1300000000], "data_offsets": [0, 5200000000]}}).encode()
    path = tmp_path / "unet.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)
    for call in (W.load_tensors, W.read_header, lambda p: W.check_kind(p, "unet"), W.load_unet):
        with pytest.raises(UserError, match=r"truncated \(\d+ bytes, the header needs 5200000\d+\)"):
            call(path)


def test_streamed_writer_is_standard_safetensors(tmp_path):
    """write_safetensors (one tensor at a time) makes files safetensors itself reads back exactly, with
    metadata, every dtype m3ddm reads, empty tensors and a header padded to 8 bytes."""
    from safetensors import safe_open
    sd = {"a": torch.randn(3, 5), "b": torch.randn(7).half(), "c": torch.randn(2, 2).bfloat16(),
          "n": torch.tensor(3), "e": torch.zeros(0, 4), "m": torch.tensor([True, False]),
          "v": torch.arange(12.0).view(3, 4).t()}                         # a non-contiguous view
    path = tmp_path / "s.safetensors"
    W.write_safetensors(path, {k: (v.dtype, tuple(v.shape)) for k, v in sd.items()}, lambda k: sd[k], {"x": "y"})
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"x": "y"}
        assert all(torch.equal(f.get_tensor(k), v) and f.get_tensor(k).dtype == v.dtype for k, v in sd.items())
    import struct
    n = struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert n % 8 == 0 and W.load_tensors(path).keys() == sd.keys()
    assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]


def test_save_model_writes_one_tensor_at_a_time(tmp_path):
    """save_model asks for each tensor once, in order, casting as it goes (no whole-model bytes copy)."""
    order = []

    class Recording(dict):
        def __getitem__(self, k):
            order.append(k)
            return dict.__getitem__(self, k)

    sd = Recording({"w": torch.randn(4, 4), "bn.running_var": torch.rand(4) + 1, "bn.weight": torch.ones(4)})
    W.save_model(tmp_path / "m.safetensors", sd, "vae", VAEConfig(), dtype=torch.float16)
    assert order == ["w", "bn.running_var", "bn.weight"]
    back = W.load_tensors(tmp_path / "m.safetensors")
    assert back["w"].dtype == torch.float16 and back["bn.running_var"].dtype == torch.float32
