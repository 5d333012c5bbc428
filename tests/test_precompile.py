"""``halfbyte.precompile``: a call recorded with the quantized layers returning zeros, then each distinct layer call
replayed for real on threads. The CPU tier runs the machinery with the replay allowed on the CPU (where the layers
run their PyTorch references: nothing compiles there otherwise). The GPU tier runs it in a fresh process with an
empty triton cache: the precompile compiles, and the real call after it compiles nothing."""

import json
import os
import subprocess
import sys
import threading
import time

import pytest
import torch
from kernel_helpers import gpu
from torch import nn

import halfbyte
from halfbyte import precompiler
from halfbyte.kernels.share import Share


def _model(dtype=torch.bfloat16) -> nn.Sequential:
    torch.manual_seed(0)
    layers = [nn.Linear(128, 256), nn.Linear(256, 128, bias=False), nn.Linear(128, 128), nn.Linear(128, 128),
              nn.Linear(128, 64)]
    m = nn.Sequential(*layers).to(dtype)
    q = nn.Sequential(
        halfbyte.Linear4bit.from_linear(m[0], quant_type="nf4"),
        halfbyte.Linear4bit.from_linear(m[1], quant_type="fp4", double_quant=True),
        halfbyte.Linear8bit.from_linear(m[2], threshold=6.0),
        halfbyte.Linear8bit.from_linear(m[3], threshold=6.0),
        halfbyte.Linear4bit.from_linear(m[4], quant_type="nf4"),
    )
    return q


@pytest.fixture
def replay_on_cpu(monkeypatch):
    monkeypatch.setattr(precompiler, "_compiles_on", lambda device: True)


def test_records_then_replays_each_distinct_call(replay_on_cpu):
    model = _model()
    x3, x1 = torch.randn(3, 128, dtype=torch.bfloat16), torch.randn(1, 128, dtype=torch.bfloat16)
    before = [model(x3), model(x1)]
    seen = []

    def call():
        with torch.inference_mode():
            for x in (x3, x1, x3):  # the third call repeats the first: nothing new
                out = model(x)
                seen.append((out.shape, out.dtype, bool(out.any())))
        return "discarded"

    report = precompiler.precompile(call)
    out = ((3, 64), torch.bfloat16, False)
    assert seen == [out, ((1, 64), torch.bfloat16, False), out]  # the layers returned zeros while recording
    # 5 layers x 3 calls; distinct: 2 token counts x 4 (the two LLM.int8() layers are of one kind and shape)
    assert report["recorded"] == 15 and report["distinct"] == 8
    assert report["replayed"] == 8 + 2  # LLM.int8() calls: with and without outlier columns
    assert report["gemm_variants"] == 0 and report["seconds"] > 0
    assert halfbyte.nn.RECORDER is None
    assert model(x3).equal(before[0]) and model(x1).equal(before[1])  # the layers compute again, as before


def test_device_checks_start_while_recording(replay_on_cpu, monkeypatch):
    """Each new 4-bit call's plan checks go to the pool as the record finds it, not after the record: ``fn`` waits
    here for the first one to have run while it still records."""
    from halfbyte.kernels import gemm4bit

    started, asked = threading.Event(), []

    def plan_checks(N, K, blocksize, quant_type, dtype, nested, has_bias, device):
        asked.append((N, K, quant_type, dtype, nested, has_bias))
        return {("check", device): started.set}  # one device check, shared by the layers

    monkeypatch.setattr(gemm4bit, "plan_checks", plan_checks)
    model = _model()

    def call():
        model(torch.randn(2, 128, dtype=torch.bfloat16))
        assert started.wait(30), "the device check did not run during the record"

    report = precompiler.precompile(call)
    bf16 = torch.bfloat16
    assert asked == [(256, 128, "nf4", bf16, False, True), (128, 256, "fp4", bf16, True, False),
                     (64, 128, "nf4", bf16, False, True)]
    assert report["device_checks"] == 1 and report["gemm_variants"] == 0
    assert 0 < report["record_seconds"] <= report["seconds"]


def test_distinct_by_what_picks_the_kernels(replay_on_cpu):
    """Token count, input dtype and grad mode make calls distinct; a second layer of the same kind and shape does
    not (its call is the first one's)."""
    model = _model()
    x = torch.randn(5, 128, dtype=torch.bfloat16)

    def call():
        model[2](x)
        model[3](x)  # same kind, shape, threshold as model[2]
        model[2](x.float())
        model[2](x[:2])
        with torch.no_grad():
            model[2](x)

    report = precompiler.precompile(call)
    assert report["recorded"] == 5 and report["distinct"] == 4


def test_replay_leaves_no_share_entry(replay_on_cpu):
    model = _model()
    share = Share(2)
    model[2].share = model[3].share = share
    x = torch.randn(4, 128, dtype=torch.bfloat16)
    with torch.inference_mode():
        expect = model(x)
    precompiler.precompile(lambda: model(x), workers=2)
    assert share._entry is None
    with torch.inference_mode():
        assert model(x).equal(expect)


def test_cpu_calls_replay_nothing():
    """On the CPU the layers run their references: nothing to compile, so nothing is replayed."""
    model = _model()
    report = halfbyte.precompile(model, torch.randn(2, 128, dtype=torch.bfloat16))
    assert report["recorded"] == 5 and report["distinct"] == 0 and report["replayed"] == 0


def test_cuda_without_triton_compiles_nothing(monkeypatch):
    """Without triton the CUDA layers run their references too: nothing to compile, nothing imported for it."""
    assert precompiler._compiles_on(torch.device("cuda", 0)) == (halfbyte.ops.cuda_kernel("gemm_4bit") is not None)
    monkeypatch.setattr(halfbyte.ops, "_DIRECT", {})  # what ``halfbyte.ops`` registers when triton is missing
    assert not precompiler._compiles_on(torch.device("cuda", 0))
    assert not precompiler._compiles_on(torch.device("cpu"))


def test_errors_are_raised_and_leave_no_state(replay_on_cpu, monkeypatch):
    model = _model()
    with pytest.raises(ValueError, match="workers must be >= 1"):
        halfbyte.precompile(model, torch.randn(2, 128), workers=0)

    def broken():
        model(torch.randn(2, 128, dtype=torch.bfloat16))
        raise KeyError("inside the recorded call")

    with pytest.raises(KeyError, match="inside the recorded call"):
        halfbyte.precompile(broken)
    assert halfbyte.nn.RECORDER is None
    with pytest.raises(RuntimeError, match="got an input on meta"):  # the layer's own input check, while recording
        halfbyte.precompile(model, torch.randn(2, 128, device="meta"))
    with pytest.raises(TypeError, match="got a torch.int64 input"):
        halfbyte.precompile(model[0], torch.ones(2, 128, dtype=torch.int64))

    def nested():
        halfbyte.precompile(model, torch.randn(2, 128, dtype=torch.bfloat16))

    with pytest.raises(RuntimeError, match="another precompile is running"):
        halfbyte.precompile(nested)

    def failing_replay(layer, calls, budgets):
        raise OSError(f"replay of {type(layer).__name__} failed")

    monkeypatch.setattr(precompiler, "_replay", failing_replay)
    with pytest.raises(OSError, match="replay of Linear"):
        halfbyte.precompile(model, torch.randn(2, 128, dtype=torch.bfloat16))
    monkeypatch.undo()
    assert halfbyte.precompile(model, torch.randn(2, 128, dtype=torch.bfloat16))["recorded"] == 5  # usable again


def test_budget_lets_a_large_call_run_alone():
    budget = precompiler._Budget(100)
    assert budget.take(60) == 60
    order = []

    def big():
        n = budget.take(1000)  # clamped to the whole budget: waits until everything else gave back
        order.append(("big", n, budget.free))
        budget.give(n)

    t = threading.Thread(target=big)
    t.start()
    time.sleep(0.05)
    order.append(("small done",))
    budget.give(60)
    t.join(5)
    assert order == [("small done",), ("big", 100, 0)] and budget.free == 100


_FRESH = r"""
import json, sys, time, torch
from torch import nn
from triton import knobs
import halfbyte
from halfbyte.kernels.share import Share

log = []
knobs.compilation.listener = lambda **kw: log.append(kw["cache_hit"])
torch.manual_seed(0)
shapes = [(4096, 4096, True), (4096, 4096, False), (4096, 10240, False), (3072, 3072, True)]
layers = []
for i, (k, n, bias) in enumerate(shapes):
    lin = nn.Linear(k, n, bias=bias, device="cuda", dtype=torch.bfloat16)
    layers.append(halfbyte.Linear4bit.from_linear(lin, quant_type="nf4", double_quant=i == 2))
int8 = [halfbyte.Linear8bit.from_linear(nn.Linear(3072, 3072, device="cuda", dtype=torch.bfloat16), threshold=6.0)
        for _ in range(2)]
int8[0].share = int8[1].share = Share(2)
xs = {k: {m: torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for m in (1, 7, 512)} for k in (4096, 3072)}
xs[4096][512][:, 5] = 40.0

def call():
    with torch.inference_mode():
        outs = []
        for m in (1, 7, 512):
            for layer, (k, _, _) in zip(layers, shapes):
                outs.append(layer(xs[k][m]))
            outs += [q(xs[3072][m]) for q in int8]
        return outs

del log[:]
t0 = time.perf_counter()
report = halfbyte.precompile(call)
ahead = len(log)
del log[:]
first = call()
torch.cuda.synchronize()
again = call()
same = all(torch.equal(a, b) for a, b in zip(first, again))
print(json.dumps(dict(report=report, ahead_compiles=ahead, first_call_compiles=len(log), same=same,
                      finite=all(bool(o.isfinite().all()) for o in first),
                      hopper=torch.cuda.get_device_capability()[0] == 9)))
"""


@gpu
def test_after_precompile_the_call_compiles_nothing(tmp_path):
    """A fresh process with an empty triton cache: the precompile compiles (on Hopper, the fused GEMM's variants
    among them), then the recorded call compiles nothing, and gives the same bits twice."""
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / "triton"))
    run = subprocess.run([sys.executable, "-c", _FRESH], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    r = json.loads(run.stdout.strip().splitlines()[-1])
    assert r["first_call_compiles"] == 0 and r["ahead_compiles"] > 0, r
    assert r["same"] and r["finite"], r
    assert r["report"]["recorded"] == 18 and r["report"]["distinct"] == 15, r  # int8: both layers are one call
    if r["hopper"]:
        assert r["report"]["gemm_variants"] >= 2, r  # (S, bias) of the 512-token calls of 4096 x 4096 and 10240


def test_precompile_a_diffusers_pipeline(replay_on_cpu):
    """The way ``halfbyte generate`` calls it: a FLUX pipeline with a 4-bit transformer and an LLM.int8() T5, one
    step with latents out. The recorded call runs the whole pipeline on the zeros; the next call's image is the one
    a pipeline that never precompiled gives."""
    diffusers = pytest.importorskip("diffusers")
    from halfbyte.testing import tiny_flux_pipeline

    pipes = []
    for _ in range(2):
        pipe = tiny_flux_pipeline(seed=0)
        halfbyte.quantize_(pipe.transformer, halfbyte.BitsAndBytesConfig(load_in_4bit=True))
        halfbyte.quantize_(pipe.text_encoder_2, halfbyte.BitsAndBytesConfig(load_in_8bit=True))
        pipe.set_progress_bar_config(disable=True)
        pipes.append(pipe)
    assert isinstance(pipes[0], diffusers.FluxPipeline)
    kw = dict(prompt="a cat", height=32, width=32, max_sequence_length=16, output_type="latent")
    with torch.inference_mode():
        report = halfbyte.precompile(pipes[0], num_inference_steps=1, generator=torch.Generator().manual_seed(1), **kw)
        got, want = (p(num_inference_steps=2, generator=torch.Generator().manual_seed(3), **kw).images for p in pipes)
    layers = sum(isinstance(m, (halfbyte.Linear4bit, halfbyte.Linear8bit)) for c in (pipes[0].transformer,
                 pipes[0].text_encoder_2) for m in c.modules())
    assert report["recorded"] >= layers and 0 < report["distinct"] <= report["recorded"]
    assert report["replayed"] >= report["distinct"]
    assert torch.equal(got, want)


def test_a_compiled_model_compiles_once():
    """Inside a torch.compile graph the layers compute (nothing is recorded: the recorded call compiles the graph),
    and the graph carries no guard on the recorder, so the real call after the precompile reuses it."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = torch.compile(_model()[:2], fullgraph=True)
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        report = halfbyte.precompile(model, x)
        assert report["recorded"] == 0 and counters["stats"]["unique_graphs"] == 1
        model(x)
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


def test_a_full_device_replays_one_call_at_a_time():
    budget = precompiler._Budget(1)  # what precompile makes of a device with (almost) no free memory
    assert budget.take(10**9) == 1 and budget.free == 0
    waited = threading.Event()

    def second():
        budget.give(budget.take(5))
        waited.set()

    t = threading.Thread(target=second)
    t.start()
    assert not waited.wait(0.05)  # blocked behind the first
    budget.give(1)
    t.join(5)
    assert waited.is_set() and budget.free == 1
