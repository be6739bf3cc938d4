"""weights_convert.py: every fixture format converts, loads with m3ddm.weights and reproduces its reference;
bad input gives one `error:` line, exit code 2 and no file."""
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import FIXTURES, ROOT, require_diffusers
from m3ddm import weights as W

sys.path.insert(0, str(ROOT))
import weights_convert  # noqa: E402

UNET_CONFIG = FIXTURES / "unet3d_tiny" / "config.json"
VAE_CONFIG = FIXTURES / "vae_tiny" / "config.json"


class NotATensor:  # a pickle that needs arbitrary unpickling
    pass


def run(*args):
    return weights_convert.main([str(a) for a in args])


def assert_ok(capsys, *args):
    rc = run(*args)
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out


def assert_user_error(capsys, out_path, *args, match=""):
    folder_before = set(out_path.parent.iterdir())
    rc = run(*args)
    _, err = capsys.readouterr()
    assert rc == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert match in err, err
    assert set(out_path.parent.iterdir()) == folder_before  # nothing written, no temporary left
    return err


def same_tensors(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------------
# UNet

def test_unet_three_formats_reproduce_fixture(tmp_path, capsys):
    out = {name: tmp_path / f"{name}.safetensors" for name in ("st", "bin", "lightning")}
    assert_ok(capsys, "unet", FIXTURES / "unet3d_tiny", out["st"])
    assert_ok(capsys, "unet", FIXTURES / "unet3d_tiny_bin", out["bin"])
    assert_ok(capsys, "unet", FIXTURES / "unet3d_tiny_lightning.ckpt", out["lightning"], "--config", UNET_CONFIG)
    models = {name: W.load_unet(p) for name, p in out.items()}
    io = load_file(str(FIXTURES / "unet3d_tiny_io.safetensors"))
    with torch.no_grad():
        y = models["st"](io["A.sample"], 421, 29.97, global_latents=io["A.encoder_hidden_states"][None])
    ref = io["A.out"]
    err = (y - ref).abs().max().item()
    print(f"unet case A max abs err {err:.3g} (max|ref| {ref.abs().max().item():.3g})")
    assert err <= 1e-4 * ref.abs().max().item()
    # the other two formats load to bit-identical weights, hence identical outputs
    for name in ("bin", "lightning"):
        assert same_tensors(models[name].state_dict(), models["st"].state_dict()), name
    _, _, meta = W.read_header(out["lightning"])
    assert "unet3d_tiny_lightning.ckpt" in meta["sources"] and "config.json" in meta["sources"]


def test_unet_dtype_info_verify(tmp_path, capsys):
    out = tmp_path / "u16.safetensors"
    assert_ok(capsys, "unet", FIXTURES / "unet3d_tiny", out, "--dtype", "fp16")
    sd = load_file(str(out))
    counters = [k for k in sd if k.endswith("num_batches_tracked")]
    assert len(counters) == 35 and all(sd[k].dtype == torch.int64 for k in counters)
    batchnorm = W.batchnorm_names(sd) - set(counters)          # the global encoder's BatchNorms stay fp32
    assert len(batchnorm) == 35 * 4 and {sd[k].dtype for k in batchnorm} == {torch.float32}
    assert {v.dtype for k, v in sd.items() if k not in counters and k not in batchnorm} == {torch.float16}
    text = assert_ok(capsys, "info", out)
    assert "kind: unet" in text and "parameters: 1,322,488" in text and "F16 x1339" in text and "F32 x140" in text
    assert f"sha256: {W.sha256_file(out)}" in text and '"norm_num_groups": 8' in text
    assert "ok:" in assert_ok(capsys, "verify", out)
    assert_user_error(capsys, out, "unet", FIXTURES / "unet3d_tiny", out, match="already exists")


# ---------------------------------------------------------------------------------------------------
# VAE

@pytest.fixture(scope="module")
def vae_reference():
    diffusers = require_diffusers()
    ref = diffusers.AutoencoderKL.from_pretrained(str(FIXTURES / "vae_tiny")).eval()
    g = torch.Generator().manual_seed(3)
    x = torch.nn.functional.interpolate(torch.rand(1, 3, 8, 8, generator=g) * 2 - 1, size=32, mode="bilinear")
    with torch.no_grad():
        mean = ref.encode(x).latent_dist.mean
        image = ref.decode(mean).sample
    return x, mean, image


def vae_sources(tmp_path):
    sd_folder = tmp_path / "sd15" / "vae"  # a whole diffusers pipeline folder
    sd_folder.mkdir(parents=True)
    for f in ("config.json", "diffusion_pytorch_model.safetensors"):
        shutil.copy(FIXTURES / "vae_tiny" / f, sd_folder / f)
    (tmp_path / "sd15" / "model_index.json").write_text("{}")
    ckpt = tmp_path / "ldm" / "sd.ckpt"  # an original LDM .ckpt
    ckpt.parent.mkdir()
    torch.save({"state_dict": load_file(str(FIXTURES / "vae_tiny_ldm.safetensors")), "global_step": 1}, ckpt)
    return {"folder": [FIXTURES / "vae_tiny"], "sd_folder": [tmp_path / "sd15"],
            "ldm_safetensors": [FIXTURES / "vae_tiny_ldm.safetensors", "--config", VAE_CONFIG],
            "ldm_ckpt": [ckpt, "--config", VAE_CONFIG]}


def test_vae_formats_reproduce_diffusers(tmp_path, capsys, vae_reference):
    x, mean_ref, image_ref = vae_reference
    for name, src in vae_sources(tmp_path).items():
        out = tmp_path / f"{name}.safetensors"
        assert_ok(capsys, "vae", src[0], out, *src[1:])
        vae = W.load_vae(out)
        with torch.no_grad():
            mean = vae.encode(x).mean
            image = vae.decode(mean_ref)
        e_mean = (mean - mean_ref).abs().max().item()
        e_image = (image - image_ref).abs().max().item()
        with capsys.disabled():
            print(f"vae {name}: encode mean err {e_mean:.3g}, decode err {e_image:.3g}")
        assert e_mean <= 1e-5 * mean_ref.abs().max().item(), name
        assert e_image <= 1e-5 * image_ref.abs().max().item(), name
    out = tmp_path / "folder.safetensors"
    assert_user_error(capsys, out, "vae", FIXTURES / "vae_tiny", out, "--dtype", "bf16", match="already exists")
    assert_ok(capsys, "vae", FIXTURES / "vae_tiny", out, "--dtype", "bf16", "--force")
    assert {v.dtype for v in load_file(str(out)).values()} == {torch.bfloat16}


# ---------------------------------------------------------------------------------------------------
# LPIPS

def test_lpips_from_torchvision_and_lpips_files(tmp_path, capsys):
    fx = load_file(str(FIXTURES / "metrics" / "lpips_alex.safetensors"))
    trunk = {k: v.float() for k, v in fx.items() if k.startswith("features.")}
    trunk["classifier.1.weight"] = torch.zeros(2, 3)  # torchvision's AlexNet has more; ignored
    lins = {k: v for k, v in fx.items() if k.startswith("lin")}
    torch.save(trunk, tmp_path / "alexnet-owt.pth")
    torch.save(lins, tmp_path / "alex.pth")
    out = tmp_path / "lpips.safetensors"
    assert_ok(capsys, "lpips", tmp_path / "alexnet-owt.pth", tmp_path / "alex.pth", out)
    sd = load_file(str(out))
    assert len(sd) == 15 and all(v.dtype == torch.float32 for v in sd.values())
    assert same_tensors(sd, {k: v for k, v in {**trunk, **lins}.items() if not k.startswith("classifier")})
    assert W.read_header(out)[0] == "lpips"
    from m3ddm.metrics import load_lpips
    with torch.no_grad():
        d = load_lpips(out)(fx["in0"], fx["in1"])
    assert torch.allclose(d, fx["lpips_total"][:4], rtol=1e-4, atol=1e-6)
    assert_user_error(capsys, tmp_path / "x", "lpips", tmp_path / "alex.pth", tmp_path / "alexnet-owt.pth",
                      tmp_path / "x.safetensors", match="lack")


# ---------------------------------------------------------------------------------------------------
# bad input

def test_bad_inputs(tmp_path, capsys):
    out = tmp_path / "out" / "m.safetensors"
    out.parent.mkdir()
    src = FIXTURES / "unet3d_tiny" / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(src))
    e = lambda *a, match="": assert_user_error(capsys, out, *a, match=match)  # noqa: E731

    def variant_bytes(name, data):
        (tmp_path / name).write_bytes(data)
        return tmp_path / name

    e("unet", tmp_path / "missing.safetensors", out, match="does not exist")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(src.read_bytes()[: 200_000])
    e("unet", cut, out, match="truncated")
    e("unet", variant_bytes("cut_header.safetensors", src.read_bytes()[:1000]), out, match="truncated")
    e("unet", variant_bytes("cut.bin", (FIXTURES / "unet3d_tiny_bin" / "diffusion_pytorch_model.bin").read_bytes()[:9000]),
      out, match="damaged or not a PyTorch checkpoint")
    text = tmp_path / "notes.txt"
    text.write_text("these are not weights\n")
    e("unet", text, out, match="neither a safetensors file nor a PyTorch checkpoint")
    e("unet", FIXTURES / "vae_tiny", out, match="holds VAE weights")
    e("vae", FIXTURES / "unet3d_tiny", out, match="holds M3DDM UNet weights")
    e("unet", FIXTURES / "vae_tiny_ldm.safetensors", out, match="holds VAE weights")

    def variant(name, state):
        path = tmp_path / name
        save_file(state, str(path))
        return path

    missing = {k: v for k, v in sd.items() if k != "conv_out.spatial_conv.bias"}
    e("unet", variant("missing.st", missing), out, "--config", UNET_CONFIG, match="1 missing (conv_out.spatial_conv.bias)")
    e("unet", variant("extra.st", {**sd, "extra.weight": torch.zeros(1)}), out, "--config", UNET_CONFIG,
      match="1 unexpected (extra.weight)")
    e("unet", variant("shape.st", {**sd, "conv_in.bias": torch.zeros(17)}), out, "--config", UNET_CONFIG,
      match="conv_in.bias is (17,) but the model needs (16,)")
    e("unet", variant("int8.st", {**sd, "conv_in.bias": torch.zeros(16, dtype=torch.int8)}), out,
      "--config", UNET_CONFIG, match="torch.int8")
    e("unet", FIXTURES / "unet3d_tiny", out, "--dtype", "fp8", match="--dtype fp8 is not supported")
    pickled = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.unet.conv_in.bias": torch.zeros(16)}, "hparams": NotATensor()}, pickled)
    e("unet", pickled, out, match="needs arbitrary unpickling")
    e("vae", FIXTURES / "vae_tiny_ldm.safetensors", out, match="pass its config.json with --config")
    e("unet", src, src, "--force", match="is one of the inputs")
    e("info", src, match="not an m3ddm weights file")
    out.write_bytes(b"old")
    e("unet", FIXTURES / "unet3d_tiny", out, match="already exists")
    assert out.read_bytes() == b"old"


def test_cli_exit_code_and_stderr(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "weights_convert.py"), "vae", str(tmp_path / "nope"),
                        str(tmp_path / "o.safetensors")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "does not exist" in r.stderr
    assert not (tmp_path / "o.safetensors").exists()


def test_unet_config_inferred_without_config_json(tmp_path, capsys):
    from m3ddm.unet3d import UNet3D, UNet3DConfig
    config = UNet3DConfig(block_out_channels=(32, 32, 32, 64), layers_per_block=1, cross_attention_dim=64)
    bare = tmp_path / "bare.pth"
    torch.save(UNet3D(config).state_dict(), bare)
    out = tmp_path / "u.safetensors"
    rc = run("unet", bare, out)
    _, err = capsys.readouterr()
    assert rc == 0 and err.startswith("note: no config.json: inferred") and err.count("\n") == 1, err
    kind, saved, _ = W.read_header(out)
    assert W.make_config(UNet3DConfig, saved) == config
