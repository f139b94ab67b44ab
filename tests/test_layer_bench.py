"""`nsa bench --preset layer` on CPU at tiny sizes: both layers checked and timed end to end,
bad input, the gate of the checks, out-of-memory rows, the kernel classification and targets."""

import json

import pytest
import torch

from nsa.bench import cli_main, harness
from nsa.bench import layer_step as ls
from nsa.layer import NSAConfig

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


def test_layer_preset_end_to_end(tmp_path, capsys):
    out = tmp_path / "layer.json"
    assert cli_main(["--preset", "layer", "--device", "cpu", "--T", "64", "--reps", "1", "--check-T", "40",
                     "--no-progress", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    head, recs = data["header"], data["records"]
    assert data["format"] == "nsa-bench/1" and head["preset"] == "layer" and head["config"] == "tiny"
    assert head["checks"] == {"16x16": dict(T=40, nsa="ok", full="ok", sdpa="sdpa.cpu", sdpa_note="")}
    assert "unavailable on CPU" in head["breakdown"]
    assert {(r["impl"], r["pass"]) for r in recs} == {(i, p) for i in ("nsa", "sdpa.cpu") for p in ls.PASSES}
    for r in recs:
        assert set(harness.FIELDS) <= set(r) and r["T"] == 64 and r["ok"] is True and r["ms"] > 0
        assert r["breakdown"] is None  # not faked on CPU
    by = {(r["impl"], r["pass"]): r for r in recs}
    for p in ls.PASSES:
        assert by["nsa", p]["speedup"] == pytest.approx(by["sdpa.cpu", p]["ms"] / by["nsa", p]["ms"])
    printed = capsys.readouterr().out
    assert "unavailable on CPU" in printed and "targets (issue 22" in printed


@pytest.mark.parametrize("argv, option", [
    (["--reps", "0"], "--reps"),
    (["--check-T", "-1"], "--check-T"),
    (["--device", "tpu"], "--device"),
    (["--dims", "15x16"], "--dims"),
])
def test_layer_preset_bad_input(argv, option, capsys):
    assert cli_main(["--preset", "layer", "--device", "cpu"] + argv) == 2
    assert option in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--T", "0"], ["--dims", "16xa"], ["--dtype", "int8"], ["--config", "huge"]])
def test_layer_preset_bad_input_argparse(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["--preset", "layer", "--device", "cpu"] + argv)
    assert e.value.code == 2
    assert argv[0] in capsys.readouterr().err


def test_wrong_baseline_fails_its_check_and_is_not_timed(tmp_path, monkeypatch, capsys):
    """A full layer that attends to the future (non-causal SDPA) fails against the written-out
    attention: exit 1, its rows not timed, NSA still timed."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(ls.F, "scaled_dot_product_attention",
                        lambda q, k, v, is_causal, enable_gqa: sdpa(q, k, v, is_causal=False, enable_gqa=enable_gqa))
    out = tmp_path / "layer.json"
    assert cli_main(["--preset", "layer", "--device", "cpu", "--T", "32", "--reps", "1", "--check-T", "32",
                     "--json", str(out)]) == 1
    data = json.loads(out.read_text())
    assert "output: relative error" in data["header"]["checks"]["16x16"]["full"]
    for r in data["records"]:
        if r["impl"] == "nsa":
            assert r["ok"] is True and r["ms"] > 0 and r["speedup"] is None
        else:
            assert r["ok"] is False and r["ms"] is None and r["note"].startswith("not timed: check failed")
    assert "check failed" in capsys.readouterr().err


def test_full_layer_matches_written_out_attention_with_gqa_and_dk_ne_dv():
    cfg = NSAConfig.preset("tiny", num_heads=6, num_kv_heads=2, head_dim=12, v_head_dim=8)
    assert ls.check_full(cfg, None, CPU, torch.float32, 37) == "ok"
    assert ls.check_full(cfg, None, CPU, torch.bfloat16, 37) == "ok"


def test_out_of_memory_is_a_row_note():
    class Huge(torch.nn.Module):
        config = NSAConfig.preset("tiny")

        def forward(self, x):
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    case = harness.Case("layer", "train", 64, 1, 4, 2, 16, 16, "fp32")
    rec = ls.measure(Huge(), case, "nsa", "fwd+bwd", CPU, harness.Timer(CPU, 1))
    assert rec["ms"] is None and rec["ok"] is None and rec["note"] == "n/a: out of memory"


def test_kernel_classes():
    c = ls.classify_kernel
    for name in ("selected_fwd_kernel", "compressed_bwd_dq_kernel", "window_bwd_dkv_kernel", "gate_bwd_fused_kernel",
                 "selection_fwd_kernel", "compressed_fwd_kernel_0d1d2d3de",
                 "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_6_64x128x128_4x1x1_kernel0_0",
                 "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4>, true>",
                 "fmha_cutlassB_bf16_aligned_64x64_k128_sm80"):
        assert c(name) == "attention", name
    for name in ("nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNT",
                 "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1_cublas",
                 "ampere_bf16_s16816gemm_bf16_128x64_ldg8_f2f_stages_64x4_tn",
                 "void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_nn_align8>",
                 "void splitKreduce_kernel<32, 16, int, float, __nv_bfloat16>"):
        assert c(name) == "gemm", name
    for name in ("void at::native::elementwise_kernel<128, 2, ...>", "Memcpy DtoD (Device -> Device)",
                 "void at::native::(anonymous namespace)::CatArrayBatchedCopy<...>",
                 "void at::native::reduce_kernel<512, 1, ...>", "_rope_kernel", "rope_fwd_kernel"):
        assert c(name) == "other", name


def test_split_kernels_sums_and_shares():
    events = [("selected_fwd_kernel", 300.0), ("selected_fwd_kernel", 100.0), ("nvjet_tst_x", 500.0),
              ("void at::native::elementwise_kernel<>", 100.0)]
    b = ls.split_kernels(events)
    assert b["kernel_ms"] == pytest.approx(1.0)
    assert (b["attention_ms"], b["gemm_ms"], b["other_ms"]) == pytest.approx((0.4, 0.5, 0.1))
    assert (b["attention_share"], b["gemm_share"], b["other_share"]) == pytest.approx((0.4, 0.5, 0.1))
    assert b["kernels"][0] == {"name": "nvjet_tst_x", "class": "gemm", "calls": 1, "ms": pytest.approx(0.5)}
    assert b["kernels"][1]["calls"] == 2
    assert ls.split_kernels([]) is None


def test_device_events_reads_profiler_events():
    """The profiler API the CUDA breakdown reads (names, durations by device type), on CPU events."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    a = torch.randn(64, 64)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        a @ a
    ev = ls.device_events(prof.events(), DeviceType.CPU)
    assert any(name == "aten::mm" and us > 0 for name, us in ev)
    assert ls.device_events(prof.events(), DeviceType.CUDA) == []


def test_targets():
    def rec(T, speedup, other=None):
        return {"impl": "nsa", "pass": "fwd+bwd", "T": T, "D": 192, "Dv": 128, "speedup": speedup,
                "breakdown": None if other is None else {"other_share": other}}

    recs = [rec(4096, 0.5), rec(8192, 1.1), rec(16384, 1.2), rec(65536, 3.6, other=0.08),
            dict(rec(8192, 0.1), impl="sdpa.cudnn")]
    got = ls.add_targets(recs)
    assert [(t["T"], t["what"].split()[0], t["met"]) for t in got] == [
        (8192, "fwd+bwd", True), (16384, "fwd+bwd", False), (65536, "fwd+bwd", True), (65536, "other", False)]
    assert recs[0]["targets"] is None and len(recs[3]["targets"]) == 2 and "targets" not in recs[4]
    assert "MISSED" in ls.format_targets(got)
