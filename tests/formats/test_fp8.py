"""DeepSeek FP8 block dequantization against an independent bit-level e4m3 decoder."""
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import hybridmoe
from hybridmoe.formats.fp8 import dequant_fp8_blocks


def e4m3_to_float(bits: np.ndarray) -> np.ndarray:
    """OCP FP8 E4M3 (fn variant: no infinities, S.1111.111 is NaN), decoded from the bits."""
    bits = bits.astype(np.int64)
    sign = np.where(bits & 0x80, -1.0, 1.0)
    exp = (bits >> 3) & 0xF
    man = bits & 0x7
    normal = sign * (1 + man / 8.0) * np.exp2(exp - 7.0)
    subnormal = sign * (man / 8.0) * np.exp2(-6.0)
    out = np.where(exp == 0, subnormal, normal)
    return np.where((exp == 15) & (man == 7), np.nan, out)


def reference_dequant(bits: np.ndarray, scale: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    w = e4m3_to_float(bits)
    out = np.empty_like(w)
    for i in range(w.shape[0]):
        for j in range(w.shape[1]):
            out[i, j] = w[i, j] * scale[i // block[0], j // block[1]]
    return out


@pytest.mark.parametrize("shape,block", [((256, 384), (128, 128)), ((200, 130), (128, 128)), ((48, 40), (16, 16))])
def test_block_dequant_matches_bit_level_reference(shape, block):
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 256, size=shape, dtype=np.uint8)
    bits[(bits & 0x7F) == 0x7F] = 0x3C  # no NaNs in the data
    scale = rng.uniform(0.01, 2, size=(-(-shape[0] // block[0]), -(-shape[1] // block[1]))).astype(np.float32)
    got = dequant_fp8_blocks(torch.from_numpy(bits).view(torch.float8_e4m3fn), torch.from_numpy(scale),
                             torch.float32, block)
    want = reference_dequant(bits, scale, block)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=0)


def test_fp8_checkpoint_loads_like_its_dequantized_weights(tiny_models, tmp_path):
    """Quantize a tiny model's linear weights to FP8 with 16x16 block scales; the FP8 checkpoint must give the same
    logits as an f32 checkpoint holding the reference-dequantized weights."""
    src = tiny_models("deepseek_v3")
    fp8_dir, ref_dir = tmp_path / "fp8", tmp_path / "ref"
    shutil.copytree(src, fp8_dir)
    shutil.copytree(src, ref_dir)
    sd = load_file(src / "model.safetensors")
    fp8_sd, ref_sd = {}, {}
    block = (16, 16)
    for k, v in sd.items():
        linear = v.ndim == 2 and "embed" not in k and "lm_head" not in k and "gate.weight" not in k
        if not linear:
            fp8_sd[k] = ref_sd[k] = v
            continue
        ro, ri = -(-v.shape[0] // block[0]), -(-v.shape[1] // block[1])
        padded = torch.zeros(ro * block[0], ri * block[1])
        padded[: v.shape[0], : v.shape[1]] = v
        amax = padded.view(ro, block[0], ri, block[1]).abs().amax(dim=(1, 3)).clamp(min=1e-8)
        scale = amax / 448.0
        q = (padded.view(ro, block[0], ri, block[1]) / scale[:, None, :, None]).view_as(padded)
        q = q[: v.shape[0], : v.shape[1]].to(torch.float8_e4m3fn)
        fp8_sd[k], fp8_sd[k + "_scale_inv"] = q, scale
        ref_sd[k] = torch.from_numpy(reference_dequant(q.view(torch.uint8).numpy(), scale.numpy(), block)).float()
    save_file(fp8_sd, fp8_dir / "model.safetensors")
    save_file(ref_sd, ref_dir / "model.safetensors")
    cfg = json.loads((fp8_dir / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(block)}
    (fp8_dir / "config.json").write_text(json.dumps(cfg))
    ids = [3, 44, 91, 200, 17, 8]
    a = hybridmoe.load(fp8_dir).logits(ids)
    b = hybridmoe.load(ref_dir).logits(ids)
    assert ((a - b).abs().max() / b.abs().max()).item() < 1e-6
