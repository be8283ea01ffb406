"""The memory plan of a train step (sparsejax.run.memory), ``sparsejax plan-memory``, the
refusal ``train`` runs before loading data, and the accelerator presets. Two tiny train steps
are compiled (abstract inputs, XLA:CPU); everything else reuses them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import pytest

from sparsejax import cli
from sparsejax.errors import ConfigError
from sparsejax.models.gpt import GPTConfig
from sparsejax.run import configlib, data, experiment, memory, memory_table

ROOT = Path(__file__).resolve().parents[1]
TINY = "size=tiny,train.batch_size=8,train.seq_len=64,model.n_ctx=64"
SPARSE_BF16 = TINY + ",sparsity.method=static,sparsity.final=0.5,model.dtype=bfloat16"


def spec_of(arg: str):
    return configlib.validate(configlib.apply_arg(configlib.base(), arg))


@pytest.fixture(scope="module")
def plans():
    return {arg: memory.plan(spec_of(arg), 256) for arg in (TINY, SPARSE_BF16)}


@pytest.mark.slow
def test_plan_parts_add_up(plans):
    """The arguments are the state and the batch; the donated state is aliased by the new
    one; the peak follows the documented formula."""
    p = plans[TINY]
    assert p.platform == "cpu" and p.n_params == 116_480
    assert p.state.params == 4 * p.n_params  # float32 weights
    assert p.state.opt_state == 2 * p.state.params + 8  # Adam mu, nu (+ two int32 counts)
    assert p.state.masks == 0
    assert p.batch == 2 * 8 * 64 * 4  # int32 inputs and targets
    assert p.arguments == p.state.total + p.batch
    assert p.aliases == p.state.total  # donated: the new state reuses the old state's buffers
    assert p.peak == p.arguments + p.outputs - p.aliases + p.temporaries + p.generated_code
    assert 0 < p.residuals and 0 < p.temporaries
    s = plans[SPARSE_BF16].state
    assert s.masks == 98_304 + 23  # a bool per prunable weight, a scalar True per other leaf


@pytest.mark.slow
@pytest.mark.parametrize("arg", [TINY, SPARSE_BF16])
def test_estimate_bounds_the_compiled_peak(plans, arg):
    """What check_fits decides from without compiling: the state is resident (a lower
    bound), and state + 2 x params + residuals + batch bounds the compiled peak."""
    est = memory.estimate(spec_of(arg), 256)
    p = plans[arg]
    assert est.state == p.state.total
    assert est.state <= p.peak <= est.upper


def test_check_fits_passes_far_below_without_compiling(monkeypatch):
    monkeypatch.setattr(memory, "plan", lambda *a, **k: pytest.fail("compiled"))
    found = memory.check_fits(spec_of(TINY), limit=(10**9, "test memory"))
    assert isinstance(found, memory.Estimate)


def test_check_fits_refuses_a_state_that_cannot_fit(monkeypatch):
    monkeypatch.setattr(memory, "plan", lambda *a, **k: pytest.fail("compiled"))
    with pytest.raises(ConfigError, match=r"needs about 1\.4 MB per device \(its train state "
                       r"alone.*than the 1\.0 MB of test memory; lower it with "
                       r"train\.batch_size.*model\.dtype=bfloat16"):
        memory.check_fits(spec_of(TINY), limit=(10**6, "test memory"))


@pytest.mark.slow
def test_check_fits_compiles_between_the_bounds(plans, monkeypatch):
    """State 1.4 MB fits 30 MB, the estimate (~36 MB) is above half of it: the compiled
    plan decides (here: it does not fit)."""
    asked = []
    monkeypatch.setattr(memory, "plan", lambda spec, vocab, mesh: asked.append(vocab)
                        or plans[TINY])
    p = plans[TINY]
    limit = (p.peak - 1, "test memory")
    with pytest.raises(ConfigError, match=r"XLA:CPU's plan of its train step"):
        memory.check_fits(spec_of(TINY), limit=limit)
    assert asked == [256]
    assert memory.check_fits(spec_of(TINY), limit=(p.peak, "test memory")) is p


@pytest.mark.slow
def test_train_refuses_before_loading_data(tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "cpu_step_memory", lambda p: (10**6, "the test device"))
    monkeypatch.setattr(data, "load_spec", lambda *a: pytest.fail("data loaded"))
    config = configlib.apply_arg(configlib.base(), TINY)
    with pytest.raises(ConfigError, match="the test device"):
        experiment.run(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_cpu_limit_is_available_memory_less_two_host_copies_of_the_params(monkeypatch):
    spec = spec_of(TINY)
    p = memory.params_bytes(spec, memory.corpus_vocab(spec, exact=False))
    n = len(jax.local_devices())
    monkeypatch.setattr(memory, "available_host_memory", lambda: (100 * p, "test host memory"))
    left, what = memory.cpu_step_memory(p)
    assert left == (100 * p - 2 * p) // n and "2 host copies" in what  # by hand
    memory.check_fits(spec)  # 98 params' worth: the tiny step (about 25) fits
    # the two host copies plus half a copy: the params alone no longer fit beside them
    monkeypatch.setattr(memory, "available_host_memory", lambda: (2 * p + p // 2, "test"))
    with pytest.raises(ConfigError, match="its parameters alone"):
        memory.check_fits(spec)
    monkeypatch.setattr(memory, "available_host_memory", lambda: (p, "test"))
    assert memory.cpu_step_memory(p)[0] == 0


def test_a_model_past_int32_counts_is_refused_naming_model_size():
    # a block of d=4096, d_ff=16384: 4 d**2 + 2 d d_ff = 201,326,592 weights (+ biases, norms);
    # 11 blocks: about 2.21e9 > 2**31 - 1; 10 blocks: about 2.01e9, still countable
    c = configlib.base()
    c.model.size = "11,4096,32,16384"
    with pytest.raises(ConfigError, match=r"model.size='11,4096,32,16384' has about "
                       r"2,21\d,\d{3},\d{3} parameters.*at most 2,147,483,647"):
        memory.check_fits(configlib.validate(c), limit=(10**15, "test"))
    c.model.size = "10,4096,32,16384"
    memory.check_fits(configlib.validate(c), limit=(10**15, "test"))


def test_device_memory_is_the_host_on_cpu():
    n, what = memory.device_memory()
    assert n == memory.physical_memory() and what == "host memory"


def test_devices_in_their_stated_units():
    assert memory_table.device("H100").bytes == 80 * 10**9
    assert memory_table.device("v5e").bytes == 16 * 2**30
    assert memory_table.device("v5p").stated == "95 GiB"
    assert memory_table.device("123456").bytes == 123456
    for bad in ("v9", "0", "-5", "1e9"):
        with pytest.raises(ValueError, match="--device must be one of h100"):
            memory_table.device(bad)


@pytest.mark.slow
def test_plan_memory_cli(capsys, plans, monkeypatch):
    """The table and a fit (plan reused), then a refusal: one line, exit status 2."""
    monkeypatch.setattr(memory, "plan", lambda spec, vocab: plans[TINY])
    base = ["plan-memory", "--config", str(ROOT / "configs" / "base.py") + ":" + TINY]
    assert cli.main([*base, "--device", "v5e"]) == 0
    out = capsys.readouterr().out
    for words in ("per device: model tiny (0.1M params)", "XLA:CPU's compiled plan",
                  "  params", "optimizer state", "masks", "temporaries", "peak = arguments",
                  "device v5e (16 GiB): fits, headroom"):
        assert words in out
    assert cli.main([*base, "--device", "1000000", "--config.train.steps=100"]) == 2
    out, err = capsys.readouterr()
    assert "does NOT fit" in out
    assert err.count("\n") == 1 and err.startswith("sparsejax: error: this run needs about ")
    assert cli.main([*base, "--device", "v9"]) == 2
    assert "--device must be one of" in capsys.readouterr().err


def _accel(arg: str):
    path = ROOT / "configs" / "gpt_accel.py"
    spec = importlib.util.spec_from_file_location("gpt_accel", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.mark.parametrize("size,shape", [("125M", (12, 768, 12, 3072)),
                                        ("350M", (24, 1024, 16, 4096)),
                                        ("760M", (24, 1536, 16, 6144)),
                                        ("1.3B", (24, 2048, 16, 8192))])
def test_accelerator_presets(size, shape):
    spec = configlib.validate(_accel(f"size={size}"))
    cfg = GPTConfig.from_variant(spec.model.size)
    assert (cfg.n_layer, cfg.d_model, cfg.n_head, cfg.d_ff) == shape
    assert spec.model.dtype == "bfloat16" and spec.model.n_ctx == spec.train.seq_len == 1024
    long = configlib.validate(_accel(f"size={size},seq=2048,train.steps=5000"))
    assert long.train.seq_len == 2048 and long.train.steps == 5000
    assert long.train.batch_size == max(1, spec.train.batch_size // 4)


def test_accelerator_preset_refuses_unknown_sizes_and_seqs():
    with pytest.raises(ValueError, match="variant must be one of"):
        _accel("size=2B")
    with pytest.raises(ValueError, match="seq must be one of"):
        _accel("seq=4096")


def test_check_fits_names_a_mesh_the_devices_cannot_make():
    with pytest.raises(ConfigError, match=r"mesh\.fsdp=2 must divide the 1 devices"):
        memory.check_fits(spec_of(TINY + ",mesh.fsdp=2"), limit=(10**9, "test memory"))
